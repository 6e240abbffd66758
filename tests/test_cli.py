"""The command line end to end: synth -> train -> export -> serve -> predict -> evaluate."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tf_explog import cli
from tf_explog.data.manifest import Manifest

SIZE = 32


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    assert cli.main(["synth", "--out", str(data), "--subjects", "4", "--test-subjects", "2",
                     "--shape", str(SIZE), "--seed", "3"]) == 0
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "runs_dir": "runs",
        "data": {"dataset": "data/dataset.json", "validation_fraction": 0.25,
                 "preprocess": {"target_shape": SIZE}},
        "model": {"filters": [4, 4, 4, 4, 4], "encoder_depths": [1, 1, 1, 1, 1],
                  "decoder_depths": [1, 1, 1, 1]},
        "train": {"epochs": 3, "verbose": 0, "image_summary_every": 0},
    }))
    assert cli.main(["train", "--config", str(config), "--set", "train.epochs=2"]) == 0
    (run_dir,) = (root / "runs" / "tiny").iterdir()
    return root, data, run_dir


@pytest.mark.slow
def test_synth_writes_a_valid_dataset_that_streams(workflow):
    root, data, _ = workflow
    manifest = Manifest.load(data / "dataset.json")
    manifest.validate()
    assert manifest.num_classes == 20 and len(manifest.entries("test")) == 2
    from tf_explog.data.pipeline import make_dataset

    image, labels = next(iter(make_dataset(manifest, "training", batch_size=1,
                                           cache_dir=root / "cache")))
    assert image.shape == (1, SIZE, SIZE, SIZE, 1) and labels.shape == (1, SIZE, SIZE, SIZE)


@pytest.mark.slow
def test_train_used_the_overrides_and_refuses_to_resume_a_finished_run(workflow):
    _, _, run_dir = workflow
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2
    assert (run_dir / "checkpoints" / "best.keras").is_file()
    assert cli.main(["train", "--resume", str(run_dir)]) == 2  # finished: nothing to resume


@pytest.mark.slow
def test_export_serve_predict_evaluate(workflow, tmp_path):
    root, data, run_dir = workflow
    base = root / "saved_models"
    assert cli.main(["export", "--run", str(run_dir), "--base", str(base)]) == 0
    version = base / "tiny" / "1"
    assert (version / "saved_model.pb").is_file()

    # saved_model_cli (as TF Serving would load it) on a small odd-sized input
    x = np.random.default_rng(0).normal(size=(1, 21, 18, 17, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    bindir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bindir / "saved_model_cli"), "run", "--dir", str(version), "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"image={tmp_path / 'x.npy'}",
         "--outdir", str(tmp_path / "served")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = np.load(tmp_path / "served" / "labels.npy")
    assert labels.shape == (1, 21, 18, 17) and labels.dtype == np.int32

    # predict the test images (LIA/RAS/LPS files) and evaluate them against the truth
    preds = root / "preds"
    assert cli.main(["predict", "--model", str(run_dir), "--input", str(data / "imagesTs"),
                     "--output", str(preds)]) == 0
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        src, out = nib.load(str(image)), nib.load(str(preds / image.name))
        assert out.shape == src.shape[:3]
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    # a second run refuses to overwrite
    assert cli.main(["predict", "--model", str(run_dir), "--input", str(data / "imagesTs"),
                     "--output", str(preds)]) == 2

    report = root / "eval"
    assert cli.main(["evaluate", "--pred", str(preds), "--truth", str(data / "dataset.json"),
                     "--out", str(report)]) == 0
    for name in ("metrics.csv", "summary.csv", "report.md", "dice_boxplot.png"):
        assert (report / name).is_file()
    assert "left_pallidum" in (report / "report.md").read_text()


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    assert cli.main(["export", "--run", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli.main(["evaluate", "--pred", str(tmp_path), "--truth",
                     str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.json" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(json.dumps(
        {"name": "x", "data": {"dataset": "d.json"}, "train": {"epochs": -1}}))
    assert cli.main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.epochs" in err


@pytest.mark.parametrize("raised, status, words", [
    (lambda: __import__("tf_explog.errors").errors.InputError("data.json: field 'x'"), 2,
     ["data.json: field 'x'"]),
    (lambda: FileExistsError("out.nii.gz exists"), 2, ["out.nii.gz exists"]),
    (lambda: __import__("tf_explog.errors").errors.NonFiniteError("loss NaN at epoch 3"), 1,
     ["loss NaN at epoch 3"]),
    # A plain ValueError is not bad input the package recognised: a bug, said as such.
    (lambda: ValueError("operands could not be broadcast"), 3, ["internal error", "--debug"]),
    (lambda: KeyError("segmentation"), 3, ["internal error", "KeyError", "--debug"]),
])
def test_cli_failures_are_one_line_with_the_right_status(monkeypatch, capsys, raised, status,
                                                         words):
    def boom(args):
        raise raised()

    monkeypatch.setattr(cli, "cmd_export", boom)
    assert cli.main(["export", "--run", "r"]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tf-explog export: error: "), err
    for word in words:
        assert word in err
    # --debug (before or after the subcommand) lets the exception through with its traceback
    if status != 1:
        for argv in (["--debug", "export", "--run", "r"], ["export", "--run", "r", "--debug"]):
            with pytest.raises(type(raised())):
                cli.main(argv)


def test_every_package_exception_derives_from_one_base():
    import importlib
    import inspect
    import pkgutil

    import tf_explog
    from tf_explog.errors import InputError, TfExplogError

    found = {}
    for info in pkgutil.walk_packages(tf_explog.__path__, "tf_explog."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__.startswith("tf_explog")):
                found[f"{obj.__module__}.{name}"] = obj
    assert len(found) >= 12, sorted(found)
    outside = [name for name, cls in found.items() if not issubclass(cls, TfExplogError)]
    assert not outside
    # bad-input errors are also ValueErrors, as before, so callers catching those still work
    for name in ("ConfigError", "ManifestError", "NiftiError", "InferenceError", "ExportError",
                 "EvaluationError", "CacheError", "LabelError"):
        cls = next(c for n, c in found.items() if n.endswith("." + name))
        assert issubclass(cls, InputError) and issubclass(cls, ValueError), name
