"""Real-anatomy label maps end to end on the CLI: FreeSurfer-style ids merged into classes,
an oblique-free but LIA, anisotropic grid, train -> predict -> evaluate with the map as a file."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tf_explog import cli

# Slow: every test uses the module fixture, an 8-epoch training run.
pytestmark = pytest.mark.slow

SHAPE = (32, 24, 20)  # voxels, in the file's own (LIA) axis order
SPACING = (1.0, 1.25, 1.6)  # mm, anisotropic
# FreeSurfer ids: 2/41 left/right cerebral white matter, 17/53 left/right hippocampus,
# 24 CSF (left out of the map: background with data.unknown_labels: background).
LABEL_MAP = {"1": [2, 41], "2": [17, 53]}
NAMES = {"0": "background", "1": "white_matter", "2": "hippocampus"}


def lia_affine():
    # Array axes point Left, Inferior, Anterior.
    affine = np.zeros((4, 4))
    affine[0, 0] = -SPACING[0]
    affine[2, 1] = -SPACING[1]
    affine[1, 2] = SPACING[2]
    affine[:3, 3] = [20.0, -10.0, 30.0]
    affine[3, 3] = 1.0
    return affine


def subject(rng):
    """Two white-matter halves (2 | 41), two small hippocampi (17, 53), CSF (24)."""
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0) * np.array(SPACING)
    centre = np.array(SHAPE) * np.array(SPACING) / 2 + rng.uniform(-2, 2, 3)
    labels = np.zeros(SHAPE, np.int16)
    brain = np.linalg.norm((grid - centre) / [13, 12, 12], axis=-1) < 1
    left = grid[..., 0] < centre[0]
    labels[brain & left] = 2
    labels[brain & ~left] = 41
    labels[np.linalg.norm(grid - centre - [0, 0, 10], axis=-1) < 2.5] = 24
    for sign, fs_id in ((-1, 17), (1, 53)):
        labels[np.linalg.norm(grid - centre - [sign * 6, 2, -3], axis=-1) < 2.6] = fs_id
    intensity = {0: 0.0, 2: 3.0, 41: 3.0, 17: 1.5, 53: 1.5, 24: 0.7}
    image = np.vectorize(intensity.get)(labels) + rng.normal(0, 0.25, SHAPE)
    return image.astype(np.float32), labels


@pytest.fixture(scope="module")
def freesurfer(msd_dataset):
    rng = np.random.default_rng(0)
    cases = [(f"s{i}", *subject(rng), lia_affine()) for i in range(7)]
    root = msd_dataset(cases[:5], NAMES, test=cases[5:], folder="freesurfer", name="fs").parent
    (root / "label_map.json").write_text(json.dumps(LABEL_MAP))
    config = {
        "name": "fs", "runs_dir": "runs",
        "data": {"dataset": "dataset.json", "label_map": "label_map.json",
                 "unknown_labels": "background", "validation_fraction": 0.2,
                 "preprocess": {"target_shape": 32}, "augment": {"enabled": False}},
        "model": {"filters": [8, 8, 16, 16, 16], "encoder_depths": [1, 1, 1, 1, 1],
                  "decoder_depths": [1, 1, 1, 1], "noise_std": 0.5},
        "loss": {"name": "exp_log", "class_weights": "auto"},
        "train": {"epochs": 8, "optimizer": "adam", "learning_rate": 0.01, "verbose": 0,
                  "image_summary_every": 0},
    }
    (root / "fs.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["train", "--config", str(root / "fs.yaml")]) == 0
    (run,) = (root / "runs" / "fs").iterdir()
    return root, run


def test_predictions_overlay_the_input_and_use_original_ids(freesurfer):
    root, run = freesurfer
    out = root / "preds"
    assert cli.main(["predict", "--model", str(run), "--input", str(root / "imagesTs"),
                     "--output", str(out)]) == 0
    classes = root / "preds_classes"
    assert cli.main(["predict", "--model", str(run), "--input", str(root / "imagesTs"),
                     "--output", str(classes), "--ids", "class"]) == 0
    for image in sorted((root / "imagesTs").glob("*.nii.gz")):
        src, pred = nib.load(str(image)), nib.load(str(out / image.name))
        assert pred.shape == src.shape == SHAPE
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert nib.aff2axcodes(pred.affine) == ("L", "I", "A")
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        # a merged class is written with the first id it lists
        assert values <= {0, 2, 17} and 2 in values
        ids = np.asarray(nib.load(str(classes / image.name)).dataobj)
        assert set(np.unique(ids).tolist()) <= {0, 1, 2}
        original = np.asarray(pred.dataobj)
        np.testing.assert_array_equal(original == 2, ids == 1)
        np.testing.assert_array_equal(original == 17, ids == 2)


def test_evaluate_in_class_space_with_the_map_as_a_file(freesurfer, capsys):
    root, _ = freesurfer
    report = root / "eval"
    assert cli.main(["evaluate", "--pred", str(root / "preds"), "--truth",
                     str(root / "dataset.json"), "--out", str(report), "--label-map",
                     str(root / "label_map.json"), "--unknown-labels", "background"]) == 0
    out = capsys.readouterr().out
    import csv

    with open(report / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    wm = [float(r["dice"]) for r in rows if r["name"] == "white_matter"]
    # both halves (2 and 41) count as white matter, whichever id the prediction uses
    assert len(wm) == 2 and min(wm) > 0.85, rows
    assert "with background" in out
    # class indices evaluate the same way with --pred-ids class
    again = root / "eval_classes"
    assert cli.main(["evaluate", "--pred", str(root / "preds_classes"), "--truth",
                     str(root / "dataset.json"), "--out", str(again), "--label-map",
                     str(root / "label_map.json"), "--unknown-labels", "background",
                     "--pred-ids", "class"]) == 0
    assert (again / "metrics.csv").read_text() == (report / "metrics.csv").read_text()
    # without the map, the original ids are not class names: one clear line
    assert cli.main(["evaluate", "--pred", str(root / "preds"), "--truth",
                     str(root / "dataset.json"), "--out", str(root / "eval_bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--label-map" in err[0] and "41" in err[0]


@pytest.mark.parametrize("label_map, expected", [
    ('{"1": [2, 41], "2": [17, 41]}', "original id 41 is listed under both class 1 and 2"),
    ('{"1": [2, 41], "1": [17, 53]}', "class 1 appears twice"),
    ('{"1": [2, 41], "3": [17, 53]}', "class(es) [3] are not in the data set's labels"),
    ('{"1": [2, 41], "2": [17, 53, 99]}', "lists original id(s) [99] that no label file"),
])
def test_bad_label_maps_name_the_file_and_the_id(freesurfer, tmp_path, capsys, label_map,
                                                 expected):
    root, _ = freesurfer
    bad = tmp_path / "bad_map.json"
    bad.write_text(label_map)
    config = yaml.safe_load((root / "fs.yaml").read_text())
    config["data"].update(dataset=str(root / "dataset.json"), label_map=str(bad),
                          cache_dir=str(tmp_path / "cache"))
    config["runs_dir"] = str(tmp_path / "runs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err, err


def test_unknown_ids_are_an_error_by_default(freesurfer, tmp_path, capsys):
    root, _ = freesurfer
    config = yaml.safe_load((root / "fs.yaml").read_text())
    config["data"].update(dataset=str(root / "dataset.json"),
                          label_map=str(root / "label_map.json"), unknown_labels="raise",
                          cache_dir=str(tmp_path / "cache"))
    config["runs_dir"] = str(tmp_path / "runs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "label values [24] are not in the label map" in err and "s0.nii.gz" in err
