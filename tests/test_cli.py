"""The main job end to end with a short schedule (the full default run is measured in bench/results)."""

import json
import os

from accel.cli import main


def test_compress_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["compress", "--out", str(out), "--epochs", "1", "--kd-epochs", "1", "--qat-epochs", "1",
               "--batches", "1", "4", "--decide-batch", "4", "--budget", "0.2", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert 0 <= acc["compressed"] <= 100 and acc["drop_points"] == acc["dense"] - acc["compressed"]
    assert acc["dense"] > 50  # one epoch on digits already learns something
    assert [r["batch"] for r in report["latency"]] == [1, 4]
    assert all(r["dense_ms"] > 0 and r["compressed_ms"] > 0 for r in report["latency"])
    assert report["size_on_disk_bytes"]["compressed"] < report["size_on_disk_bytes"]["dense"]
    layers = {r["layer"] for r in report["layers"]}
    assert {"classifier.1", "features.0", "features.3", "classifier.3"} <= layers
    for name in ("report.png", "dense.safetensors", "compressed.safetensors"):
        assert os.path.getsize(out / name) > 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "speedup" in printed and "size on disk" in printed
