"""NIfTI I/O: canonical orientation round trip, save_like, label maps, bad files."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from tf_explog.data import nifti
from tf_explog.labels import LabelError
from tf_explog.data.nifti import (
    LabelMap,
    NiftiError,
    NiftiFileNotFoundError,
    apply_label_map,
    invert_label_map,
    load_volume,
    save_like,
    to_original_orientation,
)

# Axis codes -> affine with spacing (1.5, 2.0, 1.25) along the *file's* axes, origin elsewhere.
AFFINES = {
    # axis 0 -> Left, axis 1 -> Inferior, axis 2 -> Anterior
    "LIA": np.array([[-1.5, 0, 0, 20.0], [0, 0, 1.25, -7.0], [0, -2.0, 0, 11.0], [0, 0, 0, 1]]),
    # axis 0 -> Left, axis 1 -> Posterior, axis 2 -> Superior
    "LPS": np.array([[-1.5, 0, 0, 20.0], [0, -2.0, 0, 9.0], [0, 0, 1.25, -3.0], [0, 0, 0, 1]]),
}


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("codes", ["LIA", "LPS"])
def test_orientation_round_trip(tmp_path, codes):
    rng = np.random.default_rng(1)
    affine = AFFINES[codes]
    assert "".join(nib.aff2axcodes(affine)) == codes
    labels = rng.integers(0, 9, size=(7, 6, 5)).astype(np.int16)
    image = rng.normal(size=(7, 6, 5, 2)).astype(np.float32)
    lab_path = _save(tmp_path / "lab.nii.gz", labels, affine)
    img_path = _save(tmp_path / "img.nii", image, affine)
    file_affine = nib.load(str(lab_path)).affine  # what the header really stores (float32)

    lab = load_volume(lab_path, kind="label")
    img = load_volume(img_path, kind="image")
    assert nib.aff2axcodes(lab.affine) == ("R", "A", "S")
    assert lab.array.dtype == np.int32 and img.array.dtype == np.float32
    assert lab.original_shape == (7, 6, 5) and img.original_shape == (7, 6, 5, 2)
    np.testing.assert_array_equal(lab.original_affine, file_affine)

    # Hand-worked canonical arrays: flip L->R and P->A / I->S, move A to axis 1.
    if codes == "LPS":
        expected = labels[::-1, ::-1, :]
        assert lab.spacing == pytest.approx((1.5, 2.0, 1.25))
    else:  # LIA: canon[i, j, k] = labels[N0-1-i, N1-1-k, j]
        expected = np.transpose(labels[::-1, ::-1, :], (0, 2, 1))
        assert lab.spacing == pytest.approx((1.5, 1.25, 2.0))
    np.testing.assert_array_equal(lab.array, expected)

    # Independently: every voxel keeps its world position.
    idx = np.indices(labels.shape).reshape(3, -1)
    world = file_affine[:3, :3] @ idx + file_affine[:3, 3:4]
    canon = np.linalg.solve(lab.affine[:3, :3], world - lab.affine[:3, 3:4])
    canon = np.rint(canon).astype(int)
    np.testing.assert_array_equal(lab.array[tuple(canon)], labels.reshape(-1))

    # Back to the file's orientation, voxel-exact, and written onto its grid.
    np.testing.assert_array_equal(to_original_orientation(lab.array, lab), labels)
    np.testing.assert_array_equal(to_original_orientation(img.array, img), image)
    out = save_like(lab.array, lab, tmp_path / "out.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    np.testing.assert_array_equal(written.affine, file_affine)
    assert written.shape == labels.shape
    # A probability map [D, H, W, K] goes back with its class axis.
    probs = rng.random(size=(*lab.array.shape, 3)).astype(np.float32)
    save_like(probs, lab, tmp_path / "probs.nii.gz")
    back = nib.load(str(tmp_path / "probs.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj),
                                  nifti.to_original_orientation(probs, lab))
    np.testing.assert_array_equal(back.affine, file_affine)
    assert sorted(os.listdir(tmp_path)) == ["img.nii", "lab.nii.gz", "out.nii.gz", "probs.nii.gz"]


def test_image_channels_and_geometry_from_header(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _save(tmp_path / "a.nii.gz", data, AFFINES["LIA"])
    vol = load_volume(path)
    assert vol.array.shape == (4, 6, 5, 1) and vol.array.dtype == np.float32
    shape, spacing, channels = nifti.canonical_geometry(path)
    assert shape == (4, 6, 5) and channels == 1
    assert spacing == pytest.approx(vol.spacing)


def test_save_like_refuses_overwrite_and_is_atomic(tmp_path, monkeypatch):
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 2, 3] = 5
    ref = load_volume(_save(tmp_path / "ref.nii.gz", lab, np.eye(4)), kind="label")
    target = tmp_path / "seg.nii.gz"
    save_like(ref.array, ref, target)
    with pytest.raises(FileExistsError, match="seg.nii.gz"):
        save_like(ref.array, ref, target)
    save_like(ref.array * 2, ref, target, overwrite=True)
    assert np.asanyarray(nib.load(str(target)).dataobj)[1, 2, 3] == 10
    with pytest.raises(ValueError, match="must end in .nii"):
        save_like(ref.array, ref, tmp_path / "seg.npy")
    with pytest.raises(ValueError, match="spatial shape"):
        save_like(np.zeros((3, 3, 3)), ref, tmp_path / "bad.nii")

    def broken_save(img, filename):
        with open(filename, "wb") as f:  # half a file, then a crash
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_like(ref.array, ref, tmp_path / "new.nii.gz")
    with pytest.raises(OSError, match="disk full"):
        save_like(ref.array * 3, ref, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ref.nii.gz", "seg.nii.gz"]
    assert np.asanyarray(nib.load(str(target)).dataobj)[1, 2, 3] == 10  # old file intact


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(NiftiFileNotFoundError, match="nope.nii.gz: file not found") as info:
        load_volume(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)


def test_truncated_and_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(16, 16, 16)).astype(np.float32)
    good = _save(tmp_path / "good.nii.gz", noise, np.eye(4))
    blob = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(NiftiError, match="trunc.nii.gz"):
        load_volume(trunc)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(NiftiError, match="garbage.nii.gz"):
        load_volume(garbage)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(NiftiError, match="empty.nii"):
        load_volume(empty)


def test_wrong_dimensionality(tmp_path):
    p2 = _save(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32), np.eye(4))
    with pytest.raises(NiftiError, match=r"flat.nii.gz: image has 2 dimensions"):
        load_volume(p2)
    p5 = _save(tmp_path / "five.nii.gz", np.zeros((4, 4, 4, 1, 2), np.float32), np.eye(4))
    with pytest.raises(NiftiError, match=r"five.nii.gz: image has 5 dimensions"):
        load_volume(p5)
    p4 = _save(tmp_path / "multi.nii.gz", np.zeros((4, 4, 4, 2), np.int16), np.eye(4))
    with pytest.raises(NiftiError, match=r"multi.nii.gz: label volume has shape \(4, 4, 4, 2\)"):
        load_volume(p4, kind="label")
    # A 4D label file with a single channel is accepted.
    p41 = _save(tmp_path / "one.nii.gz", np.ones((4, 4, 4, 1), np.int16), np.eye(4))
    assert load_volume(p41, kind="label").array.shape == (4, 4, 4)
    with pytest.raises(ValueError, match="kind"):
        load_volume(p41, kind="mask")


def test_label_dtypes_and_nonfinite_images(tmp_path):
    frac = np.zeros((4, 4, 4), np.float32)
    frac[0, 0, 0] = 1.5
    with pytest.raises(NiftiError, match="frac.nii.gz: label volume holds non-integer values"):
        load_volume(_save(tmp_path / "frac.nii.gz", frac, np.eye(4)), kind="label")
    whole = np.zeros((4, 4, 4), np.float32)
    whole[1, 1, 1] = 3.0
    vol = load_volume(_save(tmp_path / "whole.nii.gz", whole, np.eye(4)), kind="label")
    assert vol.array.dtype == np.int32 and vol.array[1, 1, 1] == 3
    nan = np.zeros((4, 4, 4), np.float32)
    nan[2, 2, 2] = np.nan
    nan[0, 1, 2] = np.inf
    path = _save(tmp_path / "nan.nii.gz", nan, np.eye(4))
    with pytest.raises(NiftiError, match="nan.nii.gz: image contains 2 NaN/Inf"):
        load_volume(path)
    assert np.isnan(load_volume(path, allow_nonfinite=True).array[2, 2, 2, 0])


def test_label_map_merge_and_inverse(tmp_path):
    # FreeSurfer-like values: 2/41 white matter, 3/42 cortex, 17 an unmapped structure.
    fs = np.array([[[0, 2, 41], [3, 42, 17]]], dtype=np.int32)
    lm = {1: [2, 41], 2: [3, 42]}
    np.testing.assert_array_equal(apply_label_map(fs, lm), [[[0, 1, 1], [2, 2, 0]]])
    with pytest.raises(LabelError, match=r"aseg.nii.gz: label values not in the label map: 17"):
        apply_label_map(fs, lm, unknown="raise", source="aseg.nii.gz")
    # JSON form (string keys) is the same map.
    assert LabelMap({"1": [2, 41], "2": [3, 42]}) == LabelMap(lm)
    assert LabelMap(lm).num_classes == 3
    np.testing.assert_array_equal(
        invert_label_map(np.array([0, 1, 2, 1]), lm), np.array([0, 2, 3, 2])
    )
    with pytest.raises(ValueError, match=r"classes \[5\] are not in the label map"):
        invert_label_map(np.array([5]), lm)
    with pytest.raises(ValueError, match="listed under both class 1 and 2"):
        LabelMap({1: [2], 2: [2]})
    with pytest.raises(ValueError, match="not an integer class index"):
        LabelMap({"wm": [2]})
    with pytest.raises(ValueError, match="unknown_labels must be one of"):
        apply_label_map(fs, lm, unknown="ignore")
    # Through load_volume, on a file in a non-canonical orientation.
    path = _save(tmp_path / "aseg.nii.gz", fs.astype(np.int16), AFFINES["LPS"])
    vol = load_volume(path, kind="label", label_map=lm)
    np.testing.assert_array_equal(to_original_orientation(vol.array, vol), [[[0, 1, 1], [2, 2, 0]]])
    with pytest.raises(LabelError, match="aseg.nii.gz: label values not in the label map: 17"):
        load_volume(path, kind="label", label_map=lm, unknown="raise")
