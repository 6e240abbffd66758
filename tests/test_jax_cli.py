"""The CLI on the JAX backend with TensorFlow unimportable (as on a bare GPU machine):
train -> predict -> evaluate works and learns; export and tf.distribute fail with one line."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

# Slow: every test here runs the CLI in a JAX subprocess (the module fixture trains 10 epochs).
pytestmark = pytest.mark.slow

SHAPE = (32, 32, 32)

# Runs tf_explog.cli.main in a fresh interpreter where `import tensorflow` fails.
RUNNER = """
import sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTensorFlow())
from tf_explog.cli import main
status = main(sys.argv[1:])
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
sys.exit(status)
"""


def cli_jax(*args, cwd):
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    env.pop("TF_EXPLOG_NATIVE_LOGS", None)
    return subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def subject(rng):
    """A bright ball (class 1) with a small dim ball (class 2) inside it, in noise."""
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0).astype(float)
    centre = np.array(SHAPE) / 2 + rng.uniform(-3, 3, 3)
    labels = np.zeros(SHAPE, np.uint8)
    labels[np.linalg.norm(grid - centre, axis=-1) < 9] = 1
    labels[np.linalg.norm(grid - centre - [3, 0, 0], axis=-1) < 3] = 2
    image = np.choose(labels, [0.0, 2.0, 1.0]) + rng.normal(0, 0.4, SHAPE)
    return image.astype(np.float32), labels


@pytest.fixture(scope="module")
def jax_run(msd_dataset):
    rng = np.random.default_rng(1)
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    cases = [(f"s{i}", *subject(rng), affine) for i in range(8)]
    root = msd_dataset(cases[:6], ["background", "ball", "core"], test=cases[6:],
                       folder="jax_cli", name="balls", modality="MR").parent
    (root / "jax.yaml").write_text(yaml.safe_dump({
        "name": "jax", "runs_dir": "runs",
        "data": {"dataset": "dataset.json", "validation_fraction": 0.2,
                 "preprocess": {"target_shape": 32}, "augment": {"enabled": False}},
        "model": {"filters": [8, 8, 16, 16, 16], "encoder_depths": [1, 1, 1, 1, 1],
                  "decoder_depths": [1, 1, 1, 1], "noise_std": 0.5},
        "loss": {"name": "exp_log", "class_weights": "auto"},
        "train": {"epochs": 10, "optimizer": "adam", "learning_rate": 0.01, "verbose": 1,
                  "image_summary_every": 5, "data_workers": 2},
    }))
    result = cli_jax("train", "--config", "jax.yaml", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = (root / "runs" / "jax").iterdir()
    return root, run, result


def test_train_on_jax_writes_a_complete_run(jax_run):
    root, run, result = jax_run
    assert "backend=jax" in result.stdout and "jit=True" in result.stdout
    for path in ("checkpoints/best.keras", "checkpoints/final.keras", "metrics.csv",
                 "config.yaml"):
        assert (run / path).is_file(), path
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 10  # header + one row per epoch


def test_predict_and_evaluate_on_jax_segment_the_held_out_cases(jax_run):
    root, run, _ = jax_run
    result = cli_jax("predict", "--model", run, "--input", "imagesTs", "--output", "preds",
                     cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    dice = []
    for i in (6, 7):
        pred = nib.load(str(root / "preds" / f"s{i}.nii.gz"))
        truth = nib.load(str(root / "labelsTs" / f"s{i}.nii.gz"))
        np.testing.assert_allclose(pred.affine, truth.affine)
        p, t = np.asarray(pred.dataobj), np.asarray(truth.dataobj)
        for c in (1, 2):  # Dice in NumPy, independent of tf_explog.evaluation
            dice.append(2 * np.sum((p == c) & (t == c)) / (np.sum(p == c) + np.sum(t == c)))
    assert min(dice) > 0.7, dice
    result = cli_jax("evaluate", "--pred", "preds", "--truth", "dataset.json", "--out",
                     "eval", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = float(result.stdout.split("mean Dice over subjects and structures: ")[1][:5])
    assert reported == pytest.approx(np.mean(dice), abs=1e-3)


@pytest.mark.parametrize("args, needle", [
    (["export", "--run", "RUN", "--base", "saved"], "needs TensorFlow"),
    (["train", "--config", "jax.yaml", "--set", "train.strategy=mirrored"],
     "train.strategy=mirrored needs TensorFlow"),
])
def test_tensorflow_only_work_fails_with_one_line(jax_run, args, needle):
    root, run, _ = jax_run
    before = sorted(str(p) for p in root.rglob("*"))
    result = cli_jax(*[str(run) if a == "RUN" else a for a in args], cwd=root)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert sorted(str(p) for p in root.rglob("*")) == before  # nothing written


def test_reproduce_on_jax_with_a_time_budget_reports_the_epochs_each_arm_got(jax_run):
    root, _, _ = jax_run
    (root / "reproduce.yaml").write_text(yaml.safe_dump(sort_keys=False, data={
        "name": "rj", "train_config": "jax.yaml",
        # the first epoch alone is over budget: every arm stops after it
        "set": ["train.epochs=20", "train.time_budget_s=0.001", "train.verbose=0"],
        "out_dir": "rep", "reference_arm": "exp_log", "splits": 1,
        "arms": {"exp_log": {"loss": "exp_log"}, "linear_dice": {"loss": "linear_dice"}}}))
    result = cli_jax("reproduce", "--config", "reproduce.yaml", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (root / "rep" / "report.md").read_text()
    assert "on jax" in report
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("| arm |")).split(" | ")
    rows = [line.split(" | ") for line in lines
            if line.startswith(("| exp_log |", "| linear_dice |"))]
    assert [row[header.index("epochs")] for row in rows] == ["1", "1"]
