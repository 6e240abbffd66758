"""Tests of tf_explog.inference: window geometry, Gaussian blending, flip TTA, NIfTI round trip.

Expected values come from hand-worked cases or from NumPy/SciPy computations written here;
the models are tiny (hand-set 1x1x1 / 3x3x3 convolutions, a 4-filter U-Net) on volumes ≤ 40³.
"""

import os

import keras
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from helpers import write_run_dir
from tf_explog.data.preprocess import Preprocessor
from tf_explog.inference import (
    InferenceError,
    gaussian_importance_map,
    output_paths,
    predict_files,
    predict_volume,
    sliding_window_weights,
    window_starts,
)
from tf_explog.models import build_model

THRESHOLD = 0.25
SCALE = 8.0
EDGE_GAIN = 3.0


# ------------------------------------------------------------------------------ models


def _threshold_model():
    """p(label 1) = sigmoid(SCALE * (x - THRESHOLD)): label = (x > THRESHOLD), flip-equivariant."""
    inp = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(2, 1, name="logits")
    x = conv(inp)
    conv.set_weights([np.array([0.0, SCALE], np.float32).reshape(1, 1, 1, 1, 2),
                      np.array([0.0, -SCALE * THRESHOLD], np.float32)])
    return keras.Model(inp, keras.layers.Softmax(name="segmentation")(x))


def _edge_model():
    """3³ mean filter with zero padding, then p1 = sigmoid(EDGE_GAIN * mean): depends on the window."""
    inp = keras.Input((None, None, None, 1))
    mean = keras.layers.Conv3D(1, 3, padding="same", use_bias=False)
    head = keras.layers.Conv3D(2, 1)
    x = head(mean(inp))
    mean.set_weights([np.full((3, 3, 3, 1, 1), 1.0 / 27.0, np.float32)])
    head.set_weights([np.array([0.0, EDGE_GAIN], np.float32).reshape(1, 1, 1, 1, 2),
                      np.zeros(2, np.float32)])
    return keras.Model(inp, keras.layers.Softmax(name="segmentation")(x))


@pytest.fixture(scope="module")
def threshold_model():
    return _threshold_model()


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(1)
    return build_model((None, None, None, 1), num_classes=3, filters=(4, 4, 4, 4, 4),
                       encoder_depths=(1,) * 5, decoder_depths=(1,) * 4, seed=0)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _gaussian(window, sigma_scale=0.125, floor=1e-3):
    """Independent Gaussian importance map: explicit 3D formula on a meshgrid."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in window], indexing="ij")
    expo = sum(((g - (n - 1) / 2) / (sigma_scale * n)) ** 2 for g, n in zip(grids, window))
    g = np.exp(-0.5 * expo)
    return np.maximum(g / g.max(), floor)


# ------------------------------------------------------------------------------ geometry


def test_window_starts_hand_worked():
    assert window_starts(40, 16, 0.5) == [0, 8, 16, 24]
    assert window_starts(24, 16, 0.5) == [0, 8]
    assert window_starts(20, 16, 0.5) == [0, 4]  # 2 windows, spread evenly
    assert window_starts(30, 16, 0.25) == [0, 7, 14]  # ceil(14 / 12) + 1 = 3 windows
    assert window_starts(35, 16, 0.5) == [0, 6, 13, 19]  # step 19/3, rounded
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(32, 16, 0.0) == [0, 16]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(40, 16, 1.0)


def test_gaussian_importance_map_matches_formula():
    g = gaussian_importance_map((16, 16, 32), 0.125)
    ref = _gaussian((16, 16, 32))
    assert g.dtype == np.float32 and g.shape == (16, 16, 32)
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=0)
    assert g.min() == pytest.approx(1e-3)  # corners floored, not 0
    np.testing.assert_array_equal(g, g[::-1, ::-1, ::-1])  # flip-symmetric


def test_sliding_window_weights_sum_at_overlaps():
    shape, window = (40, 24, 16), (16, 16, 16)
    g = _gaussian(window)
    expected = np.zeros(shape)
    for a in (0, 8, 16, 24):  # hand-worked starts: see test_window_starts_hand_worked
        for b in (0, 8):
            expected[a:a + 16, b:b + 16, :] += g
    got = sliding_window_weights(shape, window, overlap=0.5, gaussian_sigma=0.125)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Where two windows overlap along axis 0 only (voxels 8..15 of axis 0, axis 1 in 0..7),
    # the weight is the sum of the two shifted 1D profiles times the other axes' profile.
    assert got[10, 3, 5] == pytest.approx(g[10, 3, 5] + g[2, 3, 5], rel=1e-5)


# ------------------------------------------------------------------------------ predict_volume


def test_sliding_windows_blend_with_gaussian_weights():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 24, 16, 1)).astype(np.float32)
    model = _edge_model()
    got = predict_volume(model, image, window=16, overlap=0.5)
    g = _gaussian((16, 16, 16))
    kernel = np.full((3, 3, 3), 1.0 / 27.0)
    num = np.zeros((40, 24, 16))
    den = np.zeros((40, 24, 16))
    for a in (0, 8, 16, 24):
        for b in (0, 8):
            crop = image[a:a + 16, b:b + 16, :, 0].astype(np.float64)
            p1 = _sigmoid(EDGE_GAIN * ndimage.convolve(crop, kernel, mode="constant", cval=0.0))
            num[a:a + 16, b:b + 16] += g * p1
            den[a:a + 16, b:b + 16] += g
    expected = num / den
    assert got.shape == (40, 24, 16, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got[..., 1], expected, atol=2e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
    # Windows of 3 per call (8 windows: the last call is padded) give the same result.
    batched = predict_volume(model, image, window=16, overlap=0.5, window_batch=3)
    np.testing.assert_allclose(batched, got, atol=1e-6)
    # The window edges matter for this model: whole-volume prediction is different.
    whole = predict_volume(model, image)
    assert np.abs(whole - got).max() > 1e-2


def test_whole_volume_is_the_pointwise_function(threshold_model):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(21, 18, 35, 1)).astype(np.float32)
    expected = _sigmoid(SCALE * (image[..., 0].astype(np.float64) - THRESHOLD))
    whole = predict_volume(threshold_model, image)
    np.testing.assert_allclose(whole[..., 1], expected, atol=1e-6)
    sliding = predict_volume(threshold_model, image, window=16, overlap=0.5, window_batch=2)
    np.testing.assert_allclose(sliding, whole, atol=1e-6)


def test_one_window_covering_the_volume_equals_whole_volume(unet):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(20, 18, 30, 1)).astype(np.float32)
    # Independent: pad at the end to 32³ with the image's minimum (its background after
    # z-scoring; 0 would be the mean tissue intensity), call the model directly, crop.
    padded = np.pad(image, [(0, 12), (0, 14), (0, 2), (0, 0)], constant_values=image.min())
    direct = keras.ops.convert_to_numpy(unet(padded[None], training=False))[0, :20, :18, :30]
    whole = predict_volume(unet, image)
    windowed = predict_volume(unet, image, window=32, overlap=0.5)
    np.testing.assert_allclose(whole, direct, atol=1e-5)
    np.testing.assert_allclose(windowed, whole, atol=1e-6)


def test_flip_tta_is_symmetric(unet, threshold_model):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(20, 18, 24, 1)).astype(np.float32)
    tta = predict_volume(unet, image, tta=True)
    for axis in range(3):
        flipped = predict_volume(unet, np.flip(image, axis), tta=True)
        np.testing.assert_allclose(flipped, np.flip(tta, axis), atol=1e-6)
    # The TTA mean, computed here from the 8 single passes.
    passes = []
    for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
        x = np.flip(image, axes) if axes else image
        p = predict_volume(unet, x)
        passes.append(np.flip(p, axes) if axes else p)
    np.testing.assert_allclose(tta, np.mean(passes, axis=0), atol=1e-6)
    plain = predict_volume(unet, image)
    assert np.abs(tta - plain).max() > 1e-4  # the U-Net with end padding is not flip-equivariant
    # A subset of axes: flips of axis 1 only.
    sub = predict_volume(unet, image, tta=(1,))
    np.testing.assert_allclose(sub, (passes[0] + passes[2]) / 2, atol=1e-6)
    # A flip-equivariant (pointwise) model: TTA changes nothing.
    np.testing.assert_allclose(predict_volume(threshold_model, image, tta=True),
                               predict_volume(threshold_model, image), atol=1e-6)


def test_dict_output_uses_segmentation():
    model = build_model((None, None, None, 1), num_classes=3, filters=(4, 4, 4, 4, 4),
                        encoder_depths=(1,) * 5, decoder_depths=(1,) * 4, aux_outputs=True, seed=0)
    image = np.random.default_rng(4).normal(size=(16, 16, 16, 1)).astype(np.float32)
    direct = keras.ops.convert_to_numpy(model(image[None], training=False)["segmentation"])[0]
    np.testing.assert_allclose(predict_volume(model, image), direct, atol=1e-5)


def test_fixed_size_model_gets_its_window():
    fixed = build_model((16, 16, 16, 1), num_classes=2, filters=(4, 4, 4, 4, 4),
                        encoder_depths=(1,) * 5, decoder_depths=(1,) * 4, seed=0)
    image = np.random.default_rng(5).normal(size=(10, 20, 16, 1)).astype(np.float32)
    assert predict_volume(fixed, image).shape == (10, 20, 16, 2)
    with pytest.raises(InferenceError, match="window"):
        predict_volume(fixed, image, window=32)


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        ({}, (16, 16, 16), r"image: expected \[D, H, W, C\]"),
        ({}, (1, 16, 16, 16, 1), r"image: expected \[D, H, W, C\]"),
        ({}, (16, 16, 16, 2), "2 channel.*expects 1"),
        # the divisor is read from the model's pooling layers (1 here) unless given
        ({"window": 24, "divisor": 16}, (16, 16, 16, 1), "multiples of 16"),
        ({"overlap": 1.0}, (16, 16, 16, 1), "overlap"),
        ({"window_batch": 0}, (16, 16, 16, 1), "window_batch"),
        ({"tta": (0, 3)}, (16, 16, 16, 1), "tta"),
        ({"gaussian_sigma": 0}, (16, 16, 16, 1), "gaussian_sigma"),
    ],
)
def test_predict_volume_bad_input(threshold_model, kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        predict_volume(threshold_model, np.zeros(shape, np.float32), **kwargs)


# ------------------------------------------------------------------------------ files


def _lia_affine(spacing, origin=(10.0, -20.0, 30.0)):
    """File axes: 0 -> Left (-x), 1 -> Inferior (-z), 2 -> Anterior (+y)."""
    s0, s1, s2 = spacing
    return np.array([[-s0, 0, 0, origin[0]],
                     [0, 0, s2, origin[1]],
                     [0, -s1, 0, origin[2]],
                     [0, 0, 0, 1]], dtype=np.float64)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _make_run(root, model, preprocessor, label_names, config=None):
    return write_run_dir(root, model, name="demo", label_names=label_names,
                         preprocessor=preprocessor.to_dict(),
                         config=config or {"data": {"mode": "volume"}})


def _positive_image(shape, seed):
    """Intensities in two well-separated groups (no voxel near the threshold after z-scoring)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(10.0, 20.0, size=shape)
    high = rng.uniform(60.0, 80.0, size=shape)
    return np.where(rng.random(shape) < 0.3, high, low).astype(np.float32)


def test_run_dir_threshold_exact_in_original_orientation(tmp_path, threshold_model):
    shape, spacing = (18, 12, 20), (1.0, 2.5, 1.5)
    data = _positive_image(shape, seed=6)
    affine = _lia_affine(spacing)
    assert nib.aff2axcodes(affine) == ("L", "I", "A")
    src = _write(tmp_path / "subject.nii.gz", data, affine)
    pre = Preprocessor(normalization="zscore_nonzero", pad_to_cube=True,
                       label_map={1: [17, 53]})
    run = _make_run(tmp_path, threshold_model, pre, ["background", "thing"])

    # zscore_nonzero over the (all positive) voxels; the cube padding stays 0 and is cropped.
    z = (data.astype(np.float64) - data.mean(dtype=np.float64)) / data.std(dtype=np.float64)
    assert np.abs(z - THRESHOLD).min() > 1e-3
    expected = np.where(z > THRESHOLD, 17, 0)

    out_dir = tmp_path / "out"
    written = predict_files(run, src, out_dir, progress=False, save_probabilities=True)
    assert written == [out_dir / "subject.nii.gz"]
    out = nib.load(str(written[0]))
    assert out.shape == shape
    np.testing.assert_array_equal(out.affine, nib.load(str(src)).affine)
    assert nib.aff2axcodes(out.affine) == ("L", "I", "A")
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), expected)

    _, prob_path = output_paths(src, out_dir)
    assert prob_path.name == "subject_probabilities.nii.gz"
    probs = np.asanyarray(nib.load(str(prob_path)).dataobj)
    assert probs.shape == shape + (2,) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[..., 1], _sigmoid(SCALE * (z - THRESHOLD)), atol=1e-5)

    # Sliding windows (20³ cube, 16³ windows) with flip TTA: same labels.
    again = predict_files(run, src, tmp_path / "out2", progress=False, tta=True, window=16,
                          window_batch=4)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(again[0])).dataobj), expected)


def test_anisotropic_lia_input_resampled_back_to_its_grid(tmp_path, unet):
    shape, spacing = (20, 9, 14), (1.0, 2.0, 1.5)
    data = _positive_image(shape, seed=7)
    src = _write(tmp_path / "scan.nii", data, _lia_affine(spacing))
    pre = Preprocessor(target_spacing="min", pad_to_cube=True, normalization="zscore")
    run = _make_run(tmp_path, unet, pre, ["bg", "a", "b"],
                    config={"data": {"mode": "patch", "patch_size": [16, 16, 16]}})
    out_dir = tmp_path / "pred"
    written = predict_files(run, tmp_path, out_dir, progress=False, save_probabilities=True)
    assert [p.name for p in written] == ["scan.nii"]
    ref = nib.load(str(src))
    out = nib.load(str(written[0]))
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)
    np.testing.assert_array_equal(out.header.get_zooms(), ref.header.get_zooms())
    labels = np.asanyarray(out.dataobj)
    assert np.issubdtype(labels.dtype, np.integer) and set(np.unique(labels)) <= {0, 1, 2}
    probs = np.asanyarray(nib.load(str(out_dir / "scan_probabilities.nii.gz")).dataobj)
    assert probs.shape == shape + (3,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(probs, -1), labels)  # labels = argmax of probabilities


def test_keras_file_zscore_only(tmp_path, threshold_model):
    data = _positive_image((17, 16, 19), seed=8)
    affine = np.diag([1.2, 1.0, 0.8, 1.0])
    src = _write(tmp_path / "ras.nii.gz", data, affine)
    path = tmp_path / "m.keras"
    threshold_model.save(path)
    z = (data.astype(np.float64) - data.mean(dtype=np.float64)) / data.std(dtype=np.float64)
    written = predict_files(path, src, tmp_path / "o", progress=False)
    out = nib.load(str(written[0]))
    np.testing.assert_array_equal(out.affine, nib.load(str(src)).affine)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), (z > THRESHOLD).astype(int))


def test_overwrite_refusal_leaves_existing_files_untouched(tmp_path, threshold_model):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, seed in (("a.nii.gz", 9), ("b.nii.gz", 10)):
        _write(inputs / name, _positive_image((16, 16, 16), seed), np.eye(4))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / "b.nii.gz"
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="b.nii.gz"):
        predict_files(threshold_model, inputs, out_dir, progress=False)
    assert existing.read_bytes() == b"precious"
    assert sorted(os.listdir(out_dir)) == ["b.nii.gz"]  # a.nii.gz was not written either
    written = predict_files(threshold_model, inputs, out_dir, progress=False, overwrite=True)
    assert [p.name for p in written] == ["a.nii.gz", "b.nii.gz"]
    assert nib.load(str(existing)).shape == (16, 16, 16)
    assert sorted(os.listdir(out_dir)) == ["a.nii.gz", "b.nii.gz"]  # no temporary files left


def test_predict_files_errors(tmp_path, threshold_model):
    good = _write(tmp_path / "good.nii.gz", _positive_image((16, 16, 16), 11), np.eye(4))
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="missing_run"):
        predict_files(tmp_path / "missing_run", good, out, progress=False)
    empty_run = tmp_path / "not_a_run"
    empty_run.mkdir()
    with pytest.raises(FileNotFoundError, match="run.json"):
        predict_files(empty_run, good, out, progress=False)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="corrupt.keras.*could not load"):
        predict_files(corrupt, good, out, progress=False)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt.*run directory or a .keras"):
        predict_files(text, good, out, progress=False)
    with pytest.raises(ValueError, match="notes.txt.*not a NIfTI"):
        predict_files(threshold_model, text, out, progress=False)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no .nii"):
        predict_files(threshold_model, empty_dir, out, progress=False)
    flat = _write(tmp_path / "flat.nii.gz", np.ones((16, 16), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="flat.nii.gz.*3D or 4D"):
        predict_files(threshold_model, flat, out, progress=False)
    two = _write(tmp_path / "two.nii.gz", np.ones((16, 16, 16, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="two.nii.gz.*2 channel"):
        predict_files(threshold_model, two, out, progress=False)
    with pytest.raises(ValueError, match="replace the input"):
        predict_files(threshold_model, good, tmp_path, progress=False, overwrite=True)
    assert not out.exists()  # nothing was written by any failing call
