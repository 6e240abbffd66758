"""Preprocessing: resampling, padding/cropping, normalisation, exact inversion."""

import json

import nibabel as nib
import numpy as np
import pytest

from tf_explog.data.nifti import load_volume
from tf_explog.data.preprocess import Preprocessor, invert_labels, invert_probabilities


def _blobs(shape, ids, seed=0):
    """Label map of axis-aligned boxes, one per id, on background 0."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for i in ids:
        lo = [int(rng.integers(0, s - 3)) for s in shape]
        size = [int(rng.integers(2, max(3, s // 2))) for s in shape]
        lab[tuple(slice(a, a + b) for a, b in zip(lo, size))] = i
    return lab


def test_nearest_upsampling_keeps_ids_and_spacing():
    lab = _blobs((8, 6, 5), [3, 7, 12])
    img = np.random.default_rng(1).normal(size=lab.shape).astype(np.float32)
    pre = Preprocessor(target_spacing=1.0, normalization=None)
    out_img, out_lab, rec = pre.forward(img, lab, spacing=(2.0, 2.0, 2.0))
    # Factor 2 exactly: nearest = repeat every voxel twice along each axis.
    expected = np.repeat(np.repeat(np.repeat(lab, 2, 0), 2, 1), 2, 2)
    np.testing.assert_array_equal(out_lab, expected)
    assert set(np.unique(out_lab)) == set(np.unique(lab))
    assert rec["output_spacing"] == pytest.approx([1.0, 1.0, 1.0])
    assert rec["input_spacing"] == [2.0, 2.0, 2.0]
    # Output voxel j sits at input coordinate (j + 0.5) / 2 - 0.5: affine diag 1, offset -0.25 mm.
    aff = np.asarray(rec["output_affine"])
    np.testing.assert_allclose(aff[:3, :3], np.eye(3))
    np.testing.assert_allclose(aff[:3, 3], [2.0 * -0.25] * 3)
    # Linear interpolation of a ramp is the ramp at the new centres (away from the clamped edge).
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 6, 5)).copy()
    out, _, _ = pre.forward(ramp, spacing=(2.0, 2.0, 2.0))
    j = np.arange(1, 15)
    np.testing.assert_allclose(out[1:15, 3, 3, 0], (j + 0.5) / 2 - 0.5, atol=1e-5)


def test_anisotropic_resampling_to_min_spacing():
    lab = _blobs((12, 10, 6), [1, 2, 5])
    img = lab.astype(np.float32)
    pre = Preprocessor(target_spacing="min", normalization=None)
    _, out_lab, rec = pre.forward(img, lab, spacing=(1.0, 1.5, 2.5))
    assert out_lab.shape == (12, 15, 15)
    assert rec["output_spacing"] == pytest.approx([1.0, 1.0, 1.0])
    assert set(np.unique(out_lab)) == set(np.unique(lab))
    assert pre.output_shape((12, 10, 6), (1.0, 1.5, 2.5)) == (12, 15, 15)
    np.testing.assert_array_equal(invert_labels(out_lab, rec), lab)


def test_paper_preset_forward_invert_is_exact(tmp_path):
    # A real file in LPS orientation with anisotropic voxels, as the cache would see it.
    rng = np.random.default_rng(2)
    lab = _blobs((20, 16, 12), [1, 2, 3, 4], seed=3)
    img = (lab * 10 + rng.normal(size=lab.shape)).astype(np.float32)
    affine = np.diag([-1.0, -1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(img, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), affine), str(tmp_path / "lab.nii.gz"))
    image = load_volume(tmp_path / "img.nii.gz")
    labels = load_volume(tmp_path / "lab.nii.gz", kind="label")

    pre = Preprocessor.paper(size=32)
    assert pre.target_spacing == "min" and pre.pad_to_cube and pre.resize_shape == (32, 32, 32)
    x, y, rec = pre.forward(image, labels)
    assert x.shape == (32, 32, 32, 1) and x.dtype == np.float32
    assert y.shape == (32, 32, 32) and y.dtype == np.int32
    assert [s["op"] for s in rec["steps"]] == ["resample", "pad_to_cube", "resize"]
    assert rec["steps"][0]["out_shape"] == [20, 24, 24]
    assert rec["steps"][1]["before"] == [2, 0, 0] and rec["steps"][1]["after"] == [2, 0, 0]
    assert rec["output_spacing"] == pytest.approx([0.75] * 3)
    json.dumps(rec)  # JSON-able
    # The record survives a JSON round trip and inverts exactly (shape and every voxel).
    rec = json.loads(json.dumps(rec))
    back = invert_labels(y, rec)
    assert back.shape == labels.array.shape
    np.testing.assert_array_equal(back, labels.array)
    # Probabilities: one-hot of the labels come back with the right argmax and sum 1.
    probs = invert_probabilities(np.eye(5, dtype=np.float32)[y], rec)
    assert probs.shape == (*labels.array.shape, 5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # z-score over the whole padded cube (float64 reference).
    assert float(np.mean(x, dtype=np.float64)) == pytest.approx(0.0, abs=1e-5)
    assert float(np.std(x, dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)


def test_crop_pad_and_inverse_fill():
    lab = _blobs((10, 8, 6), [1, 2], seed=5)
    pre = Preprocessor(target_shape=(6, 12, 6), normalization=None)
    x, y, rec = pre.forward(lab.astype(np.float32), lab)
    assert y.shape == (6, 12, 6)
    np.testing.assert_array_equal(y[:, 2:10, :], lab[2:8])  # crop 2+2 on axis 0, pad 2+2 on axis 1
    assert not y[:, :2].any() and not y[:, 10:].any()
    back = invert_labels(y, rec)
    expected = lab.copy()
    expected[:2] = 0
    expected[8:] = 0
    np.testing.assert_array_equal(back, expected)
    probs = invert_probabilities(np.eye(3, dtype=np.float32)[y], rec)
    np.testing.assert_array_equal(probs[0, 0, 0], [1.0, 0.0, 0.0])  # cropped region: background
    np.testing.assert_array_equal(probs.argmax(-1)[2:8], lab[2:8])
    with pytest.raises(ValueError, match="does not match the preprocessed shape"):
        invert_labels(lab, rec)


def test_intensity_normalisation_and_clipping():
    rng = np.random.default_rng(4)
    img = np.zeros((12, 12, 12, 2), np.float32)
    img[2:10, 2:10, 2:10] = rng.gamma(2.0, 3.0, size=(8, 8, 8, 2)) + 1.0
    x, _, rec = Preprocessor(normalization="zscore_nonzero").forward(img)
    inside = img[..., 0] != 0
    ref = img[..., 0][inside].astype(np.float64)
    np.testing.assert_allclose(x[..., 0][inside], (ref - ref.mean()) / ref.std(), atol=1e-5)
    assert not x[..., 0][~inside].any()
    ch1 = img[..., 1].astype(np.float64)
    assert rec["intensity"]["mean"][1] == pytest.approx(ch1[ch1 != 0].mean(), rel=1e-6)

    x, _, rec = Preprocessor(normalization=None, clip_percentiles=(5, 95)).forward(img)
    lo, hi = np.percentile(img[..., 0].astype(np.float64), [5, 95])
    np.testing.assert_allclose(x[..., 0], np.clip(img[..., 0], lo, hi), rtol=1e-6)
    assert rec["intensity"]["clip"][0] == pytest.approx([lo, hi])

    x, _, _ = Preprocessor(normalization="zscore").forward(img)
    ref = img[..., 1].astype(np.float64)
    np.testing.assert_allclose(x[..., 1], (ref - ref.mean()) / ref.std(), atol=1e-5)
    # A constant image does not divide by zero.
    x, _, _ = Preprocessor().forward(np.full((4, 4, 4), 7.0, np.float32))
    assert np.all(x == 0)


def test_label_map_option_and_input_checks():
    lab = np.array([0, 2, 41, 3, 42, 99], np.int32).reshape(1, 2, 3)
    img = np.zeros((1, 2, 3), np.float32)
    _, y, rec = Preprocessor(label_map={1: [2, 41], 2: [3, 42]}).forward(img, lab)
    np.testing.assert_array_equal(y.ravel(), [0, 1, 1, 2, 2, 0])
    assert rec["label_map"] == {"1": [2, 41], "2": [3, 42]}
    with pytest.raises(ValueError, match=r"not in the label map: 99"):
        Preprocessor(label_map={1: [2, 41], 2: [3, 42]}, unknown_labels="raise").forward(img, lab)
    with pytest.raises(ValueError, match=r"label shape \(1, 2, 2\) does not match"):
        Preprocessor().forward(img, lab[..., :2])
    with pytest.raises(ValueError, match="NaN/Inf"):
        Preprocessor().forward(np.full((2, 2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="spacing: required"):
        Preprocessor(target_spacing=1.0).forward(img)


def test_image_label_affine_mismatch(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "i.nii"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 1, 1, 1])),
             str(tmp_path / "l.nii"))
    with pytest.raises(ValueError, match=r"l.nii: affine does not match the image .*i.nii"):
        Preprocessor().forward(load_volume(tmp_path / "i.nii"),
                               load_volume(tmp_path / "l.nii", kind="label"))


def test_config_round_trip_fingerprint_and_validation():
    pre = Preprocessor.paper(size=96, image_order=3, clip_percentiles=(0.5, 99.5),
                             label_map={"1": [2, 41]})
    d = json.loads(json.dumps(pre.to_dict()))
    again = Preprocessor.from_dict(d)
    assert again == pre and again.fingerprint() == pre.fingerprint()
    assert len(pre.fingerprint()) == 16
    assert Preprocessor().fingerprint() == Preprocessor().fingerprint()
    assert Preprocessor(image_order=3).fingerprint() != Preprocessor().fingerprint()
    assert Preprocessor(target_shape=32).target_shape == (32, 32, 32)
    with pytest.raises(ValueError, match="unknown option"):
        Preprocessor.from_dict({"target_spacing": 1.0, "spacing": 2})
    bad = [
        ({"target_spacing": "max"}, "target_spacing"),
        ({"target_spacing": -1.0}, "target_spacing"),
        ({"resize_shape": (32, 32)}, "resize_shape"),
        ({"target_shape": 2.5}, "target_shape"),
        ({"image_order": 2}, "image_order"),
        ({"normalization": "minmax"}, "normalization"),
        ({"clip_percentiles": (99, 1)}, "clip_percentiles"),
        ({"preset": "nnunet"}, "preset"),
        ({"unknown_labels": "keep"}, "unknown_labels"),
        ({"label_map": {1: [2], 2: [2]}}, "label_map"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            Preprocessor(**kwargs)
