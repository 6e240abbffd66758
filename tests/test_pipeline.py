"""Volume cache and tf.data pipeline: shapes, dtypes, oversampling, invalidation, atomicity."""

import os

import nibabel as nib
import numpy as np
import pytest

from helpers import write_msd_dataset
from tf_explog.data import cache as cache_mod
from tf_explog.data.cache import VolumeCache
from tf_explog.data.manifest import Manifest, ManifestError
from tf_explog.data.preprocess import Preprocessor

tf = pytest.importorskip("tensorflow")
from tf_explog.data.pipeline import make_dataset  # noqa: E402

SHAPE = (20, 18, 16)
# Alternate orientations so that the canonical shapes differ from the file shapes.
AFFINES = [
    np.diag([1.0, 1.0, 1.0, 1.0]),
    np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]]),  # LIA
]


def _case_labels(i):
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:14, 4:12, 3:11] = 1  # large
    lab[16, 2 + i, 13] = 2  # a single voxel
    return lab


@pytest.fixture
def dataset(tmp_path):
    """Four labelled cases (two orientations) and one test image; returns dataset.json."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(4):
        lab = _case_labels(i)
        img = (rng.normal(size=SHAPE) + 3 * lab).astype(np.float32)
        cases.append((f"c{i}", img, lab, AFFINES[i % 2]))
    return write_msd_dataset(tmp_path, cases, ["background", "big", "tiny"],
                             test=["./imagesTr/c0.nii.gz"])


def _canonical_crop(path, size):
    """Independent reference: nibabel's canonical reorientation, then a centred crop/pad."""
    data = np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.int32)
    out = np.zeros((size,) * 3, np.int32)
    src, dst = [], []
    for n in data.shape:
        d = size - n
        before = d // 2 if d >= 0 else -((-d) // 2)
        src.append(slice(max(-before, 0), max(-before, 0) + min(n, size)))
        dst.append(slice(max(before, 0), max(before, 0) + min(n, size)))
    out[tuple(dst)] = data[tuple(src)]
    return out


def test_volume_mode_shapes_dtypes_and_content(dataset, tmp_path):
    m = Manifest.load(dataset, validation_fraction=0.0)
    ds = make_dataset(m, batch_size=2, shuffle=False, cache_dir=tmp_path / "cache",
                      preprocessor=Preprocessor(target_shape=16))
    assert ds.element_spec[0].shape.as_list() == [None, 16, 16, 16, 1]
    batches = list(ds)
    assert len(batches) == 2
    for image, labels in batches:
        assert image.dtype == tf.float32 and labels.dtype == tf.int32
        assert image.shape == (2, 16, 16, 16, 1) and labels.shape == (2, 16, 16, 16)
    labels = np.concatenate([b[1].numpy() for b in batches])
    for i, e in enumerate(m.entries("training")):
        np.testing.assert_array_equal(labels[i], _canonical_crop(e.label, 16))
    # Shapes that differ cannot be batched: a clear error up front.
    with pytest.raises(ValueError, match="needs equal volume shapes"):
        make_dataset(m, batch_size=2, cache_dir=tmp_path / "cache")
    # Batch 1 streams volumes of any shape; a path works as well as a Manifest.
    shapes = {tuple(x.shape) for x, _ in make_dataset(str(dataset), cache_dir=tmp_path / "cache",
                                                       split="all")}
    assert shapes == {(1, 20, 18, 16, 1), (1, 20, 16, 18, 1)}
    # The test split has no labels: images only.
    (image,) = list(make_dataset(m, split="test", cache_dir=tmp_path / "cache"))
    assert image.shape == (1, 20, 18, 16, 1)


def test_labels_for_auxiliary_outputs(dataset, tmp_path):
    # Every output gets the full-resolution labels; the auxiliary losses average them down.
    ds = make_dataset(dataset, batch_size=1, cache_dir=tmp_path / "cache", aux_outputs=3,
                      preprocessor=Preprocessor(target_shape=16))
    image, y = next(iter(ds))
    assert sorted(y) == ["aux_1", "aux_2", "aux_3", "segmentation"]
    seg = y["segmentation"].numpy()
    assert seg.shape == (1, 16, 16, 16)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(y[f"aux_{k}"].numpy(), seg)

def test_patch_mode_shapes_padding_and_determinism(dataset, tmp_path):
    kwargs = dict(mode="patch", patch_size=(8, 12, 8), batch_size=3, cache_dir=tmp_path / "c",
                  seed=5, patches_per_volume=2, split="all")
    batches = list(make_dataset(dataset, **kwargs))
    assert [tuple(b[0].shape) for b in batches] == [(3, 8, 12, 8, 1)] * 2 + [(2, 8, 12, 8, 1)]
    assert all(b[0].dtype == tf.float32 and b[1].dtype == tf.int32 for b in batches)
    again = list(make_dataset(dataset, **kwargs))
    for (x1, y1), (x2, y2) in zip(batches, again):
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    other = list(make_dataset(dataset, **{**kwargs, "seed": 6}))
    assert any(not np.array_equal(a[1].numpy(), b[1].numpy()) for a, b in zip(batches, other))
    # A patch larger than the volume holds the whole (zero-padded) volume.
    ds = make_dataset(dataset, mode="patch", patch_size=24, cache_dir=tmp_path / "c", split="all")
    for image, labels in ds:
        assert labels.shape == (1, 24, 24, 24)
        counts = np.bincount(labels.numpy().ravel(), minlength=3)
        np.testing.assert_array_equal(counts[1:], [10 * 8 * 8, 1])


def _oversampling_rate(oversample, draws, seed, tmp_path, dataset):
    """Fraction of 8³ patches (from a 20x18x16 case) that contain the single-voxel label."""
    m = Manifest.load(dataset, validation_fraction=0.0)
    entry = VolumeCache(tmp_path / "cache").entry(*m.entries("training")[0].pair)
    rng = np.random.default_rng(seed)
    hits = [2 in entry.sample_patch((8, 8, 8), rng, oversample)[1] for _ in range(draws)]
    return float(np.mean(hits)), entry


def test_oversampling_frequency(dataset, tmp_path):
    # Case 0: the 1-voxel label 2 at canonical (16, 2, 13); the big label 1 also present.
    # Hand-worked uniform probability of covering it with an 8³ patch: start s_a uniform in
    # 0..(n_a - 8), covered when v_a - 7 <= s_a <= v_a on every axis.
    def cover(v, n):
        return (min(v, n - 8) - max(v - 7, 0) + 1) / (n - 8 + 1)

    p_uniform = cover(16, 20) * cover(2, 18) * cover(13, 16)
    for oversample in (0.0, 0.33, 1.0):
        rate, entry = _oversampling_rate(oversample, 3000, 11, tmp_path, dataset)
        # Oversampled patches pick label 1 or 2 with probability 1/2 each.
        expected = oversample / 2 + (1 - oversample) * p_uniform
        sigma = np.sqrt(expected * (1 - expected) / 3000)
        assert abs(rate - expected) < 4 * sigma + 1e-3, (oversample, rate, expected)
    assert entry.foreground_labels == [1, 2]
    assert entry.present_labels[2]["count"] == 1
    np.testing.assert_array_equal(entry.coords(2), [[16, 2, 13]])
    # Through the pipeline too (fewer draws): every case has exactly one such voxel.
    ds = make_dataset(dataset, mode="patch", patch_size=8, batch_size=40, oversample=1.0,
                      cache_dir=tmp_path / "cache", repeat=True, seed=3, split="all")
    labels = np.concatenate([y.numpy() for _, y in ds.take(10)])
    rate = np.mean([(patch == 2).any() for patch in labels])
    assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / 400), rate


def test_augmentation_hook(dataset, tmp_path):
    calls = []

    def flip(inputs, training=False):
        image, labels = inputs
        calls.append(training)
        return image[:, ::-1], labels[:, ::-1]

    kwargs = dict(cache_dir=tmp_path / "cache", shuffle=False, split="all",
                  preprocessor=Preprocessor(target_shape=16))
    plain = [y.numpy() for _, y in make_dataset(dataset, **kwargs)]
    flipped = [y.numpy() for _, y in make_dataset(dataset, augment=flip, **kwargs)]
    assert calls and all(calls)
    for a, b in zip(plain, flipped):
        np.testing.assert_array_equal(a[:, ::-1], b)
    # The paper's augmentation layer, built lazily from True / a dict.
    for augment in (True, {"rotation": 10.0, "probability": 1.0}):
        image, labels = next(iter(make_dataset(dataset, augment=augment, batch_size=2, **kwargs)))
        assert image.shape == (2, 16, 16, 16, 1) and labels.dtype == tf.int32
        assert set(np.unique(labels.numpy())) <= {0, 1, 2}
    with pytest.raises(ValueError, match="augment"):
        make_dataset(dataset, augment="yes", **kwargs)


def test_bad_arguments_and_missing_files(dataset, tmp_path):
    for kwargs, name in [({"mode": "slices"}, "mode"), ({"batch_size": 0}, "batch_size"),
                         ({"oversample": 1.5}, "oversample"),
                         ({"patch_size": (8, 8)}, "patch_size"),
                         ({"aux_outputs": -1}, "aux_outputs"), ({"split": "dev"}, "split")]:
        with pytest.raises(ValueError, match=name):
            make_dataset(dataset, cache_dir=tmp_path / "cache", **kwargs)
    os.remove(dataset.parent / "labelsTr" / "c3.nii.gz")
    os.remove(dataset.parent / "imagesTr" / "c1.nii.gz")
    with pytest.raises(ManifestError) as info:
        make_dataset(dataset, cache_dir=tmp_path / "cache", split="all")
    assert len(info.value.problems) == 2
    assert any("c3.nii.gz: file not found" in p for p in info.value.problems)


def test_cache_reuses_invalidates_and_separates_preprocessings(dataset, tmp_path):
    m = Manifest.load(dataset, validation_fraction=0.0)
    image_path, label_path = m.entries("training")[0].pair
    cache = VolumeCache(tmp_path / "cache", Preprocessor())
    e1 = cache.entry(image_path, label_path)
    assert isinstance(e1.image, np.memmap) and isinstance(e1.labels, np.memmap)
    assert e1.labels.dtype == np.uint8 and e1.image.dtype == np.float32
    assert cache.is_fresh(image_path, label_path)
    mtime = os.stat(e1.directory / "meta.json").st_mtime_ns
    e2 = cache.entry(image_path, label_path)
    assert e2.directory == e1.directory
    assert os.stat(e2.directory / "meta.json").st_mtime_ns == mtime  # not rebuilt
    image, labels, record = cache.get(image_path, label_path)
    assert record["output_shape"] == list(labels.shape)

    # The label file changes on disk: the entry is rebuilt with the new content.
    new = _case_labels(0)
    new[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(new, AFFINES[0]), label_path)
    assert not cache.is_fresh(image_path, label_path)
    e3 = cache.entry(image_path, label_path)
    assert e3.directory == e1.directory
    assert e3.labels[0, 0, 0] == 2 and e3.present_labels[2]["count"] == 2
    # Another preprocessing lives beside it, under its own key.
    other = VolumeCache(tmp_path / "cache", Preprocessor(normalization=None))
    e4 = other.entry(image_path, label_path)
    assert e4.directory != e3.directory
    np.testing.assert_allclose(
        e4.image[..., 0], np.asanyarray(nib.load(image_path).dataobj), rtol=1e-6)
    assert cache.is_fresh(image_path, label_path)
    entries = [p for p in os.listdir(tmp_path / "cache") if not p.startswith(".")]
    assert len(entries) == 2
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")]


def test_failed_cache_write_leaves_no_half_entry(dataset, tmp_path, monkeypatch):
    m = Manifest.load(dataset, validation_fraction=0.0)
    image_path, label_path = m.entries("training")[0].pair
    cache = VolumeCache(tmp_path / "cache")
    real_save = np.save

    def failing_save(path, array, *args, **kwargs):
        if str(path).endswith("labels.npy"):
            raise OSError("No space left on device")
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(cache_mod.np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        cache.entry(image_path, label_path)
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    good = cache.entry(image_path, label_path)
    before = sorted(os.listdir(good.directory))

    # A failed *rebuild* (source changed) keeps the old complete entry and no temporaries.
    os.utime(label_path, ns=(0, 0))
    monkeypatch.setattr(cache_mod.np, "save", failing_save)
    with pytest.raises(OSError):
        cache.entry(image_path, label_path)
    assert os.listdir(tmp_path / "cache") == [good.directory.name]
    assert sorted(os.listdir(good.directory)) == before
    # A corrupt source never produces an entry either.
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    blob = open(image_path, "rb").read()
    with open(image_path, "wb") as f:
        f.write(blob[: len(blob) // 3])
    with pytest.raises(ValueError, match="c0.nii.gz"):
        cache.entry(image_path, label_path)
    assert os.listdir(tmp_path / "cache") == [good.directory.name]


def test_label_summary_counts_boxes_and_coords():
    rng = np.random.default_rng(9)
    labels = np.zeros((12, 10, 8), np.int32)
    labels[2:9, 1:7, 3:8] = 1
    labels[rng.random(labels.shape) < 0.05] = 3
    labels[5, 5, 5] = 4
    summary, coords = cache_mod.summarise_labels(labels, max_coords=20, seed=0)
    assert sorted(summary) == ["0", "1", "3", "4"]
    for value in (1, 3, 4):
        item = summary[str(value)]
        where = np.argwhere(labels == value)
        assert item["count"] == len(where)
        assert item["bbox"] == [[int(lo), int(hi)] for lo, hi in zip(where.min(0), where.max(0))]
        pts = coords[slice(*item["coords"])]
        assert len(pts) == min(20, len(where)) and len(np.unique(pts, axis=0)) == len(pts)
        assert np.all(labels[tuple(pts.T)] == value)
    assert summary["0"]["count"] == int((labels == 0).sum())
    with pytest.raises(ValueError, match="negative label id"):
        cache_mod.summarise_labels(labels - 1, max_coords=5)
