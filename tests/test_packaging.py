import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_installed_only_as_accel_kernels(tmp_path):
    code = "import importlib.util as u, accel.kernels; print(u.find_spec('kernels') is None, accel.kernels.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "accel.kernels"]


def test_ci_runs_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()

    def block_after(heading):
        m = re.search(rf"## {heading}\n+```bash\n(.+?)\n```", readme, re.S)
        assert m, f"README has no ```bash block under '## {heading}'"
        return m.group(1).strip()

    ci_lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert block_after("Tests") == ci_lines[-1]
    setup = block_after("Setup").split(" && ")
    assert " && ".join(setup[2:]) in ci_lines  # the install steps, after venv creation and activation
