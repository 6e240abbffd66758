"""The full-resolution recipe for tiny structures: cropping to the head, patch oversampling,
the poly schedule, and sliding-window validation that matches what `predict` writes."""

import csv
import math

import keras
import nibabel as nib
import numpy as np
import pytest

from tf_explog.builders import TrainingSetup, learning_rate, make_optimizer
from tf_explog.config import ConfigError, config_from_dict
from tf_explog.data.cache import VolumeCache
from tf_explog.data.nifti import load_volume, save_array, save_like
from tf_explog.data.preprocess import Preprocessor, invert_labels


def _oblique_affine(spacing, degrees=20.0):
    """Anisotropic voxels, rotated about z, with the first axis flipped (no RAS axis order)."""
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing) @ np.diag([-1, 1, 1])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    return affine


def test_crop_to_the_head_and_write_back_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    shape, spacing = (40, 36, 30), (0.9, 1.3, 2.0)
    image = np.zeros(shape, np.float32)  # background exactly 0 outside the "head"
    head = (slice(9, 31), slice(5, 27), slice(4, 22))
    image[head] = rng.uniform(50, 100, size=image[head].shape)
    labels = np.zeros(shape, np.uint8)
    labels[12:20, 8:14, 6:10] = 1
    labels[25, 20, 15] = 2  # a one-voxel structure
    affine = _oblique_affine(spacing)
    save_array(image, affine, tmp_path / "img.nii.gz")
    save_array(labels, affine, tmp_path / "lab.nii.gz")
    vol = load_volume(tmp_path / "img.nii.gz")
    lab = load_volume(tmp_path / "lab.nii.gz", kind="label")

    margin = 3.0
    prep = Preprocessor(crop_foreground=True, crop_margin=margin)
    img_p, lab_p, record = prep.forward(vol, lab)
    # Independent box: nonzero voxels of the canonical image, grown by ceil(margin / spacing).
    nz = np.nonzero(vol.array[..., 0])
    grow = [math.ceil(margin / s) for s in vol.spacing]
    lo = [max(0, int(a.min()) - g) for a, g in zip(nz, grow)]
    hi = [min(n, int(a.max()) + 1 + g) for a, n, g in zip(nz, vol.spatial_shape, grow)]
    assert img_p.shape[:3] == tuple(h - l for l, h in zip(lo, hi))
    assert img_p.shape[:3] != vol.spatial_shape  # something was cropped
    np.testing.assert_array_equal(
        lab_p, lab.array[tuple(slice(a, b) for a, b in zip(lo, hi))])
    # The cropped grid's affine is the input's, shifted by the crop.
    shifted = np.asarray(vol.affine) @ np.array(
        [[1, 0, 0, lo[0]], [0, 1, 0, lo[1]], [0, 0, 1, lo[2]], [0, 0, 0, 1]])
    np.testing.assert_allclose(record["output_affine"], shifted, atol=1e-6)

    back = invert_labels(lab_p, record)
    np.testing.assert_array_equal(back, lab.array)
    out = save_like(back, vol, tmp_path / "pred.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)


def test_crop_threshold_ignores_background_noise_and_bad_options_are_named():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 5, size=(30, 30, 30)).astype(np.float32)  # noisy background
    image[10:20, 8:22, 12:18] = 100.0
    prep = Preprocessor(crop_foreground=True, crop_threshold=0.2, crop_margin=0.0,
                        normalization=None)
    out, _, _ = prep.forward(image, spacing=(1.0, 1.0, 1.0))
    assert out.shape[:3] == (10, 14, 6)
    nonzero = Preprocessor(crop_foreground=True, crop_margin=0.0, normalization=None)
    assert nonzero.forward(image, spacing=(1.0, 1.0, 1.0))[0].shape[:3] == (30, 30, 30)
    for bad in ({"crop_threshold": 1.5}, {"crop_margin": -1}, {"crop_foreground": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Preprocessor(**bad)


def test_patch_sampler_hits_a_one_voxel_structure_at_the_configured_rate(tmp_path):
    shape, patch, voxel, oversample = (64, 16, 16), np.array([8, 8, 8]), (5, 7, 9), 0.5
    labels = np.zeros(shape, np.uint8)
    labels[voxel] = 1
    labels[50:60, 2:14, 2:14] = 2  # far away: a patch centred on it never reaches x = 5
    image = labels.astype(np.float32) + 1.0
    save_array(image, np.eye(4), tmp_path / "img.nii.gz")
    save_array(labels, np.eye(4), tmp_path / "lab.nii.gz")
    entry = VolumeCache(tmp_path / "cache", Preprocessor(normalization=None)).entry(
        tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    rng = np.random.default_rng(3)
    draws = 4000
    hits = sum(int(entry.sample_patch(patch, rng, oversample)[1].__eq__(1).any())
               for _ in range(draws))
    # Expected rate, worked out independently: the one-voxel label is chosen with probability
    # oversample / 2 (two foreground labels present), and a uniformly placed patch (start in
    # [0, n - p] per axis) covers the voxel with probability prod(#starts covering / #starts).
    uniform = np.prod([len(set(range(max(0, v - p + 1), v + 1)) & set(range(n - p + 1)))
                       / (n - p + 1) for v, p, n in zip(voxel, patch, shape)])
    expected = oversample / 2 + (1 - oversample) * uniform
    sigma = math.sqrt(expected * (1 - expected) / draws)
    assert abs(hits / draws - expected) < 4 * sigma, (hits / draws, expected)
    assert hits / draws > 0.2  # without oversampling it would be ~0.002


def test_poly_schedule_matches_its_formula():
    config = config_from_dict({"name": "p", "data": {"dataset": "d.json"}, "train": {
        "epochs": 5, "steps_per_epoch": 4, "learning_rate": 0.01, "lr_schedule": "poly",
        "lr_poly_power": 0.9}})
    schedule = learning_rate(config)
    total = 5 * 4
    for step in (0, 1, 7, 19, 20, 25):
        want = 0.01 * max(0.0, 1 - min(step, total) / total) ** 0.9
        assert float(keras.ops.convert_to_numpy(schedule(step))) == pytest.approx(
            want, rel=1e-5, abs=1e-9)
    # A short fit: the optimizer's rate follows the schedule by its own iteration count.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    optimizer = make_optimizer(config)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.ones((6, 3)), np.zeros((6, 1)), batch_size=2, epochs=1, verbose=0)
    assert int(optimizer.iterations) == 3
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(
        0.01 * (1 - 3 / total) ** 0.9, rel=1e-5)
    no_steps = config_from_dict({"name": "p", "data": {"dataset": "d.json"},
                                 "train": {"lr_schedule": "poly"}})
    with pytest.raises(ConfigError, match="steps per epoch"):
        learning_rate(no_steps)
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        config_from_dict({"name": "p", "data": {"dataset": "d.json"},
                          "train": {"lr_schedule": "cosine"}})


def test_sliding_window_validation_equals_predict_on_the_same_volumes(tmp_path):
    from helpers import write_two_structure_dataset

    from tf_explog.inference import predict_files
    from tf_explog.training import train

    dataset = write_two_structure_dataset(tmp_path / "data", subjects=4)
    config = config_from_dict({
        "name": "patches", "seed": 2, "runs_dir": str(tmp_path / "runs"),
        "data": {"dataset": str(dataset), "validation_fraction": 0.5, "mode": "patch",
                 "patch_size": [16, 16, 16], "oversample": 0.5,
                 "preprocess": {"crop_foreground": False}, "augment": {"enabled": False}},
        "model": {"filters": [4, 4, 8, 8, 8], "encoder_depths": [1, 1, 1, 1, 1],
                  "decoder_depths": [1, 1, 1, 1]},
        "train": {"epochs": 1, "steps_per_epoch": 16, "optimizer": "adam",
                  "learning_rate": 0.01, "lr_schedule": "poly", "verbose": 0,
                  "image_summary_every": 0}})
    result = train(config)
    with open(result.run_dir / "metrics.csv") as f:
        val_dice = float(list(csv.DictReader(f))[-1]["val_dice"])

    # What a user runs: predict on the validation files (the run's patch size as the window),
    # then Dice from voxel counts summed over the volumes, as validation defines it.
    val = TrainingSetup.from_config(config).manifest.entries("validation")
    assert len(val) == 2
    images = tmp_path / "val_images"
    images.mkdir()
    for e in val:
        (images / e.image.name).symlink_to(e.image)
    predict_files(result.run_dir, images, tmp_path / "pred", progress=False)
    tp, pred_sum, true_sum = np.zeros(3), np.zeros(3), np.zeros(3)
    for e in val:
        pred = np.asarray(nib.load(str(tmp_path / "pred" / e.image.name)).dataobj)
        truth = np.asarray(nib.load(str(e.label)).dataobj)
        for k in range(3):
            tp[k] += np.sum((pred == k) & (truth == k))
            pred_sum[k] += np.sum(pred == k)
            true_sum[k] += np.sum(truth == k)
    present = (pred_sum + true_sum)[1:] > 0
    dice = (2 * tp / np.maximum(pred_sum + true_sum, 1))[1:]
    assert dice[0] > 0.1  # a model that segments something: the comparison means something
    assert val_dice == pytest.approx(float(dice[present].mean()), abs=1e-6)


def test_recalibration_patches_look_like_training_patches(tmp_path):
    """Patch-trained models are recalibrated on patches drawn as in training (seeded, the
    same every call), not on tiles of the volume."""
    from tf_explog.data.core import SplitVolumes, clean_patches

    shape, voxel = (64, 16, 16), (5, 7, 9)
    labels = np.zeros(shape, np.uint8)
    labels[voxel] = 1
    image = labels.astype(np.float32) + 1.0
    save_array(image, np.eye(4), tmp_path / "img.nii.gz")
    save_array(labels, np.eye(4), tmp_path / "lab.nii.gz")
    cache = VolumeCache(tmp_path / "cache", Preprocessor(normalization=None))
    volumes = SplitVolumes([(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], cache)
    batches = clean_patches(volumes, (8, 8, 8), oversample=1.0, per_case=5, seed=1)
    first, second = list(batches()), list(batches())
    assert len(first) == 5 and all(p.shape == (1, 8, 8, 8, 1) for p in first)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # oversample=1: every patch is centred on the only structure, so it contains its voxel
    assert all((p == 2.0).any() for p in first)
