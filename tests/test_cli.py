"""The main job end to end with a short schedule (the full default run is measured in bench/results)."""

import json
import os

import pytest
import torch

from accel.cli import main


def test_compress_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["compress", "--out", str(out), "--epochs", "1", "--kd-epochs", "1", "--qat-epochs", "1",
               "--batches", "1", "4", "--budget", "0.2", "--no-progress"])
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
          "--batches", "2", "--budget", "0.1", "--no-progress"])
    report = json.loads((out / "report.json").read_text())
    assert report["title"].startswith("Sequential")
    assert {r["layer"] for r in report["layers"]} >= {"3"}  # the 512 -> 64 Linear was pruned and converted
    assert report["latency"][0]["batch"] == 2


def test_compress_channels_and_both(tmp_path):
    for prune in ("channels", "both"):
        out = tmp_path / prune
        main(["compress", "--out", str(out), "--prune", prune, "--epochs", "1", "--kd-epochs", "1", "--qat-epochs", "0",
              "--batches", "2", "--budget", "0.1", "--no-progress"])
        report = json.loads((out / "report.json").read_text())
        assert any(r["status"] == "pruned" for r in report["channel_pruning"])
        from accel import load
        from accel.data import digits_loaders
        from accel.distill import evaluate
        from accel.models import SeedCNN

        reloaded = load(SeedCNN(), str(out / "compressed.safetensors"))  # the shrunk shapes come back too
        assert evaluate(reloaded, digits_loaders()[1]) == report["accuracy"]["compressed"]


BAD = [
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1), got 1.5"),
    (["--sparsity", "-0.5"], "--sparsity must be in [0, 1), got -0.5"),
    (["--epochs", "-1"], "--epochs must be >= 0, got -1"),
    (["--batches", "0"], "--batches must all be >= 1, got [0]"),
    (["--block", "24"], "--block must be one of"),
    (["--model", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--model", "tests.cli_fixtures:nope"], "has no function 'nope'"),
    (["--model", "tests.cli_fixtures"], "--model must be module:function"),
    (["--model", "tests.cli_fixtures:not_a_model"], "must return an nn.Module, got int"),
    (["--data", "tests.cli_fixtures:one_loader"], "must return (train_loader, test_loader)"),
    (["--pretrained", "/no/such/file.pt"], "no such file"),
    (["--out", "/proc/accel-cannot-write-here"], "is not writable"),
    # non-finite floats: --lr inf trained fully and then died with a traceback; inf passed "> 0"
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr=-inf"], "--lr must be a finite number, got -inf"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--budget", "inf"], "--budget must be a finite number, got inf"),
    (["--budget", "nan"], "--budget must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--temperature", "NaN"], "--temperature must be a finite number, got nan"),
    (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["--sparsity", "nan"], "--sparsity must be a finite number, got nan"),
    (["--min-density", "inf"], "--min-density must be a finite number, got inf"),
    (["--channel-ratio", "nan"], "--channel-ratio must be a finite number, got nan"),
    # the block pruner steps during distillation: with no distillation epoch nothing would be pruned
    (["--kd-epochs", "0"], "--kd-epochs must be >= 1, got 0 (or use --prune channels)"),
    (["--model", "tests.cli_fixtures:tuple_model", "--data", "tests.cli_fixtures:tiny_data"],
     "--model must return class logits [batch, classes]"),
    # training batches are checked before training, as the test loader's are
    (["--model", "tests.cli_fixtures:tiny_model", "--data", "tests.cli_fixtures:triples_data"],
     "training batches must be (inputs, labels)"),
    (["--model", "tests.cli_fixtures:tiny_model", "--data", "tests.cli_fixtures:float_label_data"],
     "got torch.float32 labels of shape (16,) for 16 inputs"),
    (["--model", "tests.cli_fixtures:tiny_model", "--data", "tests.cli_fixtures:empty_train_data"],
     "the training loader is empty"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_user_errors_are_one_line_and_exit_2_before_training(argv, message, tmp_path, capsys, monkeypatch):
    import accel.distill

    monkeypatch.setattr(accel.distill, "train", lambda *a, **k: pytest.fail("training started"))
    args = ["compress", "--no-progress"] + (["--out", str(tmp_path / "o")] if "--out" not in argv else []) + argv
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_garbage_pretrained_file(tmp_path, capsys):
    bad = tmp_path / "dense.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--out", str(tmp_path / "o"), "--pretrained", str(bad), "--no-progress"])
    assert exc.value.code == 2 and "does not load into the model" in capsys.readouterr().err
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        main(["compress", "--out", str(tmp_path / "o"), "--pretrained", str(tmp_path / "other.pt"), "--no-progress"])


@pytest.mark.parametrize("cmd", ["compress", "engines"])
def test_bad_accel_environment_is_a_user_error(cmd, tmp_path, capsys, monkeypatch, accel_env):
    """A typo in ACCEL_ENGINE fails in one line before training (it was silently ignored)."""
    import accel.distill

    monkeypatch.setattr(accel.distill, "train", lambda *a, **k: pytest.fail("training started"))
    accel_env(ACCEL_ENGINE="int8_linaer=fbgemm")
    argv = ["compress", "--out", str(tmp_path / "o"), "--no-progress"] if cmd == "compress" else ["engines"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"accel {cmd}: error: ACCEL_ENGINE entry 'int8_linaer=fbgemm': unknown op 'int8_linaer'")
    assert "did you mean 'int8_linear'" in err and len(err.splitlines()) == 1, err
    accel_env(ACCEL_ENGINE="int8_linear=nope")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "unknown engine 'nope' for int8_linear; engines of int8_linear: fbgemm" in err


def test_diverging_training_is_a_user_error(tmp_path, capsys):
    """A finite but far too large --lr blows the weights up to NaN/inf: one line, exit 2, not a traceback from
    the quantization that follows."""
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--out", str(tmp_path / "o"), "--model", "tests.cli_fixtures:tiny_model", "--data",
              "tests.cli_fixtures:tiny_data", "--epochs", "1", "--kd-epochs", "1", "--qat-epochs", "0", "--block", "16",
              "--batches", "2", "--budget", "0.1", "--no-progress", "--lr", "1e30"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "diverged at learning rate 1e+30" in err and "try a smaller --lr" in err and len(err.splitlines()) == 1, err


def test_compress_a_model_taking_token_ids(tmp_path):
    """The latency step feeds the data's own inputs (integer token ids stay ids), repeated up to the batch."""
    out = tmp_path / "tok"
    rc = main(["compress", "--out", str(out), "--model", "tests.cli_fixtures:token_model", "--data",
               "tests.cli_fixtures:token_data", "--epochs", "1", "--kd-epochs", "1", "--qat-epochs", "0",
               "--batches", "1", "16", "--budget", "0.05", "--no-progress"])
    assert rc in (0, None)
    report = json.loads((out / "report.json").read_text())
    assert [r["batch"] for r in report["latency"]] == [1, 16]


def test_the_summary_says_when_decisions_were_not_timed():
    from accel.cli import render

    report = {"title": "t", "accuracy": {"dense": 90.0, "compressed": 89.0, "drop_points": 1.0},
              "parameters": {"dense": {"elements": 10, "bytes": 40}, "compressed": {"elements": 10, "bytes": 10}},
              "size_on_disk_bytes": {"dense": 4096, "compressed": 1024},
              "latency": [{"batch": 1, "dense_ms": 1.0, "compressed_ms": 2.0, "speedup": 0.5}],
              "layers": [{"layer": "fc", "reason": "not timed (the machine was busy while measuring, or one side could "
                                                   "not run): the default"}, {"layer": "fc2", "reason": "1.20x float"}]}
    text = render(report)
    assert "note: 1 layer decision(s) were not timed" in text
    report["layers"] = report["layers"][1:]
    assert "not timed" not in render(report)
