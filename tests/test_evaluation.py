"""Tests of tf_explog.evaluation against hand-worked cases and an independent brute force."""

import csv
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from tf_explog import evaluation as ev

SPACING = (1.0, 1.0, 2.5)


def _cube(shape, start, size, axis=None, shift=0, label=1):
    vol = np.zeros(shape, dtype=np.int16)
    lo = [start] * 3
    if axis is not None:
        lo[axis] += shift
    vol[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = label
    return vol


def _brute_surface_distances(a, b, spacing):
    """Independent reference: surface = voxels with a face neighbour outside; all-pairs distances."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        all_in = np.ones_like(mask, dtype=bool)
        for axis in range(3):
            for step in (-1, 1):
                all_in &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(inner & ~all_in).astype(np.float64) * np.asarray(spacing, dtype=np.float64)

    pa, pb = surface_points(a), surface_points(b)
    d = cdist(pa, pb)
    return np.concatenate([d.min(axis=1), d.min(axis=0)])


# ---------------------------------------------------------------------------------------------
# structure_metrics: hand-worked cases
# ---------------------------------------------------------------------------------------------


def test_cubes_shifted_along_anisotropic_axis_hand_worked():
    # Cube A = [4, 12)³ in 24³; B = A shifted by k = 2 along axis 2 (2.5 mm), spacing (1, 1, 2.5).
    truth = _cube((24, 24, 24), 4, 8)
    pred = _cube((24, 24, 24), 4, 8, axis=2, shift=2)
    (m,) = ev.structure_metrics(pred, truth, [1], SPACING)

    # Dice: overlap 8 × 8 × 6 voxels; 2·384 / (512 + 512) = 0.75.
    assert m["dice"] == pytest.approx(2 * 8 * 8 * 6 / (512 + 512))
    assert m["dice"] == pytest.approx(0.75)
    # Surface of A (6-connectivity): 8³ − 6³ = 296 voxels = 8 slices × 28 ring voxels + 2 × 36 caps.
    # Distances A → B (z = index along axis 2, A spans z 4..11, B spans 6..13):
    #   ring voxels at z 6..11: on B's side surface too           → 168 × 0
    #   ring voxels at z = 5 / 4: nearest B surface at z = 6      →  28 × 2.5,  28 × 5.0
    #   cap z = 4 (6 × 6 interior): B's bottom face z = 6         →  36 × 5.0
    #   cap z = 11 (inside B): nearest is B's side wall in x/y (1 mm steps) or its top (5 mm):
    #     the 6 × 6 cap = rings of 20, 12, 4 voxels at 1, 2, 3 mm → 20 × 1, 12 × 2, 4 × 3
    # B → A is the mirror image, so the pooled 592 distances are twice these:
    #   0: 336, 1: 40, 2: 24, 2.5: 56, 3: 8, 5: 128.
    # Sorted, 5.0 occupies indices 464..591; the 95th percentile sits at 0.95 · 591 = 561.45 → 5.0.
    assert m["hd95_mm"] == pytest.approx(5.0)
    # ASSD = (40·1 + 24·2 + 56·2.5 + 8·3 + 128·5) / 592 = 892 / 592.
    assert m["assd_mm"] == pytest.approx(892 / 592)
    assert m["status"] == "both_present"
    assert m["voxels_truth"] == m["voxels_pred"] == 512
    assert m["volume_truth_mm3"] == pytest.approx(512 * 2.5)
    assert m["relative_volume_difference"] == pytest.approx(0.0)
    assert m["truth_fraction"] == pytest.approx(512 / 24**3)


def test_disjoint_cubes_spacing_scales_distances():
    # Cubes of side 4: A at [4, 8), B shifted by 6 along one axis → B at [10, 14), no overlap.
    # Every nearest B-surface voxel lies straight along the shift axis (B's near face spans all
    # of A's lateral positions), so each distance is a pure multiple of the spacing s of that axis:
    #   A layers 4, 5, 6, 7 hold 16, 12, 12, 16 surface voxels at 6s, 5s, 4s, 3s from B's face 10.
    # Pooled with the mirror B → A: 112 values: 3s: 32, 4s: 24, 5s: 24, 6s: 32.
    # 95th percentile at 0.95 · 111 = 105.45 (6s from index 80) → 6s; ASSD = 504 / 112 · s = 4.5 s.
    shape = (24, 24, 24)
    truth = _cube(shape, 4, 4)
    results = {}
    for axis in (0, 2):
        pred = _cube(shape, 4, 4, axis=axis, shift=6)
        (results[axis],) = ev.structure_metrics(pred, truth, [1], SPACING)
    assert results[0]["dice"] == 0.0 and results[2]["dice"] == 0.0
    assert results[0]["hd95_mm"] == pytest.approx(6.0)  # 1 mm axis
    assert results[2]["hd95_mm"] == pytest.approx(15.0)  # 2.5 mm axis
    assert results[2]["hd95_mm"] == pytest.approx(2.5 * results[0]["hd95_mm"])
    assert results[0]["assd_mm"] == pytest.approx(4.5)
    assert results[2]["assd_mm"] == pytest.approx(2.5 * 4.5)


def test_sphere_against_itself():
    grid = np.indices((20, 20, 20)).astype(np.float64)
    sphere = (((grid - 9.5) ** 2).sum(axis=0) <= 6.0**2).astype(np.uint8) * 3
    (m,) = ev.structure_metrics(sphere, sphere, [3], SPACING)
    assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["assd_mm"] == 0.0
    assert m["voxels_truth"] == int((sphere == 3).sum())


def test_random_blobs_match_brute_force():
    rng = np.random.default_rng(0)
    truth = np.zeros((16, 16, 16), dtype=np.int32)
    pred = np.zeros_like(truth)
    truth[3:11, 4:12, 2:9] = 2
    pred[5:13, 3:10, 4:12] = 2
    # Rough edges so the surfaces are irregular (and touch the image border for one voxel).
    truth[rng.random(truth.shape) < 0.05] = 2
    pred[rng.random(pred.shape) < 0.05] = 2
    pred[0, 0, 0] = 2
    spacing = (0.8, 1.3, 2.1)
    (m,) = ev.structure_metrics(pred, truth, [2], spacing)
    a, b = truth == 2, pred == 2
    d = _brute_surface_distances(a, b, spacing)
    assert m["dice"] == pytest.approx(2 * np.sum(a & b) / (a.sum() + b.sum()), rel=1e-12)
    assert m["hd95_mm"] == pytest.approx(np.percentile(d, 95), rel=1e-9)
    assert m["assd_mm"] == pytest.approx(d.mean(), rel=1e-9)


def test_absent_structure_rules():
    truth = np.zeros((16, 16, 16), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[2:6, 2:6, 2:6] = 1  # only in truth
    pred[8:12, 8:12, 8:12] = 2  # only in prediction
    truth[10:14, 2:5, 2:5] = 4
    pred[10:14, 2:5, 2:5] = 4  # identical
    rows = {r["label"]: r for r in ev.structure_metrics(pred, truth, [1, 2, 3, 4], (1, 1, 1))}

    assert rows[1]["status"] == "missing_in_pred"
    assert rows[1]["dice"] == 0.0
    assert math.isnan(rows[1]["hd95_mm"]) and math.isnan(rows[1]["assd_mm"])
    assert rows[1]["relative_volume_difference"] == -1.0

    assert rows[2]["status"] == "missing_in_truth"
    assert rows[2]["dice"] == 0.0
    assert math.isnan(rows[2]["hd95_mm"]) and math.isnan(rows[2]["relative_volume_difference"])

    assert rows[3]["status"] == "both_absent"
    assert (rows[3]["dice"], rows[3]["hd95_mm"], rows[3]["assd_mm"]) == (1.0, 0.0, 0.0)

    assert rows[4]["status"] == "both_present" and rows[4]["dice"] == 1.0

    # Aggregation: NaN distances are left out of the means but counted.
    two_subjects = [
        {**rows[1], "subject": "s1", "name": "one"},
        {**rows[4], "subject": "s1", "name": "four", "label": 1},  # a perfect case of label 1
    ]
    result = ev.aggregate(two_subjects)
    (structure,) = result.structures
    assert structure["dice_mean"] == pytest.approx(0.5)  # the missed case counts as 0
    assert structure["hd95_mm_mean"] == 0.0  # only the defined case
    assert structure["n_distance_undefined"] == 1 and structure["n_cases"] == 2


def test_bad_inputs_to_structure_metrics():
    vol = np.zeros((8, 8, 8), dtype=np.int32)
    with pytest.raises(ev.EvaluationError, match="shapes differ"):
        ev.structure_metrics(vol, np.zeros((8, 8, 9), dtype=np.int32), [1], (1, 1, 1))
    with pytest.raises(ev.EvaluationError, match="spacing"):
        ev.structure_metrics(vol, vol, [1], (1, 1))
    with pytest.raises(ev.EvaluationError, match="spacing"):
        ev.structure_metrics(vol, vol, [1], (1, 0, 1))
    with pytest.raises(ev.EvaluationError, match="pred.*3D"):
        ev.structure_metrics(np.zeros((8, 8)), vol, [1], (1, 1, 1))
    with pytest.raises(ev.EvaluationError, match="truth.*integer"):
        ev.structure_metrics(vol, vol + 0.5, [1], (1, 1, 1))
    with pytest.raises(ev.EvaluationError, match="connectivity"):
        ev.structure_metrics(vol, vol, [1], (1, 1, 1), connectivity=4)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def test_size_group_terciles():
    # Six structures → two per group, by volume (ties broken by id).
    volumes = {1: 50.0, 2: 10.0, 3: 900.0, 4: 10.0, 5: 300.0, 6: 70.0}
    assert ev.size_groups(volumes) == {
        2: "small", 4: "small", 1: "medium", 6: "medium", 5: "large", 3: "large"
    }
    # 19 structures (the paper's count): ranks 0–6 small, 7–12 medium, 13–18 large (⌊3r/19⌋).
    groups = ev.size_groups({i: float(i) for i in range(1, 20)})
    assert [groups[i] for i in range(1, 20)].count("small") == 7
    assert {groups[i] for i in range(8, 14)} == {"medium"} and {groups[i] for i in range(14, 20)} == {"large"}


def test_aggregate_statistics_by_hand():
    # Structures 1 (small, 10 mm³) / 2 (medium, 100 mm³) / 3 (large, 1000 mm³); two subjects.
    dice = {(1, "a"): 0.2, (1, "b"): 0.4, (2, "a"): 0.6, (2, "b"): 0.8, (3, "a"): 0.9, (3, "b"): 1.0}
    volume = {1: 10.0, 2: 100.0, 3: 1000.0}
    rows = [
        {"subject": s, "label": lab, "name": f"s{lab}", "dice": d, "hd95_mm": 2.0 * lab, "assd_mm": 1.0,
         "volume_truth_mm3": volume[lab], "truth_fraction": volume[lab] / 8000.0,
         "relative_volume_difference": 0.0}
        for (lab, s), d in dice.items()
    ]
    result = ev.aggregate(rows)
    assert [row["label"] for row in result.structures] == [1, 2, 3]
    first = result.structures[0]
    assert first["size_group"] == "small"
    assert first["dice_mean"] == pytest.approx(0.3)
    assert first["dice_sd"] == pytest.approx(math.sqrt(((0.2 - 0.3) ** 2 + (0.4 - 0.3) ** 2) / 1))
    assert first["dice_median"] == pytest.approx(0.3)
    assert [g["name"] for g in result.groups] == ["small", "medium", "large"]
    assert result.groups[2]["dice_mean"] == pytest.approx(0.95)
    assert result.overall["dice_mean"] == pytest.approx(sum(dice.values()) / 6)
    assert result.overall["n_cases"] == 6 and result.overall["n_structures"] == 3


# ---------------------------------------------------------------------------------------------
# Files: evaluate_pairs / evaluate_dirs
# ---------------------------------------------------------------------------------------------

AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])
AFFINE[:3, 3] = (-10.0, 5.0, 3.0)


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.int16), affine), str(path))


def _phantom(shift=0):
    vol = np.zeros((16, 16, 16), dtype=np.int16)
    vol[2:12, 2:12, 2:10] = 1  # large
    vol[3:8, 3:8, 10 + shift : 14 + shift] = 2  # medium
    vol[12:14, 12:14, 12:14] = 3  # small
    return vol


@pytest.fixture
def case_dirs(tmp_path):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    for i, name in enumerate(["s01", "s02"]):
        _save(truth_dir / f"{name}.nii.gz", _phantom())
        _save(pred_dir / f"{name}.nii.gz", _phantom(shift=i))
    return truth_dir, pred_dir


def test_evaluate_pairs_uses_header_spacing(case_dirs):
    truth_dir, pred_dir = case_dirs
    result = ev.evaluate_pairs(
        [("s02", pred_dir / "s02.nii.gz", truth_dir / "s02.nii.gz")], {0: "bg", 1: "big", 2: "mid", 3: "tiny"}
    )
    mid = next(r for r in result.rows if r["label"] == 2)
    # Label 2 is shifted by one voxel along axis 2 (2.5 mm): overlap 5·5·3 of 5·5·4 → Dice 0.75.
    assert mid["dice"] == pytest.approx(0.75)
    assert mid["volume_truth_mm3"] == pytest.approx(100 * 2.5)
    # Shift of 1 voxel along the 2.5 mm axis: the max surface distance is 2.5 mm, never more.
    assert 0 < mid["hd95_mm"] <= 2.5 + 1e-9
    assert mid["name"] == "mid" and mid["subject"] == "s02"


def test_evaluate_dirs_writes_reports(case_dirs, tmp_path):
    truth_dir, pred_dir = case_dirs
    out = tmp_path / "report"
    result = ev.evaluate_dirs(pred_dir, truth_dir, out, label_names=["background", "big", "mid", "tiny"])

    with open(out / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == ev.METRIC_COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * 3  # subjects × structures
    expected = {(s, n) for s in ("s01", "s02") for n in ("big", "mid", "tiny")}
    assert {(r["subject"], r["name"]) for r in rows} == expected
    s01_mid = next(r for r in rows if r["subject"] == "s01" and r["name"] == "mid")
    assert float(s01_mid["dice"]) == 1.0

    with open(out / "summary.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == ev.SUMMARY_COLUMNS
        summary = list(reader)
    assert [r["level"] for r in summary] == ["structure"] * 3 + ["size_group"] * 3 + ["overall"]
    # Sorted by size: tiny (8 voxels), mid (100), big (800).
    assert [r["name"] for r in summary[:3]] == ["tiny", "mid", "big"]
    assert float(summary[-1]["dice_mean"]) == pytest.approx(np.mean([float(r["dice"]) for r in rows]))

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 + 3 + 1  # header, separator, structures, groups, overall
    assert table[2].startswith("| tiny |") and table[4].startswith("| big |")
    assert "**small (1 structures)**" in report and "**overall**" in report
    assert "0.875 ± 0.177" in report  # mid: Dice 1.0 and 0.75 → mean 0.875, SD 0.25/√2

    png = (out / "dice_boxplot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result.outputs) == set(ev.OUTPUT_FILES)
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left


def test_existing_outputs_not_overwritten(case_dirs, tmp_path):
    truth_dir, pred_dir = case_dirs
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("keep me")
    with pytest.raises(FileExistsError, match="report.md"):
        ev.evaluate_dirs(pred_dir, truth_dir, out)
    assert (out / "report.md").read_text() == "keep me"
    assert not (out / "metrics.csv").exists()
    ev.evaluate_dirs(pred_dir, truth_dir, out, overwrite=True)
    assert (out / "report.md").read_text().startswith("# Per-structure evaluation")
    # Inferred label names when none are given.
    assert "label_3" in (out / "metrics.csv").read_text()


def test_dataset_json_truth(case_dirs, tmp_path):
    truth_dir, pred_dir = case_dirs
    spec = {
        "labels": {"0": "background", "1": "big", "2": "mid", "3": "tiny"},
        "training": [],
        "test": [
            {"image": "./imagesTs/s01.nii.gz", "label": "./truth/s01.nii.gz"},
            {"image": "./imagesTs/s02.nii.gz", "label": "./truth/s02.nii.gz"},
        ],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    result = ev.evaluate_dirs(pred_dir, tmp_path / "dataset.json", tmp_path / "out")
    assert {r["name"] for r in result.rows} == {"big", "mid", "tiny"}
    assert len(result.rows) == 6

    spec["test"] = ["./imagesTs/s01.nii.gz"]  # MSD-style test entry without labels
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(ev.EvaluationError, match=r"dataset.json.*'test' entry 0.*no 'label'"):
        ev.evaluate_dirs(pred_dir, tmp_path / "dataset.json", tmp_path / "out2")


def test_missing_and_unmatched_files(case_dirs, tmp_path):
    truth_dir, pred_dir = case_dirs
    os.remove(pred_dir / "s02.nii.gz")
    with pytest.raises(ev.EvaluationError, match=r"no prediction .* truth file\(s\): .*s02\.nii\.gz"):
        ev.evaluate_dirs(pred_dir, truth_dir, tmp_path / "out")
    _save(pred_dir / "s02.nii.gz", _phantom())
    _save(pred_dir / "extra.nii", _phantom())
    with pytest.raises(ev.EvaluationError, match=r"prediction file\(s\) with no truth .*extra\.nii"):
        ev.evaluate_dirs(pred_dir, truth_dir, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ev.evaluate_dirs(pred_dir, tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_grids_name_both_files(case_dirs, tmp_path):
    truth_dir, pred_dir = case_dirs
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    _save(pred_dir / "s01.nii.gz", _phantom(), affine=shifted)
    with pytest.raises(ev.EvaluationError, match=r"affines.*pred/s01\.nii\.gz.*truth/s01\.nii\.gz"):
        ev.evaluate_dirs(pred_dir, truth_dir, tmp_path / "out")
    _save(pred_dir / "s01.nii.gz", np.zeros((16, 16, 15)))
    with pytest.raises(ev.EvaluationError, match=r"grids differ: prediction .*pred/s01\.nii\.gz.*truth/s01\.nii\.gz"):
        ev.evaluate_dirs(pred_dir, truth_dir, tmp_path / "out")


def test_label_ids_outside_names_rejected(case_dirs, tmp_path):
    truth_dir, pred_dir = case_dirs
    with pytest.raises(ev.EvaluationError, match=r"s01\.nii\.gz: label ids \[3\]"):
        ev.evaluate_dirs(pred_dir, truth_dir, tmp_path / "out", label_names={1: "big", 2: "mid"})
