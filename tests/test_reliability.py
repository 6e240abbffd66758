"""Bad input and faults against the command line, table-driven: each case must stop with
one line `tf-explog <cmd>: error: ...` naming what is wrong, the right exit status, and
leave every file on disk as it was (no run directory, no half-written output)."""

import json
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import keras
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


class _StopAfter(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of epoch ``epoch`` (after the resume state)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt("stopped by the test")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid data set, a config, one finished run (for predict/export cases) and one
    interrupted after its first epoch (``runs/part/*``, for --resume cases)."""
    from tf_explog.config import load_config
    from tf_explog.training import train

    root = tmp_path_factory.mktemp("reliability")
    generate_dataset(root / "data", subjects=4, test_subjects=1, shape=SIZE, verbose=False)
    (root / "tiny.yaml").write_text(yaml.safe_dump(_config(root)))
    assert cli.main(["train", "--config", str(root / "tiny.yaml")]) == 0
    (run,) = (root / "runs" / "tiny").iterdir()
    (root / "part.yaml").write_text(yaml.safe_dump(_config(root, name="part",
                                                           **{"train.epochs": 2})))
    with pytest.raises(KeyboardInterrupt):
        train(load_config(root / "part.yaml"), extra_callbacks=[_StopAfter(0)])
    (part,) = (root / "runs" / "part").iterdir()
    assert [p.name for p in (part / "backup").iterdir()] == ["epoch-0001.weights.h5"]
    (root / "part.yaml").unlink()
    return root, run


def _part(root: Path) -> Path:
    """The run interrupted after its first epoch (see ``base``)."""
    (part,) = (root / "runs" / "part").iterdir()
    return part


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


# ---- issue 23: the families of the adversarial review, each a table case ----------------

def _loop(path: Path) -> None:
    """Replaces ``path`` by a symbolic link loop (path -> path.loop -> path)."""
    path.unlink()
    other = path.with_name(path.name + ".loop")
    path.symlink_to(other.name)
    other.symlink_to(path.name)


def _symlink_loop_in_data(root, run):
    _loop(_label_file(root, 1))
    (_label_file(root, 2)).unlink()  # a second problem: both are listed
    return _train(root, run)


def _affine(path: Path, change) -> None:
    img = nib.load(str(path))
    affine = img.affine.copy()
    change(affine)
    header = img.header.copy()
    header.set_qform(None, code=0)  # the sform alone describes the grid
    header.set_sform(affine, code=1)  # as stored; nibabel would refuse to decompose it
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header=header), str(path))


def _singular_affine_train(root, run):
    entry = _dataset_json(root)["training"][1]
    for rel in (entry["image"], entry["label"]):
        _affine(root / "data" / rel, lambda a: a.__setitem__((slice(0, 3), 1), 0.0))
    return _train(root, run)


def _test_image(root) -> Path:
    (image,) = (root / "data" / "imagesTs").glob("*.nii.gz")
    return image


def _predict(root, run, *extra):
    return ["predict", "--model", str(run), "--input", str(root / "data" / "imagesTs"),
            "--output", str(root / "preds"), *extra]


def _singular_affine_predict(root, run):
    _affine(_test_image(root), lambda a: a.__setitem__((slice(0, 3), 2), 0.0))
    return _predict(root, run)


def _nan_affine_predict(root, run):
    _affine(_test_image(root), lambda a: a.__setitem__((0, 0), np.nan))
    return _predict(root, run)


DEEP = "[" * 10**6 + "]" * 10**6


def _deep_dataset_json(root, run):
    (root / "data" / "dataset.json").write_text(DEEP)
    return _train(root, run)


def _deep_label_map(root, run):
    (root / "deep_map.json").write_text(DEEP)
    return _with_config(**{"data.label_map": "deep_map.json"})(root, run)


def _deep_truth(root, run):
    (root / "truth.json").write_text(DEEP)
    return ["evaluate", "--pred", str(root / "data" / "imagesTs"), "--truth",
            str(root / "truth.json"), "--out", str(root / "ev")]


def _two_modalities(root, run):
    spec = _dataset_json(root)
    spec["modality"] = {"0": "T1", "1": "T2"}
    _write_dataset_json(root, spec)
    return _train(root, run)


def _class_without_ids(root, run):
    classes = [int(k) for k in _dataset_json(root)["labels"] if int(k) > 0]
    (root / "map.json").write_text(json.dumps({str(c): [c] for c in classes if c != 5}))
    return _with_config(**{"data.label_map": "map.json"})(root, run)


def _unreadable_input(root, run):
    shutil.copy(_test_image(root), root / "data" / "imagesTs" / "a.nii.gz")
    (root / "data" / "imagesTs" / "z.nii.gz").symlink_to("z.nii.gz")  # loops onto itself
    return _predict(root, run)


def _later_bad_input(root, run):
    image = _test_image(root)
    shutil.copy(image, root / "data" / "imagesTs" / "a.nii.gz")  # fine, read first
    data = image.read_bytes()
    (root / "data" / "imagesTs" / "z.nii.gz").write_bytes(data[: len(data) // 2])
    return _predict(root, run)


def _colliding_outputs(root, run):
    image = _test_image(root)
    stem = image.name[: -len(".nii.gz")]
    shutil.copy(image, image.with_name(f"{stem}_probabilities.nii.gz"))
    return _predict(root, run, "--probabilities")


def _truncated_keras(root, run):
    best = run / "checkpoints" / "best.keras"
    best.write_bytes(best.read_bytes()[:1000])
    return _predict(root, run)


def _unreadable_run_json(root, run):
    (run / "run.json").write_text('{"config": ')
    return _predict(root, run)


def _resume(root, run):
    return ["train", "--resume", str(_part(root))]


def _edited_config_yaml(root, run):
    path = _part(root) / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["train"]["epochs"] = 5
    path.write_text(yaml.safe_dump(raw))
    return _resume(root, run)


def _state_not_matching_run_json(root, run):
    part = _part(root)
    info = json.loads((part / "run.json").read_text())
    info["config"]["model"]["filters"] = [8, 8, 8, 8, 8]
    (part / "run.json").write_text(json.dumps(info))
    raw = yaml.safe_load((part / "config.yaml").read_text())
    raw["model"]["filters"] = [8, 8, 8, 8, 8]
    (part / "config.yaml").write_text(yaml.safe_dump(raw))
    return _resume(root, run)


def _torn_state(root, run):
    state = _part(root) / "backup" / "epoch-0001.weights.h5"
    state.write_bytes(state.read_bytes()[:17952])  # what a kill mid-write left (issue 23)
    return _resume(root, run)


CASES += [
    ("symlink loop among the data files", _symlink_loop_in_data, 2,
     ["symbolic link that loops", "file not found"]),
    ("singular affine (train)", _singular_affine_train, 2, ["affine", "singular"]),
    ("singular affine (predict)", _singular_affine_predict, 2, ["affine", "singular"]),
    ("NaN in the sform (predict)", _nan_affine_predict, 2, ["affine", "NaN"]),
    ("dataset.json nested 10^6 deep", _deep_dataset_json, 2,
     ["dataset.json", "nested too deeply"]),
    ("label map nested 10^6 deep", _deep_label_map, 2, ["deep_map.json", "nested too deeply"]),
    ("evaluate --truth nested 10^6 deep", _deep_truth, 2, ["truth.json", "nested too deeply"]),
    ("modality lists 2 channels for 3D images", _two_modalities, 2,
     ["3D image", "'modality' lists 2"]),
    ("seed -1", _with_config(seed=-1), 2, ["seed", "-1"]),
    ("seed 2**40", _with_config(seed=2**40), 2, ["seed", str(2**40)]),
    ("target_shape not a multiple of 16", _with_config(
        data={"dataset": "data/dataset.json", "preprocess": {"target_shape": 20}}), 2,
     ["data.preprocess.target_shape", "20"]),
    ("--set with an empty key", lambda r, run: [*_train(r, run), "--set", "=3"], 2,
     ["'=3'"]),
    ("--set with an empty part", lambda r, run: [*_train(r, run), "--set",
                                                 "train..epochs=3"], 2,
     ["'train..epochs=3'"]),
    ("label map leaving a class with no id", _class_without_ids, 2,
     ["map.json", "class(es) [5]", "no original ids"]),
    ("predict an unreadable input", _unreadable_input, 2,
     ["z.nii.gz", "symbolic link that loops"]),
    ("predict a bad input after a good one", _later_bad_input, 2, ["z.nii.gz"]),
    ("predict two inputs with the same output", _colliding_outputs, 2,
     ["_probabilities.nii.gz", "also the output of"]),
    ("predict with a truncated .keras", _truncated_keras, 2,
     ["best.keras", "not a complete .keras archive"]),
    ("predict with an unreadable run.json", _unreadable_run_json, 2,
     ["run.json", "unreadable"]),
    ("--resume with an edited config.yaml", _edited_config_yaml, 2,
     ["config.yaml", "train.epochs", "run.json"]),
    ("--resume with weights not matching run.json", _state_not_matching_run_json, 2,
     ["epoch-0001.weights.h5", "does not fit the model"]),
    ("--resume with a torn resume state", _torn_state, 2,
     ["backup", "no complete resume state"]),
]


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its size and contents' hash (caches left out)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            if p.is_file() else f"-> {os.readlink(p)}"
            for p in sorted(root.rglob("*"))
            if (p.is_file() or p.is_symlink()) and ".cache" not in p.parts}


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

    from tf_explog.callbacks import BestCheckpoint
    from tf_explog.runs import write_metrics_csv
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


# ---- issue 23: a real kill during the resume-state write, one process per run ------------

CHILD = '''
import os, sys, time
from pathlib import Path

marker, argv = Path(sys.argv[1]), sys.argv[2:]
real = os.replace


def replace(src, dst, *args, **kwargs):
    # Between the complete temporary file and its rename: say so, then wait to be killed.
    if str(dst).endswith("epoch-0002.weights.h5"):
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    return real(src, dst, *args, **kwargs)


os.replace = replace
from tf_explog import cli

sys.exit(cli.main(argv))
'''


def _hidden(run: Path) -> list:
    """Temporary files anywhere in the run (the lock file is not one)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock")


@pytest.mark.slow
def test_a_kill_between_the_state_write_and_its_rename_loses_nothing(base, tmp_path, capsys):
    """A training process killed (SIGKILL) after writing the new resume state under its
    temporary name and before renaming it: while it runs, nobody else may use the run; once
    it is dead, --resume continues from the previous complete state and removes the
    leftover temporary file."""
    import subprocess
    import sys
    import time

    root = tmp_path / "work"
    shutil.copytree(base[0], root, symlinks=True)
    (root / "killed.yaml").write_text(yaml.safe_dump(_config(
        root, name="killed", **{"train.epochs": 3, "train.bn_recalibration": False,
                                "data.validation_fraction": 0.0})))
    (tmp_path / "child.py").write_text(CHILD)
    marker = tmp_path / "paused"
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(marker), "train", "--config",
         str(root / "killed.yaml")], cwd=root, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the rename"
            time.sleep(0.2)
        (run,) = (root / "runs" / "killed").iterdir()
        backup = sorted(p.name for p in (run / "backup").iterdir())
        assert backup[0].startswith(f".epoch-0002.weights.h5.{child.pid}-"), backup
        assert backup[1:] == ["epoch-0001.weights.h5"]

        # While it trains: a second training, predict and export of the run are refused.
        before = _snapshot(run)
        refused = [(["train", "--resume", str(run)], "in use by another process"),
                   (["predict", "--model", str(run), "--input",
                     str(root / "data" / "imagesTs"), "--output", str(root / "preds")],
                    "still training")]
        if keras.backend.backend() == "tensorflow":
            refused.append((["export", "--run", str(run), "--base", str(root / "sm")],
                            "still training"))
        for argv, words in refused:
            capsys.readouterr()
            assert cli.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"tf-explog {argv[0]}: error: "), err
            assert str(run) in err[0] and words in err[0] and f"pid {child.pid}" in err[0]
        assert _snapshot(run) == before
        assert not (root / "preds").exists() and not (root / "sm").exists()
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -9

    # The OS released the lock with the process; the previous state is complete.
    assert cli.main(["train", "--resume", str(run)]) == 0
    with open(run / "metrics.csv") as f:
        import csv

        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    assert (run / "checkpoints" / "final.keras").is_file() and not (run / "backup").exists()
    assert _hidden(run) == []


@pytest.mark.slow
def test_resume_falls_back_to_the_previous_complete_state(base, tmp_path, capsys):
    """The newest state cut in half (a bad disk, a hand copy): --resume says so in one line
    and continues from the one before it."""
    from tf_explog.callbacks import ResumeState

    root = tmp_path / "work"
    shutil.copytree(base[0], root, symlinks=True)
    part = _part(root)
    state = part / "backup" / "epoch-0001.weights.h5"
    shutil.copy(state, part / "backup" / "epoch-0002.weights.h5")  # as if epoch 2 ended
    newest = part / "backup" / "epoch-0002.weights.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # The run's own config asks for 2 epochs: resuming from epoch 1 trains epoch index 1.
    seen = []
    real = ResumeState.on_train_begin

    def probe(self, logs=None):
        real(self, logs)
        seen.append(self.restored_epoch)

    ResumeState.on_train_begin = probe
    try:
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(part)]) == 0
    finally:
        ResumeState.on_train_begin = real
    out = capsys.readouterr().out
    assert seen == [1]
    assert "epoch-0002.weights.h5 is unreadable" in out and "epoch-0001.weights.h5" in out
    assert (part / "checkpoints" / "final.keras").is_file()


# ---- issue 23: the environment (full disk, read-only, no permission) -------------------

def _oserror(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _state_write_fails(monkeypatch, code: int, epoch: int) -> None:
    """The resume-state write of ``epoch`` fails with ``code`` (as h5py would on a full
    disk), inside its temporary file."""
    real = keras.Model.save_weights

    def save_weights(self, filepath, *args, **kwargs):
        if f"epoch-{epoch:04d}" in str(filepath):
            Path(filepath).write_bytes(b"\x89HDF\r\n")  # a torn start, then the failure
            raise _oserror(code, filepath)
        return real(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", save_weights)


def _nifti_write_fails(monkeypatch, code: int) -> None:
    import tf_explog.data.nifti as nifti

    def save(img, filename, *args, **kwargs):
        raise _oserror(code, filename)

    monkeypatch.setattr(nifti.nib, "save", save)


def _mkdir_fails_under(monkeypatch, code: int, folder: Path) -> None:
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(folder)):
            raise _oserror(code, self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


ENVIRONMENT = [
    ("full disk at the first resume state (run removed)", "train", 28,
     lambda mp, root, run: _state_write_fails(mp, 28, 1),
     ["backup/epoch-0001.weights.h5:", "No space left on device", "free some space",
      "removed"]),
    ("quota exceeded writing predictions", "predict", 122,
     lambda mp, root, run: _nifti_write_fails(mp, 122), ["preds/brain_004.nii.gz:", "quota"]),
    ("read-only predict --output", "predict", 30,
     lambda mp, root, run: _nifti_write_fails(mp, 30), ["preds", "Read-only file system"]),
    ("read-only export --base", "export", 30,
     lambda mp, root, run: _mkdir_fails_under(mp, 30, root / "sm"),
     ["sm", "Read-only file system"]),
    ("runs_dir not writable", "train", 13,
     lambda mp, root, run: _mkdir_fails_under(mp, 13, root / "runs" / "tiny"),
     ["runs/tiny", "Permission denied", "writable"]),
]


# The full-disk case trains a run for an epoch first (~35 s): slow; the others stay fast.
@pytest.mark.parametrize("name, command, code, inject, words",
                         [pytest.param(*c, marks=[pytest.mark.slow] if c[1] == "train"
                                       and c[2] == 28 else []) for c in ENVIRONMENT],
                         ids=[c[0] for c in ENVIRONMENT])
def test_environment_errors_exit_2_with_the_path_and_what_to_do(
        base, tmp_path, capsys, monkeypatch, name, command, code, inject, words):
    if command == "export" and keras.backend.backend() != "tensorflow":
        pytest.skip("export needs TensorFlow")
    root = tmp_path / "work"
    shutil.copytree(base[0], root, symlinks=True)
    run = root / base[1].relative_to(base[0])
    argv = {"train": _train(root, run), "predict": _predict(root, run),
            "export": ["export", "--run", str(run), "--base", str(root / "sm")]}[command]
    before = _snapshot(root)
    inject(monkeypatch, root, run)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tf-explog {command}: error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert "internal error" not in err[0]
    assert _snapshot(root) == before  # nothing half-written, no run directory left


@pytest.mark.slow
def test_a_full_disk_after_an_epoch_marks_the_run_and_resume_finishes_it(
        base, tmp_path, capsys, monkeypatch):
    """Disk full at the second epoch's resume state: exit 2, FAILED.json says why, the run
    is not used for predictions; with room again, --resume finishes it and the mark goes."""
    root = tmp_path / "work"
    shutil.copytree(base[0], root, symlinks=True)
    (root / "two.yaml").write_text(yaml.safe_dump(_config(
        root, name="two", **{"train.epochs": 2, "train.bn_recalibration": False,
                             "data.validation_fraction": 0.0})))
    _state_write_fails(monkeypatch, 28, 2)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(root / "two.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    (run,) = (root / "runs" / "two").iterdir()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "FAILED.json" in err[0] and f"--resume {run}" in err[0]
    failed = json.loads((run / "FAILED.json").read_text())
    assert failed["kind"] == "environment" and "No space left" in failed["error"]
    assert sorted(p.name for p in (run / "backup").iterdir()) == ["epoch-0001.weights.h5"]
    assert cli.main(["predict", "--model", str(run), "--input", str(root / "data" / "imagesTs"),
                     "--output", str(root / "preds")]) == 2
    assert "failed" in capsys.readouterr().err

    monkeypatch.undo()  # room again
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert not (run / "FAILED.json").exists() and (run / "checkpoints" / "final.keras").is_file()
    with open(run / "metrics.csv") as f:
        import csv

        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    assert _hidden(run) == []


# ---- issue 23: temporary files of killed writers ---------------------------------------

def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    """Only temporaries whose writer process is gone are removed; nothing else."""
    import subprocess
    import sys

    from tf_explog.files import remove_stale_temporaries, temporary_name

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".a.nii.gz.{dead_pid}-x1y2.tmp.nii.gz"
    stale.write_bytes(b"half")
    stale_dir = tmp_path / f".tmp-export-{dead_pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "saved_model.pb").write_bytes(b"half")
    live = temporary_name(tmp_path / "b.nii.gz")  # this process: still writing
    live.write_bytes(b"being written")
    keep = [tmp_path / "a.nii.gz", tmp_path / ".hidden", tmp_path / ".x.123.tmp"]
    for path in keep:
        path.write_bytes(b"user data")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, stale_dir])
    assert sorted(tmp_path.iterdir()) == sorted(keep + [live])


def test_alias_bomb_names_the_file_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefghijkl", "bcdefghijklm")))
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count(str(path)) == 1 and "YAML aliases" in err, err


def test_environment_errors_are_recognised_without_errno():
    """h5py reports a full disk as an OSError with no errno, the system's words in its text."""
    from tf_explog.files import describe_environment_error, environment_error

    h5 = OSError("Can't synchronously write data (file write failed: errno = 28, error "
                 "message = 'No space left on device')")
    assert environment_error(h5)
    assert describe_environment_error(h5, "run/backup") == (
        "run/backup: No space left on device; free some space (or raise the quota), or "
        "write to another disk")
    assert not environment_error(OSError("bad object header version number"))
    assert not environment_error(FileNotFoundError(2, "No such file or directory", "x"))
    assert not environment_error(ValueError("No space left on device"))


def test_metrics_csv_resume_numbers_epochs_from_1_and_reads_older_runs(tmp_path):
    """A resumed MetricsCSV keeps the finished epochs' rows and drops the cut one; a file of
    an older run (numbered from 0) is read shifted, so its resume and best value still work."""
    import keras

    from tf_explog.callbacks import BestCheckpoint, MetricsCSV
    from tf_explog.runs import read_metrics_csv, write_metrics_csv

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
