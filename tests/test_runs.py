"""Run directories: created inside runs_dir, read back whole, the right checkpoint chosen."""

import json

import pytest

from tf_explog.config import ConfigError, config_from_dict
from tf_explog.data.preprocess import Preprocessor
from tf_explog.runs import Run, RunError, RunNotFoundError


def _config(tmp_path, **overrides):
    raw = {"name": "exp", "runs_dir": str(tmp_path / "runs"),
           "data": {"dataset": "d.json", "mode": "patch", "patch_size": [32, 16, 16]}}
    raw.update(overrides)
    return config_from_dict(raw)


@pytest.mark.parametrize("name", ["..", ".", "a/b", ".hidden", "-x", "", "a\\b", "x" * 200])
def test_names_that_would_leave_runs_dir_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="name"):
        _config(tmp_path, name=name)


def test_create_write_open_round_trip(tmp_path):
    config = _config(tmp_path)
    run = Run.create(config)
    assert run.path.parent == tmp_path / "runs" / "exp" and run.checkpoints_dir.is_dir()
    second = Run.create(config)  # same second: a suffix, never the same folder
    assert second.path != run.path
    prep = Preprocessor(target_shape=32, normalization="zscore")
    run.write_info(config, ["background", "a", "b"], 2, prep)
    back = Run.open(run.path)
    assert back.label_names == ["background", "a", "b"] and back.num_channels == 2
    assert back.window == (32, 16, 16)
    assert back.preprocessor.to_dict() == prep.to_dict()
    assert back.config.to_dict() == config.to_dict()
    assert (run.path / "config.yaml").read_text().startswith("name: exp")


def test_checkpoint_choice_and_run_states(tmp_path):
    run = Run.create(_config(tmp_path))
    run.write_info(_config(tmp_path), ["bg", "a"], 1, Preprocessor())
    with pytest.raises(RunNotFoundError, match="best_checkpoint.*final_model"):
        run.checkpoint("best")
    run.final_model.write_bytes(b"final")
    assert run.checkpoint("best") == run.final_model  # no best one: the final model
    run.best_checkpoint.write_bytes(b"best")
    assert run.checkpoint("best") == run.best_checkpoint
    assert run.checkpoint("final") == run.final_model
    with pytest.raises(RunError, match="'best' or 'final'"):
        run.checkpoint("last")
    assert run.finished
    with pytest.raises(RunError, match="finished"):
        run.check_resumable()
    run.backup_dir.mkdir()  # resume state left: not finished
    run.check_resumable()
    run.mark_failed("loss NaN at epoch 3")
    assert json.loads(run.failed_file.read_text())["error"] == "loss NaN at epoch 3"
    with pytest.raises(RunError, match="failed"):
        run.checkpoint("best")


def test_bad_run_directories_name_the_file(tmp_path):
    with pytest.raises(RunNotFoundError, match="not found"):
        Run.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="run.json is missing"):
        Run.open(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="run.json: unreadable"):
        Run.open(broken).info
    (broken / "run.json").write_text(json.dumps({"label_names": "abc"}))
    with pytest.raises(RunError, match="'label_names' must be a list"):
        Run.open(broken).label_names
    with pytest.raises(RunError, match="missing the 'preprocessor' entry"):
        Run.open(broken).preprocessor


def test_run_results_pick_the_first_best_epoch_and_the_last_row():
    from tf_explog.training import run_results

    rows = [{"epoch": 1, "val_dice": 0.5, "loss": 2.0},
            {"epoch": 2, "val_dice": float("nan"), "loss": 1.0},
            {"epoch": 3, "val_dice": 0.7, "loss": 1.5},
            {"epoch": 4, "val_dice": 0.7, "loss": 0.5},
            {"epoch": 5, "loss": 0.4}]
    found = run_results(rows, "val_dice")
    assert found["best"] == {"monitor": "val_dice", "epoch": 3, "value": 0.7}
    assert found["epochs_trained"] == 5 and found["final_metrics"] == rows[-1]
    assert run_results(rows, "val_loss")["best"] is None
    assert run_results(rows, "loss")["best"]["epoch"] == 5  # lower is better for a loss
    assert run_results([], "val_dice") == {"epochs_trained": 0, "best": None,
                                           "final_metrics": {}}


def test_device_description_names_the_gpu_or_the_cpu():
    from tf_explog.environment import device_description

    assert device_description(["NVIDIA H100 80GB HBM3"]) == "GPU: NVIDIA H100 80GB HBM3"
    assert device_description(["A", "A"]) == "2x GPU: A"
    assert device_description([]).startswith("CPU: ")


def test_tool_command_is_the_venv_path_unless_the_venv_is_active(tmp_path, monkeypatch):
    import sys

    from tf_explog.environment import tool_command

    bindir = tmp_path / ".venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "tf-explog").write_text("#!/bin/sh\n")
    (bindir / "tf-explog").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert tool_command("tf-explog") == ".venv/bin/tf-explog"  # a new shell: call it by path
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    assert tool_command("tf-explog") == "tf-explog"  # the venv is active
    assert tool_command("not-installed") == "not-installed"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert tool_command("tf-explog") == str(bindir / "tf-explog")  # not below: absolute
