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
    assert report["size_on_disk_bytes"]["compressed"] == os.path.getsize(out / "compressed.safetensors")
    # the saved compressed model loads into a fresh seed CNN and scores what the report says
    from accel import load
    from accel.data import digits_loaders
    from accel.distill import evaluate
    from accel.models import SeedCNN

    assert evaluate(load(SeedCNN(), str(out / "compressed.safetensors")), digits_loaders()[1]) == acc["compressed"]
    layers = {r["layer"] for r in report["layers"]}
    assert {"classifier.1", "features.0", "features.3", "classifier.3"} <= layers
    for name in ("report.png", "dense.safetensors", "compressed.safetensors"):
        assert os.path.getsize(out / name) > 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "speedup" in printed and "size on disk" in printed


def test_compress_own_model_and_data(tmp_path):
    out = tmp_path / "own"
    main(["compress", "--out", str(out), "--model", "tests.cli_fixtures:tiny_model", "--data",
          "tests.cli_fixtures:tiny_data", "--epochs", "2", "--kd-epochs", "1", "--qat-epochs", "0", "--block", "16",
          "--batches", "2", "--decide-batch", "2", "--budget", "0.1", "--no-progress"])
    report = json.loads((out / "report.json").read_text())
    assert report["title"].startswith("Sequential")
    assert {r["layer"] for r in report["layers"]} >= {"3"}  # the 512 -> 64 Linear was pruned and converted
    assert report["latency"][0]["batch"] == 2
