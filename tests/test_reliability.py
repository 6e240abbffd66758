"""Bad input and faults against the command line, table-driven: each case must stop with
one line `tf-explog <cmd>: error: ...` naming what is wrong, the right exit status, and
leave every file on disk as it was (no run directory, no half-written output)."""

import json
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tf_explog import cli
from tf_explog.data.synthetic import generate_dataset

SIZE = 16
TINY_MODEL = {"filters": [4, 4, 4, 4, 4], "encoder_depths": [1, 1, 1, 1, 1],
              "decoder_depths": [1, 1, 1, 1]}


def _config(root: Path, **changes) -> dict:
    raw = {"name": "tiny", "runs_dir": "runs",
           "data": {"dataset": "data/dataset.json", "validation_fraction": 0.25,
                    "preprocess": {"target_shape": SIZE}, "augment": {"enabled": False}},
           "model": TINY_MODEL,
           "train": {"epochs": 1, "verbose": 0, "image_summary_every": 0}}
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        if leaf:
            raw[section][leaf] = value
        else:
            raw[section] = value
    return raw


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid data set, a config, and one finished run (for predict/export cases)."""
    root = tmp_path_factory.mktemp("reliability")
    generate_dataset(root / "data", subjects=4, test_subjects=1, shape=SIZE, verbose=False)
    (root / "tiny.yaml").write_text(yaml.safe_dump(_config(root)))
    assert cli.main(["train", "--config", str(root / "tiny.yaml")]) == 0
    (run,) = (root / "runs" / "tiny").iterdir()
    return root, run


def _dataset_json(root: Path) -> dict:
    return json.loads((root / "data" / "dataset.json").read_text())


def _write_dataset_json(root: Path, spec: dict) -> None:
    (root / "data" / "dataset.json").write_text(json.dumps(spec))


def _label_file(root: Path, index: int = 0) -> Path:
    return root / "data" / _dataset_json(root)["training"][index]["label"]


# Each case: (id, command, setup(root, run) -> argv, exit status, words in the message).
def _train(root, run):
    return ["train", "--config", str(root / "tiny.yaml")]


def _with_config(**changes):
    def setup(root, run):
        (root / "tiny.yaml").write_text(yaml.safe_dump(_config(root, **changes)))
        return _train(root, run)
    return setup


def _config_text(text):
    def setup(root, run):
        (root / "tiny.yaml").write_text(text)
        return _train(root, run)
    return setup


def _label_out_of_set(root, run):
    path = _label_file(root, 3)  # the last training case: in the validation split
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 77
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return _train(root, run)


def _case_twice(root, run):
    spec = _dataset_json(root)
    spec["training"].append(spec["training"][0])
    _write_dataset_json(root, spec)
    return _train(root, run)


def _test_case_in_training(root, run):
    spec = _dataset_json(root)
    spec["training"].append(spec["test"][0])
    _write_dataset_json(root, spec)
    return _train(root, run)


def _shape_mismatch(root, run):
    path = _label_file(root, 1)
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE, SIZE - 2), np.uint8), img.affine), str(path))
    return _train(root, run)


def _huge_header(root, run):
    """Image and labels of one case whose headers declare 30000^3 voxels (a few bytes)."""
    import gzip

    entry = _dataset_json(root)["training"][2]
    for rel in (entry["image"], entry["label"]):
        path = root / "data" / rel
        plain = path.with_name("plain.nii")
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(plain))
        raw = bytearray(plain.read_bytes())
        struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[0..7]
        plain.unlink()
        path.write_bytes(gzip.compress(bytes(raw)))
    return _train(root, run)


def _truncated(root, run):
    path = _label_file(root, 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _train(root, run)


def _existing_file_as_output(root, run):
    (root / "out.txt").write_text("keep me")
    return ["predict", "--model", str(run), "--input", str(root / "data" / "imagesTs"),
            "--output", str(root / "out.txt")]


def _outputs_exist(root, run):
    out = root / "preds"
    out.mkdir()
    for image in (root / "data" / "imagesTs").glob("*.nii.gz"):
        (out / image.name).write_text("an earlier result")
    return ["predict", "--model", str(run), "--input", str(root / "data" / "imagesTs"),
            "--output", str(out)]


def _failed_run(root, run):
    (run / "FAILED.json").write_text('{"error": "loss NaN"}')
    return ["predict", "--model", str(run), "--input", str(root / "data" / "imagesTs"),
            "--output", str(root / "preds")]


def _failed_export(root, run):
    (run / "FAILED.json").write_text('{"error": "loss NaN"}')
    return ["export", "--run", str(run), "--base", str(root / "saved_models")]


def _not_keras(root, run):
    (root / "model.h5").write_text("x")
    return ["predict", "--model", str(root / "model.h5"), "--input",
            str(root / "data" / "imagesTs"), "--output", str(root / "preds")]


def _synth_over_data(root, run):
    return ["synth", "--out", str(root / "data"), "--subjects", "2", "--shape", "16"]


CASES = [
    ("config missing", lambda r, run: ["train", "--config", str(r / "nope.yaml")], 2,
     ["nope.yaml", "not found"]),
    ("unknown config key", _with_config(**{"train.epoch": 3}), 2, ["train.epoch"]),
    ("wrong type", _with_config(**{"train.epochs": "many"}), 2, ["train.epochs"]),
    ("duplicate yaml key", _config_text("name: a\nname: b\n"), 2, ["name", "twice"]),
    ("yaml alias bomb", _config_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                  for p, c in zip("abcdefghijkl", "bcdefghijklm"))), 2, ["alias"]),
    ("malformed --set", lambda r, run: [*_train(r, run), "--set", "train.epochs"], 2,
     ["train.epochs", "key=value"]),
    ("run name escapes runs_dir", _with_config(name=".."), 2, ["name"]),
    ("dataset missing", _with_config(**{"data.dataset": "missing/dataset.json"}), 2,
     ["missing/dataset.json"]),
    ("label outside the label set (validation case)", _label_out_of_set, 2, ["77"]),
    ("case listed twice", _case_twice, 2, ["listed 2 times"]),
    ("test case also in training", _test_case_in_training, 2, ["listed 2 times"]),
    ("image/label shape mismatch", _shape_mismatch, 2, ["shape"]),
    ("header declaring huge dimensions", _huge_header, 2, ["above the limit"]),
    ("truncated label file", _truncated, 2, ["truncated or corrupt"]),
    ("bf16 on a TensorFlow CPU", _with_config(**{"train.dtype_policy": "mixed_bfloat16"}), 2,
     ["mixed_bfloat16", "CPU"]),
    ("--resume with --config", lambda r, run: ["train", "--resume", str(run), "--config",
                                               str(r / "tiny.yaml")], 2, ["--resume"]),
    ("--resume a finished run", lambda r, run: ["train", "--resume", str(run)], 2,
     ["finished"]),
    ("--resume a folder that is not a run", lambda r, run: ["train", "--resume", str(r)], 2,
     ["run.json"]),
    ("predict into an existing file", _existing_file_as_output, 2, ["out.txt"]),
    ("predict over earlier outputs", _outputs_exist, 2, ["--overwrite"]),
    ("predict with a failed run", _failed_run, 2, ["failed"]),
    ("predict with a non-.keras file", _not_keras, 2, ["model.h5", ".keras"]),
    ("predict a missing input", lambda r, run: [
        "predict", "--model", str(run), "--input", str(r / "none"), "--output",
        str(r / "preds")], 2, ["none"]),
    ("evaluate without truth", lambda r, run: [
        "evaluate", "--pred", str(r / "data" / "imagesTs"), "--truth",
        str(r / "missing.json"), "--out", str(r / "ev")], 2, ["missing.json"]),
    ("export a missing run", lambda r, run: ["export", "--run", str(r / "gone")], 2,
     ["gone"]),
    ("export a failed run", _failed_export, 2, ["failed"]),
    ("synth over an existing data set", _synth_over_data, 2, ["--overwrite"]),
    ("synth zero subjects", lambda r, run: ["synth", "--out", str(r / "s"), "--subjects",
                                            "0"], 2, ["subjects"]),
]


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its size and contents' hash (caches left out)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}


@pytest.mark.parametrize("name, setup, status, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_with_one_line_and_changes_nothing(base, tmp_path, capsys, name,
                                                           setup, status, words):
    root = tmp_path / "work"
    shutil.copytree(base[0], root, symlinks=True)
    run = root / base[1].relative_to(base[0])
    argv = setup(root, run)
    before = _snapshot(root)
    capsys.readouterr()
    assert cli.main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tf-explog {argv[0]}: error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert _snapshot(root) == before  # nothing written, nothing lost, no run directory


def test_a_failed_start_leaves_no_run_directory(base, tmp_path, monkeypatch, capsys):
    """A run that dies before its first epoch ends leaves nothing behind to resume."""
    root = tmp_path / "work"
    shutil.copytree(base[0], root, symlinks=True)
    from tf_explog import training

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training, "standard_callbacks", boom)
    runs = sorted((root / "runs" / "tiny").iterdir())
    assert cli.main(["train", "--config", str(root / "tiny.yaml")]) == 3
    assert "internal error" in capsys.readouterr().err
    assert sorted((root / "runs" / "tiny").iterdir()) == runs


def test_checkpoints_are_written_atomically_and_resume_keeps_the_best(base, tmp_path):
    """A kill during a save leaves the previous complete best.keras; a resumed run does not
    replace a better checkpoint with a worse first epoch."""
    import keras

    from tf_explog.callbacks import BestCheckpoint, write_metrics_csv
    from tf_explog.files import atomic_path

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best = tmp_path / "best.keras"
    model.save(str(best))
    before = best.read_bytes()

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        with atomic_path(best) as tmp:
            tmp.write_bytes(before[:100])  # half a file, then the process dies
            raise Killed
    assert best.read_bytes() == before and not list(tmp_path.glob(".best.keras.*"))

    csv_path = tmp_path / "metrics.csv"
    # rows numbered from 1: epochs 1 and 2 finished, Keras resumes at its epoch index 2
    write_metrics_csv(csv_path, [{"epoch": 1, "val_dice": 0.8}, {"epoch": 2, "val_dice": 0.5}])
    callback = BestCheckpoint(best, monitor="val_dice", metrics_csv=csv_path)
    callback.set_model(model)
    callback.on_epoch_begin(2)  # resumed at epoch 2: the best so far is 0.8
    callback.on_epoch_end(2, {"val_dice": 0.6})
    assert best.read_bytes() == before
    model.layers[0].kernel.assign(np.ones((2, 1)))
    callback.on_epoch_end(3, {"val_dice": 0.9})
    assert callback.best == 0.9
    np.testing.assert_array_equal(
        keras.saving.load_model(str(best)).layers[0].kernel.numpy(), np.ones((2, 1)))


def test_metrics_csv_resume_numbers_epochs_from_1_and_reads_older_runs(tmp_path):
    """A resumed MetricsCSV keeps the finished epochs' rows and drops the cut one; a file of
    an older run (numbered from 0) is read shifted, so its resume and best value still work."""
    import keras

    from tf_explog.callbacks import BestCheckpoint, MetricsCSV, read_metrics_csv, \
        write_metrics_csv

    path = tmp_path / "metrics.csv"
    # epochs 1, 2 finished; epoch 3 was written, then the process died before its backup
    write_metrics_csv(path, [{"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 2.0},
                             {"epoch": 3, "loss": 9.0}])
    callback = MetricsCSV(path)
    callback.on_epoch_begin(2)  # Keras' index of the third epoch
    callback.on_epoch_end(2, {"loss": 1.5})
    rows = read_metrics_csv(path)
    assert [(r["epoch"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.0), (3, 1.5)]

    legacy = tmp_path / "legacy.csv"
    legacy.write_text("epoch,val_dice\n0,0.7\n1,0.9\n2,0.4\n")
    assert [r["epoch"] for r in read_metrics_csv(legacy)] == [1, 2, 3]
    best = tmp_path / "best.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(str(best))
    checkpoint = BestCheckpoint(best, monitor="val_dice", metrics_csv=legacy)
    checkpoint.on_epoch_begin(2)  # epochs 1 and 2 (written 0 and 1) finished
    assert checkpoint.best == 0.9
    checkpoint = BestCheckpoint(best, monitor="val_dice", metrics_csv=legacy)
    checkpoint.on_epoch_begin(1)  # only epoch 1 counts
    assert checkpoint.best == 0.7
