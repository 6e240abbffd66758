"""Real anatomy: MR-like images from label maps, the Otsu head crop, and a network that
works at half resolution but predicts (and learns) at the labels' own grid.

Small sizes only; nothing here reads ../shared (the suite must pass without it): label maps
are drawn in the tests.
"""

import hashlib
import json

import keras
import nibabel as nib
import numpy as np
import pytest

from helpers import run_saving_test
from tf_explog.data.label_synthesis import (T1_MEANS, synthesize_from_label_maps,
                                            synthesize_image)
from tf_explog.data.manifest import Manifest
from tf_explog.data.preprocess import Preprocessor, foreground_box
from tf_explog.errors import InputError
from tf_explog.layers import LinearUpsampling3D
from tf_explog.models import build_model, spatial_divisor


def _label_map_volume(shape=(40, 36, 32)):
    """A toy 'head': air (0), head tissue (600) around a brain of white matter (2), cortex
    (3), a ventricle (4) and a thin 'optic chiasm' (85) two voxels thick."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    r = np.sqrt((grid ** 2).sum(-1))
    labels = np.zeros(shape, np.int32)
    labels[r < 0.9] = 600
    labels[r < 0.75] = 3
    labels[r < 0.6] = 2
    labels[r < 0.2] = 4
    cx = shape[0] // 2
    labels[cx:cx + 2, 10:22, 8:14] = 85
    return labels


def _interior(mask, depth=2):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=depth)


# ------------------------------------------------------------------ synthesis


def test_intensities_per_structure_match_the_requested_means():
    labels = _label_map_volume()
    image, means = synthesize_image(labels, (1.0, 1.0, 1.0), seed=3, noise=0.0, bias=0.0,
                                    std=0.02, jitter=0.05)
    assert image.dtype == np.float32 and image.shape == labels.shape
    assert set(means) == {0, 2, 3, 4, 85, 600}
    for i in (2, 3, 4):
        # the subject's mean is the T1 default within the jitter ...
        assert abs(means[i] / T1_MEANS[i] - 1.0) <= 0.05 + 1e-9
        # ... and the image shows it inside the structure (blur only touches the borders;
        # within-label std 2 % of 110 = 2.2 over hundreds of voxels)
        inside = _interior(labels == i)
        assert abs(float(image[inside].mean()) - means[i]) < 1.0, i
    assert 10.0 <= means[600] <= 150.0  # unknown ids (head tissue): random per subject
    # without texture and noise the air stays exactly 0 (only blur reaches it, at the head)
    flat, _ = synthesize_image(labels, (1.0, 1.0, 1.0), seed=3, noise=0.0, bias=0.0, std=0.0)
    assert float(np.abs(flat[_interior(labels == 0, 2)]).max()) < 0.05


def test_noise_reaches_the_air_and_the_same_seed_gives_the_same_image():
    labels = _label_map_volume((24, 24, 24))
    a, _ = synthesize_image(labels, (1.0, 1.0, 1.0), seed=[5, 1])
    b, _ = synthesize_image(labels, (1.0, 1.0, 1.0), seed=[5, 1])
    c, _ = synthesize_image(labels, (1.0, 1.0, 1.0), seed=[5, 2])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert float(a[labels == 0].min()) > 0.0  # noise everywhere, the air included
    plain, _ = synthesize_image(labels, (1.0, 1.0, 1.0), seed=1, std=0.0, bias=0.0)
    air = plain[_interior(labels == 0, 2)]
    # Rician noise of sigma 0.03 * 110 = 3.3 on a zero signal is Rayleigh:
    # mean sigma * sqrt(pi / 2) = 4.14
    assert float(air.mean()) == pytest.approx(3.3 * np.sqrt(np.pi / 2), rel=0.05)


def test_random_contrast_and_bad_arguments_are_named():
    labels = _label_map_volume((16, 16, 16))
    _, means = synthesize_image(labels, (1, 1, 1), seed=0, contrast="random")
    assert all(0.0 <= m <= 200.0 for m in means.values())
    with pytest.raises(InputError, match="contrast"):
        synthesize_image(labels, (1, 1, 1), seed=0, contrast="t2")
    with pytest.raises(InputError, match="noise"):
        synthesize_image(labels, (1, 1, 1), seed=0, noise=-1)
    with pytest.raises(InputError, match="3-D integer"):
        synthesize_image(labels.astype(np.float32), (1, 1, 1), seed=0)


def _write_maps(folder, count=3):
    folder.mkdir()
    affine = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -18], [0, -1.0, 0, 16], [0, 0, 0, 1]])
    for i in range(count):
        labels = np.roll(_label_map_volume((24, 24, 24)), i, axis=0).astype(np.float32)
        nib.save(nib.Nifti1Image(labels, affine), str(folder / f"brain_{i + 1:02d}.nii.gz"))
    (folder / "label_map.json").write_text(json.dumps({"1": [2], "2": [3], "3": [4, 43],
                                                       "4": [85]}))
    (folder / "labels.json").write_text(json.dumps(
        {"0": "background", "1": "white-matter", "2": "cortex", "3": "ventricle",
         "4": "optic-chiasm"}))
    return folder


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_data_set_from_label_maps_keeps_labels_and_loads(tmp_path):
    maps = _write_maps(tmp_path / "maps")
    out = synthesize_from_label_maps(maps, tmp_path / "data", test_subjects=1, seed=4,
                                     workers=2)
    data = tmp_path / "data"
    assert (out["num_training"], out["num_test"]) == (2, 1)
    for i, split in ((1, "Tr"), (2, "Tr"), (3, "Ts")):
        name = f"brain_{i:02d}.nii.gz"
        # label files unchanged, byte for byte; images on the same grid
        assert _digest(data / f"labels{split}" / name) == _digest(maps / name)
        image = nib.load(str(data / f"images{split}" / name))
        np.testing.assert_allclose(image.affine, nib.load(str(maps / name)).affine)
        assert image.shape == (24, 24, 24)
    manifest = Manifest.load(data / "dataset.json", unknown_labels="background")
    assert {int(k): v for k, v in manifest.label_map.items()} == {1: [2], 2: [3], 3: [4, 43],
                                                                 4: [85]}
    assert manifest.labels[4] == "optic-chiasm" and len(manifest.test) == 1
    assert json.loads((data / "label_map.json").read_text())["4"] == [85]
    # one worker writes the same images (each subject depends on its own seed only)
    synthesize_from_label_maps(maps, tmp_path / "data1", test_subjects=1, seed=4, workers=1)
    for name in ("imagesTr/brain_01.nii.gz", "imagesTs/brain_03.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(str(data / name)).dataobj),
                                      np.asarray(nib.load(str(tmp_path / "data1" / name)).dataobj))
    with pytest.raises(InputError, match="not empty"):
        synthesize_from_label_maps(maps, data)
    assert _digest(data / "labelsTr" / "brain_01.nii.gz") == _digest(maps / "brain_01.nii.gz")


def test_cli_synth_from_label_maps(tmp_path, capsys):
    from tf_explog import cli

    maps = _write_maps(tmp_path / "maps", count=2)
    assert cli.main(["synth", "--from-label-maps", str(maps), "--out", str(tmp_path / "d"),
                     "--workers", "1", "--spacing", "2.0"]) == 0
    assert (tmp_path / "d" / "imagesTr" / "brain_02.nii.gz").is_file()
    assert cli.main(["synth", "--from-label-maps", str(tmp_path / "nothing"),
                     "--out", str(tmp_path / "e")]) == 2
    assert "nothing" in capsys.readouterr().err


# ------------------------------------------------------------------ head crop


def _noisy_head(shape=(48, 44, 40), seed=0):
    """An ellipsoidal head (bright scalp, darker skull ring, brain) in Rician air noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre, radii = np.array([24, 20, 22]), np.array([15, 13, 12])
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(-1))
    image = np.zeros(shape, np.float32)
    image[r < 1.0] = 120.0   # scalp
    image[r < 0.85] = 15.0   # skull: as dark as air in T1
    image[r < 0.75] = 80.0   # brain
    real = image + rng.normal(0, 6.0, shape)
    noisy = np.sqrt(real ** 2 + rng.normal(0, 6.0, shape) ** 2).astype(np.float32)
    head = r < 1.0
    return noisy, head


def _bbox(mask):
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(int(i[0]) for i in idx), tuple(int(i[-1]) + 1 for i in idx)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0)])
def test_otsu_crop_lands_within_a_few_voxels_of_a_noisy_head(spacing):
    image, head = _noisy_head()
    lo_h, hi_h = _bbox(head)
    margin = 4.0 * spacing[0]  # 4 voxels
    lo, hi = foreground_box(image, spacing, margin_mm=margin, method="otsu")
    for axis in range(3):
        assert abs((lo_h[axis] - 4) - lo[axis]) <= 2, (axis, lo, lo_h)
        assert abs(min(image.shape[axis], hi_h[axis] + 4) - hi[axis]) <= 2, (axis, hi, hi_h)
    # a threshold at 5 % of the 99.5th percentile passes the noise in the air: no crop
    assert foreground_box(image, spacing, 0.05, margin) == ((0, 0, 0), image.shape)


def test_otsu_crop_is_recorded_and_inverted_by_the_preprocessor():
    image, head = _noisy_head()
    prep = Preprocessor(crop_foreground=True, crop_method="otsu", crop_margin=2.0,
                        normalization=None)
    labels = head.astype(np.int32)
    out, lab, record = prep.forward(image, labels, spacing=(1.0, 1.0, 1.0))
    assert out.shape[:3] != image.shape and lab.sum() == labels.sum()  # the head is kept
    assert any(step["op"] == "crop_foreground" for step in record["steps"])
    np.testing.assert_array_equal(prep.invert_labels(lab, record), labels)
    with pytest.raises(ValueError, match="crop_method"):
        Preprocessor(crop_method="kmeans")


# ------------------------------------------------------------------ a network at half resolution


def _linear_upsample_reference(x, factor):
    """float64 linear interpolation between voxel centres, edges repeated."""
    out = x.astype(np.float64)
    for axis in (1, 2, 3):
        n = out.shape[axis]
        coords = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
        lo = np.floor(coords).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1] * out.ndim
        shape[axis] = -1
        w = (coords - lo).reshape(shape)
        out = np.take(out, lo, axis) * (1 - w) + np.take(out, hi, axis) * w
    return out


@pytest.mark.parametrize("factor", [2, 4])
def test_linear_upsampling_matches_reference_and_serialises(factor):
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3, 3)).astype(np.float32)
    layer = LinearUpsampling3D(factor)
    got = np.asarray(layer(x))
    np.testing.assert_allclose(got, _linear_upsample_reference(x, factor), atol=1e-5)
    clone = LinearUpsampling3D.from_config(layer.get_config())
    assert clone.factor == factor
    with pytest.raises(ValueError, match="power of 2"):
        LinearUpsampling3D(3)


def test_soft_coarse_prediction_keeps_a_thin_structure_that_nearest_labels_lose():
    # The reason for input_downsample: a structure two fine voxels thick (the optic chiasm at
    # 1 mm) seen at a grid twice as coarse. A network trained on coarse nearest-neighbour
    # labels can at best reproduce them; one trained through LinearUpsampling3D against the
    # fine labels can reproduce the partial volumes.
    fine = np.zeros((1, 32, 32, 32), np.int32)
    # three fine voxels thick (rows 15-17): coarse voxel 7 (rows 14-15) is half slab, coarse
    # voxel 8 (rows 16-17) all slab
    fine[0, 15:18, 8:24, 10:22] = 1
    one_hot = np.eye(2, dtype=np.float32)[fine]
    coarse_soft = one_hot.reshape(1, 16, 2, 16, 2, 16, 2, 2).mean((2, 4, 6))
    coarse_nearest = fine[:, ::2, ::2, ::2]

    def dice(pred):
        t = fine[0] == 1
        return 2 * (t & pred).sum() / (t.sum() + pred.sum())

    soft_up = np.asarray(LinearUpsampling3D(2)(coarse_soft))[0].argmax(-1) == 1
    nearest_up = np.repeat(np.repeat(np.repeat(coarse_nearest[0], 2, 0), 2, 1), 2, 2) == 1
    assert dice(soft_up) > 0.9
    assert dice(nearest_up) < 0.85


def test_model_at_half_resolution_predicts_on_the_input_grid(tmp_path):
    model = build_model(input_shape=(None, None, None, 1), num_classes=3,
                        filters=(4, 8, 8, 8, 8), aux_outputs=2, input_downsample=2, seed=0)
    assert spatial_divisor(model) == 32
    assert spatial_divisor(build_model(num_classes=3, filters=(4, 8, 8, 8, 8))) == 16
    x = np.random.default_rng(1).normal(size=(1, 32, 64, 32, 1)).astype(np.float32)
    out = model(x, training=False)
    assert tuple(out["segmentation"].shape) == (1, 32, 64, 32, 3)
    assert tuple(out["aux_1"].shape) == (1, 8, 16, 8, 3)  # 1 / (2 * 2) of the input
    np.testing.assert_allclose(np.asarray(out["segmentation"]).sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(np.zeros((1, 48, 32, 32, 1), np.float32))
    loaded = run_saving_test(model, x, tmp_path, atol=1e-6)
    assert spatial_divisor(loaded) == 32
    with pytest.raises(ValueError, match="input_downsample"):
        build_model(input_downsample=3)


def test_config_checks_input_downsample_against_the_patch_size():
    from tf_explog.config import Config, ConfigError

    config = Config()
    config.data.dataset = "d.json"
    config.model.input_downsample = 2
    with pytest.raises(ConfigError, match="data.mode: patch"):
        config.validate()
    config.data.mode = "patch"
    config.data.patch_size = [48, 64, 64]
    with pytest.raises(ConfigError, match="multiples of 32"):
        config.validate()
    config.data.patch_size = [64, 64, 64]
    config.validate()


def test_learning_through_the_upsampling_recovers_a_thin_structure_at_the_fine_grid():
    # Quality, not strings, and the mechanism itself: free coarse logits (what a network at
    # half resolution can output) are fitted by gradient descent through LinearUpsampling3D
    # against the *fine* labels of a slab three fine voxels thick, and reproduce it at the
    # fine grid; the same logits fitted to coarse nearest-neighbour labels cannot.
    import tensorflow as tf

    from tf_explog.losses import DiceCELoss

    fine = np.zeros((1, 16, 16, 16), np.int32)
    fine[0, 7:10, 3:13, 4:12] = 1
    coarse_nearest = fine[:, ::2, ::2, ::2]
    up = LinearUpsampling3D(2)
    loss = DiceCELoss(from_logits=True, include_background=True)

    def fit(target, through_upsampling):
        logits = tf.Variable(tf.zeros((1, 8, 8, 8, 2)))
        opt = keras.optimizers.Adam(0.1)
        for _ in range(150):
            with tf.GradientTape() as tape:
                value = loss(target, up(logits) if through_upsampling else logits)
            opt.apply_gradients([(tape.gradient(value, logits), logits)])
        return logits

    def dice(pred):
        t = fine[0] == 1
        return 2 * (t & pred).sum() / (t.sum() + pred.sum())

    soft = np.asarray(up(fit(fine, True)))[0].argmax(-1) == 1
    hard = np.asarray(fit(coarse_nearest, False))[0].argmax(-1) == 1
    hard_up = np.repeat(np.repeat(np.repeat(hard, 2, 0), 2, 1), 2, 2)
    assert dice(soft) > 0.95, dice(soft)
    assert dice(hard_up) < 0.85, dice(hard_up)
