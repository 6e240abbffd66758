"""Training from configs: fit, aux outputs, TensorBoard contents, resume, tf.distribute."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from tf_explog import plots, training
from tf_explog.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(two_structure_dataset):
    """6 cases of 32³, two spheres (conftest.py, shared with tests/test_fullres.py)."""
    return two_structure_dataset


def small_config(dataset, tmp_path, *overrides):
    raw = {
        "name": "t", "seed": 1, "runs_dir": str(tmp_path / "runs"),
        "data": {"dataset": str(dataset), "validation_fraction": 0.34,
                 "cache_dir": str(Path(dataset).parent / ".cache"),
                 "augment": {"enabled": False}},
        "model": {"filters": [8, 8, 16, 16, 16], "encoder_depths": [1, 1, 1, 1, 1],
                  "decoder_depths": [1, 1, 1, 1], "noise_std": 0.0, "dropout": 0.0,
                  "bn_momentum": 0.5},
        "train": {"epochs": 6, "batch_size": 2, "optimizer": "adam",
                  "learning_rate": 0.01, "verbose": 0, "image_summary_every": 3},
    }
    return config_from_dict(raw, list(overrides))


def read_scalars(log_dir: Path) -> dict:
    """{tag: [values]} from every TensorBoard event file under log_dir."""
    out = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    continue  # the run's settings, not a series
                if value.metadata.plugin_data.plugin_name == "images" or value.HasField(
                        "image"):
                    out.setdefault(f"{path.parent.name}/{value.tag}", []).append("image")
                    continue
                number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else (
                    value.simple_value)
                out.setdefault(f"{path.parent.name}/{value.tag}", []).append(float(number))
    return out


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    return training.train(small_config(dataset, tmp))


@pytest.mark.slow
def test_fit_lowers_loss_and_raises_dice(trained):
    loss, dice = trained.history["loss"], trained.history["val_dice"]
    assert loss[-1] < 0.7 * loss[0], loss
    assert dice[-1] > dice[0] + 0.2, dice
    assert trained.history["val_dice_big"][-1] > 0.5


@pytest.mark.slow
def test_run_directory_contents(trained):
    run = trained.run_dir
    info = json.loads((run / "run.json").read_text())
    assert info["label_names"] == ["background", "big", "small"]
    assert info["num_channels"] == 1 and info["seed"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 6
    for path in (trained.best_checkpoint, trained.final_model, run / "metrics.csv"):
        assert path.is_file(), path
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # numbered from 1, as on the console and in TensorBoard
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert {"val_dice_small", "dice_term", "cross_term", "epoch_seconds"} <= set(rows[0])
    # the run records itself: versions, device, command, and what it found
    env = info["environment"]
    assert env["keras"] == keras.__version__ and env["numpy"] == np.__version__
    assert env["backend"] == keras.backend.backend() and env["tf_explog"]
    assert env["device"].startswith(("CPU:", "GPU:")) and info["command"]
    assert info["status"] == "finished" and info["epochs_trained"] == 6
    assert info["duration_s"] > 0
    val = [float(r["val_dice"]) for r in rows]
    assert info["best"]["monitor"] == "val_dice"
    assert info["best"]["value"] == pytest.approx(max(val))
    assert info["best"]["epoch"] == 1 + val.index(max(val))
    assert info["final_metrics"]["epoch"] == 6
    assert info["final_metrics"]["val_dice"] == pytest.approx(val[-1])
    model = keras.saving.load_model(trained.best_checkpoint)
    assert model.output_shape == (None, None, None, None, 3)


@pytest.mark.slow
def test_tensorboard_has_grouped_tags_images_and_hparams(trained):
    scalars = read_scalars(trained.run_dir / "tensorboard")
    for tag in ("dice_by_structure/small", "dice_by_structure/big", "dice/validation",
                "dice/train", "loss/train", "loss/validation", "loss/dice_term",
                "loss/cross_term", "optimizer/learning_rate", "time/epoch_seconds"):
        assert f"tensorboard/{tag}" in scalars, sorted(scalars)
        assert len(scalars[f"tensorboard/{tag}"]) == 6
    # One writer: no tag is written twice per epoch, no train/validation duplicates.
    assert not [t for t in scalars if t.split("/")[1].startswith(("epoch_", "train", "valid"))]
    np.testing.assert_allclose(scalars["tensorboard/optimizer/learning_rate"], 0.01, rtol=1e-6)
    np.testing.assert_allclose(scalars["tensorboard/dice/validation"],
                               trained.history["val_dice"], rtol=1e-5)
    # images every 3 epochs (3 and 6): captioned overlays with a legend, and a Dice chart
    images = sorted(t for t in scalars if scalars[t] and scalars[t][0] == "image")
    assert images == ["tensorboard/dice_by_structure/chart",
                      "tensorboard/overlays/middle_slices"], images
    assert all(len(scalars[t]) == 2 for t in images)
    # steps are epochs numbered from 1 (as metrics.csv and the console); an image tag's
    # caption is the same at every step (TensorBoard shows the first one for all of them)
    steps, captions = {}, {}
    for path in (trained.run_dir / "tensorboard").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
                if value.HasField("image"):
                    captions.setdefault(value.tag, set()).add(value.metadata.summary_description)
    assert sorted(steps["dice/validation"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(steps["overlays/middle_slices"]) == [3, 6]
    assert all(len(c) == 1 for c in captions.values()), captions
    assert not any("epoch 3" in c.lower() for cs in captions.values() for c in cs)
    # HParams: the run's settings, for comparing runs (reproduce arms) side by side
    plugins = set()
    for path in (trained.run_dir / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            plugins.update(v.metadata.plugin_data.plugin_name for v in event.summary.value)
    assert "hparams" in plugins


def test_overlay_panel_colours_labels():
    image = np.zeros((16, 16, 16, 1), np.float32)
    image[8, :, :8] = 1.0  # left half bright: the 1st-99th percentile window is [0, 1]
    truth = np.zeros((16, 16, 16), np.int32)
    truth[8, 2:5, 2:5] = 2
    panel = plots.overlay_panel(image, truth, np.zeros_like(truth), 3, axis=0)
    assert panel.shape == (16, 48, 3)
    colour = plots.label_colours(3)[2]
    np.testing.assert_allclose(panel[3, 16 + 3], 0.5 * 1.0 + 0.5 * colour, atol=1e-6)
    np.testing.assert_allclose(panel[3, 32 + 3], 1.0)  # prediction has no label there


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.slow
def test_resume_after_interruption(dataset, tmp_path):
    config = small_config(dataset, tmp_path, "train.epochs=4", "train.image_summary_every=0")
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(config, run_dir=run_dir, extra_callbacks=[Interrupt(at_epoch=1)])
    assert (run_dir / "backup").exists()

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["iterations"] = int(self.model.optimizer.iterations.numpy())

        def on_epoch_begin(self, epoch, logs=None):
            seen.setdefault("epochs", []).append(epoch)

    result = training.train(None, resume=run_dir, extra_callbacks=[Probe()])
    # epochs 0 and 1 finished before the crash: training continues at epoch 2, with the
    # optimizer's step count restored (2 batches of 2 per epoch over 4 training volumes)
    assert seen["epochs"] == [2, 3]
    assert seen["iterations"] == 2 * 2
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["epochs_trained"] == 4
    assert len(info["resumed"]) == 1 and info["resumed"][0]["environment"]["keras"]
    assert int(keras.saving.load_model(result.final_model).optimizer.iterations) == 4 * 2


@pytest.mark.slow
def test_aux_outputs_train_with_label_pyramid(dataset, tmp_path):
    config = small_config(dataset, tmp_path, "model.aux_outputs=2", "train.epochs=2",
                          "train.image_summary_every=0")
    result = training.train(config)
    assert "val_dice" in result.history and "val_dice_small" in result.history
    assert "aux_1_loss" in result.history and "aux_2_loss" in result.history
    model = keras.saving.load_model(result.best_checkpoint)
    assert sorted(model.output_names) == ["aux_1", "aux_2", "segmentation"]


def test_cli_train_and_resume_errors(dataset, tmp_path):
    from tf_explog import cli

    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump({"name": "x", "data": {"dataset": str(dataset)},
                                           "train": {"epochz": 1}}))
    assert cli.main(["train", "--config", str(config_path)]) == 2
    assert cli.main(["train", "--resume", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_is_refused_on_a_tensorflow_cpu(dataset, tmp_path, policy):
    config = small_config(dataset, tmp_path, f"train.dtype_policy={policy}")
    with pytest.raises(ValueError, match=f"train.dtype_policy={policy} is not supported on a CPU"):
        training.train(config)
    assert not (tmp_path / "runs").exists()  # refused before anything was created


class PoisonWeights(keras.callbacks.Callback):
    """Sets the first kernel to NaN just before step ``step`` of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch, step):
        super().__init__()
        self.epoch, self.step, self.current = epoch, step, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.current == self.epoch and batch == self.step:
            kernel = self.model.weights[0]
            kernel.assign(np.full(kernel.shape, np.nan, kernel.dtype))


@pytest.mark.slow
def test_nan_stops_training_with_one_line_and_a_failure_status(dataset, tmp_path, monkeypatch,
                                                               capsys):
    from tf_explog import cli
    from tf_explog.models import non_finite_weights

    original = training.standard_callbacks

    def with_poison(*args, **kwargs):
        return original(*args, **kwargs) + [PoisonWeights(epoch=1, step=1)]

    monkeypatch.setattr(training, "standard_callbacks", with_poison)
    config_path = tmp_path / "nan.yaml"
    raw = small_config(dataset, tmp_path, "train.epochs=3", "train.batch_size=1",
                       "train.image_summary_every=0").to_dict()
    config_path.write_text(yaml.safe_dump(raw))
    status = cli.main(["train", "--config", str(config_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and "epoch 2, step 2" in err[0] and "nan" in err[0], err
    (run,) = (tmp_path / "runs" / "t").iterdir()
    assert (run / "FAILED.json").is_file()
    assert not (run / "checkpoints" / "final.keras").exists()
    best = run / "checkpoints" / "best.keras"
    assert best.is_file()  # from epoch 1, before the NaN
    assert non_finite_weights(keras.saving.load_model(best, compile=False)) == []
    with open(run / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["best"]["epoch"] == 1
    # a failed run is not exported
    assert cli.main(["export", "--run", str(run), "--base", str(tmp_path / "sm")]) == 2
    assert "failed" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import tensorflow as tf
    if os.environ.get("LOGICAL_CPUS"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * int(os.environ["LOGICAL_CPUS"]))
    from tf_explog import training
    from tf_explog.config import config_from_dict
    config = config_from_dict(json.loads(sys.argv[1]))
    result = training.train(config, run_dir=sys.argv[2])
    print("STEPS", json.dumps(config.train.steps_per_epoch))  # the caller's config after
    print("RESULT", json.dumps({k: [float(x) for x in v] for k, v in result.history.items()}))
""")


def _dist_config(dataset, tmp_path, strategy, *overrides):
    config = small_config(dataset, tmp_path, f"train.strategy={strategy}", "train.epochs=2",
                          "train.image_summary_every=0", "train.batch_size=2", *overrides)
    raw = config.to_dict()
    return json.dumps(raw)


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus(dataset, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = dict(os.environ, LOGICAL_CPUS="2")
    out = subprocess.run([sys.executable, str(script), _dist_config(dataset, tmp_path, "mirrored"),
                          str(tmp_path / "run")], env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "replicas=2" in out.stdout
    history = json.loads(out.stdout.split("RESULT", 1)[1])
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))


@pytest.mark.slow
def test_multi_worker_two_local_processes(dataset, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    # A loss as the monitor: the custom loop must keep the lowest, as fit does.
    config = _dist_config(dataset, tmp_path, "multi_worker", "train.checkpoint_monitor=val_loss")
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), config, str(tmp_path / f"run{index}")], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=420))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-4000:]
    history = json.loads(outputs[0][0].split("RESULT", 1)[1])
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert "val_dice_small" in history
    chief = tmp_path / "run0"
    assert (chief / "checkpoints" / "best.keras").is_file()
    assert [int(r["epoch"]) for r in csv.DictReader((chief / "metrics.csv").open())] == [1, 2]
    assert list((chief / "tensorboard").rglob("events.out.tfevents.*"))
    info = json.loads((chief / "run.json").read_text())
    assert info["status"] == "finished" and info["epochs_trained"] == 2
    assert info["environment"]["backend"] == "tensorflow" and info["best"]["epoch"] in (1, 2)
    val_loss = [float(r["val_loss"]) for r in csv.DictReader((chief / "metrics.csv").open())]
    assert info["best"]["monitor"] == "val_loss"
    assert info["best"]["value"] == pytest.approx(min(val_loss))
    # The caller's config is not changed: no steps per epoch written into it.
    assert "STEPS null" in outputs[0][0]


class _FakeModel:
    stop_training = False


@pytest.mark.parametrize("epoch_seconds, budget, expected_epochs", [
    ([10, 10, 10, 10, 10], 35, 3),  # after 3: 30 s spent + 10 s longest = 40 > 35
    ([10, 10, 10, 10, 10], 50, 5),  # exactly on budget: every epoch fits
    ([5, 20, 5, 5, 5], 40, 2),      # the longest epoch so far (20 s) is the estimate
    ([100], 1, 1),                  # at least one epoch always runs
])
def test_time_budget_stops_when_the_next_epoch_would_not_fit(epoch_seconds, budget,
                                                            expected_epochs):
    from tf_explog.callbacks import TimeBudget

    now = [0.0]
    cb = TimeBudget(budget, clock=lambda: now[0])
    cb.set_model(_FakeModel())
    cb.set_params({"epochs": len(epoch_seconds)})
    cb.on_train_begin()
    ran = 0
    for epoch, seconds in enumerate(epoch_seconds):
        now[0] += seconds
        cb.on_epoch_end(epoch)
        ran += 1
        if cb.model.stop_training:
            break
    assert ran == expected_epochs == cb.epochs_trained
    assert cb.stopped_by_budget == (expected_epochs < len(epoch_seconds))


@pytest.mark.slow
def test_time_budget_ends_a_run_early_as_a_finished_run(dataset, tmp_path, capsys):
    result = training.train(small_config(dataset, tmp_path, "train.epochs=50",
                                         "train.time_budget_s=0.001"))
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    assert len(rows) == 1  # the first epoch alone is over budget
    assert result.best_checkpoint.is_file() and result.final_model.is_file()
    assert "stopped after epoch 1 of 50" in capsys.readouterr().out


def test_checkpoint_monitor_names_exactly_what_a_run_logs(trained, dataset, tmp_path):
    from tf_explog.builders import TrainingSetup, logged_metrics
    from tf_explog.config import ConfigError

    config = small_config(dataset, tmp_path)
    with open(trained.run_dir / "metrics.csv") as f:
        columns = set(next(csv.DictReader(f)))
    names = set(logged_metrics(config, ["background", "big", "small"]))
    # Every name offered is logged; what is logged besides is bookkeeping, not a metric.
    assert names <= columns, names - columns
    assert columns - names == {"epoch", "epoch_seconds", "time_validation", "time_recalibration"}
    TrainingSetup.from_config(small_config(dataset, tmp_path,
                                           "train.checkpoint_monitor=val_dice_small"))
    with pytest.raises(ConfigError, match=r"checkpoint_monitor: 'val_dcie' .*val_dice_small"):
        TrainingSetup.from_config(small_config(dataset, tmp_path,
                                               "train.checkpoint_monitor=val_dcie"))
