"""TensorFlow-free input path (keras.utils.PyDataset): shapes, seeding, oversampling,
augmentation alignment, agreement with the tf.data pipeline, and training under JAX."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import write_msd_dataset
from tf_explog.augmentation import RandomAffine3D
from tf_explog.config import config_from_dict
from tf_explog.data.manifest import Manifest, ManifestError
from tf_explog.data.preprocess import Preprocessor
from tf_explog.builders import TrainingSetup
from tf_explog.data.pydataset import VolumeSequence

REPO = Path(__file__).resolve().parents[1]
FILE_SHAPE = (16, 18, 20)
LIA = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
CROP16 = Preprocessor(target_shape=16)


def _write_set(root: Path, images, labels, affines, label_names, test_image=None) -> Path:
    """MSD layout: imagesTr/c<i>.nii.gz, labelsTr/c<i>.nii.gz and dataset.json."""
    cases = [(f"c{i}", img.astype(np.float32), lab.astype(np.uint8), aff)
             for i, (img, lab, aff) in enumerate(zip(images, labels, affines))]
    test = []
    if test_image is not None:
        nib.save(nib.Nifti1Image(test_image.astype(np.float32), np.eye(4)), str(root / "t0.nii.gz"))
        test = ["./t0.nii.gz"]
    return write_msd_dataset(root, cases, label_names, test=test, name=root.name)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Four noisy cases 16x18x20 in two orientations (a block and a one-voxel label)."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(4):
        lab = np.zeros(FILE_SHAPE, np.uint8)
        lab[3 + i:11, 4:12, 5:13] = 1
        lab[12, 2 + 2 * i, 15] = 2
        labels.append(lab)
        images.append(rng.normal(size=FILE_SHAPE) + 3.0 * lab + i)
    return _write_set(tmp_path_factory.mktemp("toy"), images, labels,
                      [np.eye(4) if i % 2 == 0 else LIA for i in range(4)],
                      ["background", "block", "dot"], test_image=images[0])


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Three 16^3 cases whose image equals their label map (to check alignment)."""
    labels = []
    for i in range(3):
        lab = np.zeros((16, 16, 16), np.uint8)
        lab[2 + i:10, 3:12, 4:9] = 1
        lab[10:13, 9:14, 2 + i:6 + i] = 2
        lab[13, 4 + i, 12] = 3
        labels.append(lab)
    return _write_set(tmp_path_factory.mktemp("aligned"), [lab * 1.0 for lab in labels], labels,
                      [np.eye(4)] * 3, ["background", "a", "b", "c"])


def _canonical_crop(path, size):
    """Independent reference: nibabel's canonical reorientation, then a centred crop."""
    data = np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)
    starts = [(n - size) // 2 for n in data.shape]
    return data[tuple(slice(s, s + size) for s in starts)]


def _fetch_all(seq):
    return [seq[i] for i in range(len(seq))]


def _same_batches(a, b) -> bool:
    for (xa, ya), (xb, yb) in zip(a, b):
        if not (np.array_equal(xa, xb) and np.array_equal(ya, yb)):
            return False
    return len(a) == len(b)


# --------------------------------------------------------------------------------------


def test_volume_and_patch_mode_shapes_dtypes_and_content(toy, tmp_path):
    m = Manifest.load(toy, validation_fraction=0)
    seq = VolumeSequence(m, "all", batch_size=3, shuffle=False, cache_dir=tmp_path / "c",
                         preprocessor=CROP16)
    assert len(seq) == 2 and seq.num_batches == 2
    (x0, y0), (x1, y1) = _fetch_all(seq)
    assert x0.shape == (3, 16, 16, 16, 1) and x0.dtype == np.float32
    assert y0.shape == (3, 16, 16, 16) and y0.dtype == np.int32
    assert x1.shape == (1, 16, 16, 16, 1) and y1.shape == (1, 16, 16, 16)
    labels = np.concatenate([y0, y1])
    for i in range(4):
        reference = _canonical_crop(toy.parent / f"labelsTr/c{i}.nii.gz", 16)
        np.testing.assert_array_equal(labels[i], reference)
    # z-scored per volume
    np.testing.assert_allclose(x0.reshape(3, -1).mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(x0.reshape(3, -1).std(1), 1.0, atol=1e-4)

    pyr = VolumeSequence(m, "all", batch_size=2, shuffle=False, cache_dir=tmp_path / "c",
                         preprocessor=CROP16, aux_outputs=2)
    _, y = pyr[1]
    assert sorted(y) == ["aux_1", "aux_2", "segmentation"]
    for key in y:  # full resolution for every output; the auxiliary losses average it down
        np.testing.assert_array_equal(y[key], labels[2:])

    patches = VolumeSequence(m, "all", mode="patch", patch_size=8, batch_size=3,
                             patches_per_volume=2, cache_dir=tmp_path / "c", preprocessor=CROP16)
    assert len(patches) == 3  # 4 cases x 2 patches in batches of 3
    shapes = [(x.shape, x.dtype, y.shape, y.dtype) for x, y in _fetch_all(patches)]
    assert shapes[0] == ((3, 8, 8, 8, 1), np.float32, (3, 8, 8, 8), np.int32)
    assert shapes[2][0] == (2, 8, 8, 8, 1)
    big = VolumeSequence(m, "all", mode="patch", patch_size=(24, 16, 20), cache_dir=tmp_path / "c",
                         preprocessor=CROP16, oversample=0.0)
    x, y = big[0]
    assert x.shape == (1, 24, 16, 20, 1) and y.shape == (1, 24, 16, 20)
    # Padding around the 16^3 volume: its background (minimum), labels background 0.
    volume = x[0, 4:20, :, 2:18]
    assert np.all(x[0, :4] == volume.min()) and np.all(y[0, :4] == 0)
    assert volume.min() < -0.5  # z-scored: the background is not the mean intensity 0

    test = VolumeSequence(m, "test", cache_dir=tmp_path / "c", preprocessor=CROP16)
    x = test[0]
    assert isinstance(x, np.ndarray) and x.shape == (1, 16, 16, 16, 1)
    with pytest.raises(IndexError):
        seq[2]


def test_seeded_order_patches_and_epochs(toy, tmp_path):
    m = Manifest.load(toy, validation_fraction=0)
    kw = dict(mode="patch", patch_size=8, batch_size=2, patches_per_volume=2, seed=5,
              cache_dir=tmp_path / "c", preprocessor=CROP16)
    a, b = VolumeSequence(m, "all", **kw), VolumeSequence(m, "all", **kw)
    first = _fetch_all(a)
    # Any fetch order (as worker threads do) gives the same batches.
    assert _same_batches(first, [b[i] for i in reversed(range(len(b)))][::-1])
    a.on_epoch_end()
    second = _fetch_all(a)
    assert a.epoch == 1 and not _same_batches(first, second)
    b.set_epoch(1)
    assert _same_batches(second, _fetch_all(b))
    assert not _same_batches(first, _fetch_all(VolumeSequence(m, "all", **{**kw, "seed": 6})))
    fixed = VolumeSequence(m, "all", **{**kw, "shuffle": False})  # new patches every pass too
    before = _fetch_all(fixed)
    fixed.on_epoch_end()
    assert not _same_batches(before, _fetch_all(fixed))
    endless = VolumeSequence(m, "all", repeat=True, **kw)
    assert endless.num_batches is None
    endless.on_epoch_end()  # no effect with repeat: the index runs through passes
    assert _same_batches(second, [endless[len(endless) + i] for i in range(len(endless))])

    # Volume mode: every pass visits each case once, in a seeded order that changes.
    vol = VolumeSequence(m, "all", seed=3, cache_dir=tmp_path / "c", preprocessor=CROP16)
    plain = [y[0] for _, y in _fetch_all(VolumeSequence(m, "all", shuffle=False,
                                                          cache_dir=tmp_path / "c",
                                                          preprocessor=CROP16))]
    orders = []
    for _ in range(6):
        seen = [y[0] for _, y in _fetch_all(vol)]
        orders.append(tuple(next(i for i, p in enumerate(plain) if np.array_equal(p, s))
                            for s in seen))
        vol.on_epoch_end()
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len(set(orders)) > 1


def test_oversampling_frequency(tmp_path):
    """A single labelled voxel at (3, 12, 20) of 24^3 volumes, 8^3 patches.

    A uniform patch start s in [0, 16] per axis holds voxel v when v - 7 <= s <= v:
    4, 8 and 4 of the 17 starts, so q = 4 * 8 * 4 / 17^3. With oversampling p the patch is
    centred on the voxel (the only foreground label) with probability p, so the expected
    fraction of patches containing it is p + (1 - p) q.
    """
    labels = []
    for _ in range(4):
        lab = np.zeros((24, 24, 24), np.uint8)
        lab[3, 12, 20] = 1
        labels.append(lab)
    rng = np.random.default_rng(1)
    path = _write_set(tmp_path / "dot", [rng.normal(size=(24,) * 3) for _ in labels], labels,
                      [np.eye(4)] * 4, ["background", "dot"])
    m = Manifest.load(path, validation_fraction=0)
    q = 4 * 8 * 4 / 17**3
    n = 4 * 150
    for p in (0.0, 0.33, 1.0):
        seq = VolumeSequence(m, "all", mode="patch", patch_size=8, batch_size=100,
                             patches_per_volume=150, oversample=p, seed=2,
                             cache_dir=tmp_path / "c",
                             preprocessor=Preprocessor(normalization=None))
        hits = np.concatenate([(y == 1).any(axis=(1, 2, 3)) for _, y in _fetch_all(seq)])
        assert hits.size == n
        expected = p + (1 - p) * q
        tolerance = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-12
        assert abs(hits.mean() - expected) <= tolerance, (p, hits.mean(), expected)


def test_augmentation_keeps_image_and_labels_aligned(aligned, tmp_path):
    m = Manifest.load(aligned, validation_fraction=0)
    common = dict(shuffle=False, cache_dir=tmp_path / "c",
                  preprocessor=Preprocessor(normalization=None))

    def augmented(**kw):
        layer = RandomAffine3D(rotation=30, rotation_axes="all", shift=0.2, zoom=(0.8, 1.2),
                               probability=1.0, interpolation="nearest", seed=1)
        return VolumeSequence(m, "all", augment=layer, **common, **kw)

    plain = np.concatenate([y for _, y in _fetch_all(VolumeSequence(m, "all", **common))])
    seq = augmented()
    batches = _fetch_all(seq)
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.int32
        np.testing.assert_array_equal(x[..., 0], y.astype(np.float32))
        assert set(np.unique(y)) <= {0, 1, 2, 3}
    moved = np.concatenate([y for _, y in batches])
    assert all(not np.array_equal(a, b) for a, b in zip(moved, plain))
    # Per-batch seeds: a fresh sequence fetched out of order gives the same transforms,
    # the next epoch other ones.
    again = augmented()
    fetched = {i: again[i] for i in (2, 0, 1)}
    assert _same_batches(batches, [fetched[i] for i in range(3)])
    seq.on_epoch_end()
    assert not _same_batches(batches, _fetch_all(seq))
    # Batched volumes get their own transforms; the batch of 3 still stays aligned.
    x, y = augmented(batch_size=3)[0]
    np.testing.assert_array_equal(x[..., 0], y.astype(np.float32))

    # Any callable with the (image, labels), training=True convention.
    def flip(inputs, training=False):
        image, labels = inputs
        return image[:, ::-1], labels[:, ::-1]

    flipped = np.concatenate([y for _, y in _fetch_all(
        VolumeSequence(m, "all", augment=flip, **common))])
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_batches_equal_tf_data_pipeline(toy, tmp_path):
    pytest.importorskip("tensorflow")
    from tf_explog.data.pipeline import make_dataset

    m = Manifest.load(toy, validation_fraction=0)
    kw = dict(batch_size=2, cache_dir=tmp_path / "c", preprocessor=CROP16, aux_outputs=1)
    ours = _fetch_all(VolumeSequence(m, "all", shuffle=False, **kw))
    theirs = [(x.numpy(), {k: v.numpy() for k, v in y.items()})
              for x, y in make_dataset(m, "all", shuffle=False, **kw)]
    assert len(ours) == len(theirs) == 2
    for (xa, ya), (xb, yb) in zip(ours, theirs):
        np.testing.assert_array_equal(xa, xb)
        assert sorted(ya) == sorted(yb)
        for key in ya:
            np.testing.assert_array_equal(ya[key], yb[key])

    # Shuffled: the orders differ (numpy vs tf.random), the epoch's volumes are the same set.
    kw = dict(batch_size=1, cache_dir=tmp_path / "c", preprocessor=CROP16, seed=4)

    def keyed(pairs):
        return sorted((x.tobytes(), y.tobytes()) for x, y in pairs)

    ours = keyed(_fetch_all(VolumeSequence(m, "all", **kw)))
    theirs = keyed((x.numpy(), y.numpy()) for x, y in make_dataset(m, "all", shuffle=True, **kw))
    assert ours == theirs


def test_bad_arguments_raise_clear_errors(toy, tmp_path):
    m = Manifest.load(toy, validation_fraction=0)
    c = tmp_path / "c"
    for kwargs, match in [
        (dict(mode="slice"), "mode"),
        (dict(batch_size=0), "batch_size"),
        (dict(oversample=1.5), "oversample"),
        (dict(patch_size=(8, 8)), "patch_size"),
        (dict(aux_outputs=-1), "aux_outputs"),
        (dict(patches_per_volume=0), "patches_per_volume"),
        (dict(workers=-1), "workers"),
        (dict(seed=-3), "seed"),
        (dict(augment="yes"), "augment"),
        (dict(augment=True, use_multiprocessing=True, workers=2), "use_multiprocessing"),
        (dict(augment=True, jit_augment=True), "jit_augment"),  # TensorFlow backend here
    ]:
        with pytest.raises(ValueError, match=match):
            VolumeSequence(m, "all", cache_dir=c, preprocessor=CROP16, **kwargs)
    with pytest.raises(ValueError, match="preprocessor"):
        VolumeSequence(m, "all", cache_dir=c, preprocessor={"target_shape": 16})
    with pytest.raises(ValueError, match="split"):
        VolumeSequence(m, "validation", cache_dir=c)
    with pytest.raises(ValueError, match="aux_outputs"):
        VolumeSequence(m, "test", cache_dir=c, aux_outputs=1)
    # Volumes of different shapes cannot be batched: the message names the files.
    with pytest.raises(ValueError, match=r"batch_size.*c\d\.nii\.gz"):
        VolumeSequence(m, "all", batch_size=2, cache_dir=c)
    broken = json.loads(toy.read_text())
    broken["training"][1]["image"] = "./imagesTr/missing.nii.gz"
    (tmp_path / "dataset.json").write_text(json.dumps(broken))
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).symlink_to(toy.parent / sub)
    with pytest.raises(ManifestError, match="missing.nii.gz"):
        VolumeSequence(Manifest.load(tmp_path, validation_fraction=0), "all", cache_dir=c)


def test_training_setup_sequences_mirror_the_tf_data_stream(toy, tmp_path):
    raw = {"name": "t", "seed": 7, "data": {
        "dataset": str(toy), "validation_fraction": 0.25, "mode": "patch",
        "patch_size": [16, 16, 16], "oversample": 0.5, "preprocess": {"target_shape": 16}},
        "model": {"aux_outputs": 1}, "train": {"batch_size": 2}}
    config = config_from_dict(raw)
    train, val = TrainingSetup.from_config(config, validate=False).sequences()
    assert (train.split, train.mode, train.patch_size, train.batch_size) == (
        "training", "patch", (16, 16, 16), 2)
    assert train.shuffle and train.seed == 7 and train.oversample == 0.5 and not train.repeat
    assert isinstance(train.augmenter.augment, RandomAffine3D)
    assert len(train.pairs) == 3 and len(val.pairs) == 1
    assert not val.shuffle and val.augmenter is None and val.aux_outputs == 1
    assert train.cache.cache_dir == toy.parent / ".cache"
    assert train.preprocessor.target_shape == (16, 16, 16)
    x, y = val[0]
    assert x.shape == (1, 16, 16, 16, 1) and y["aux_1"].shape == (1, 16, 16, 16)
    config = config_from_dict(raw, ["train.steps_per_epoch=5", "data.augment.enabled=false",
                                    f"data.cache_dir={tmp_path / 'cc'}"])
    train, _ = TrainingSetup.from_config(config, validate=False).sequences(workers=2)
    assert train.repeat and train.num_batches is None and train.augmenter is None
    assert train.workers == 2 and train.cache.cache_dir == tmp_path / "cc"


def _run_jax(args, timeout=240, **env):
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO),
           "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_imports_and_augments_without_tensorflow_under_jax(aligned, tmp_path):
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from tf_explog.augmentation import RandomAffine3D
        from tf_explog.data.preprocess import Preprocessor
        from tf_explog.data.pydataset import VolumeSequence
        import tf_explog.models, tf_explog.losses, tf_explog.metrics
        def seq(jit):
            layer = RandomAffine3D(rotation=30, rotation_axes="all", probability=1.0,
                                   interpolation="nearest", seed=1)
            return VolumeSequence({str(aligned)!r}, "all", batch_size=3, shuffle=False,
                                  cache_dir={str(tmp_path / "c")!r}, augment=layer,
                                  preprocessor=Preprocessor(normalization=None),
                                  jit_augment=jit)
        x, y = seq("auto")[0]
        xe, ye = seq(False)[0]
        print(json.dumps({{
            "tensorflow": "tensorflow" in sys.modules,
            "aligned": bool(np.array_equal(x[..., 0], y.astype(np.float32))),
            "dtypes": [str(x.dtype), str(y.dtype)],
            "jit_equals_eager": bool(np.array_equal(y, ye)),
            "backend": __import__("keras").backend.backend()}}))
    """)
    res = _run_jax(["-c", code])
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"tensorflow": False, "aligned": True, "dtypes": ["float32", "int32"],
                   "jit_equals_eager": True, "backend": "jax"}


@pytest.mark.slow
def test_train_jax_script_fits_one_epoch(tmp_path):
    out = tmp_path / "out"
    res = _run_jax([
        "bench/train_jax.py", "--config", "train_configs/paper.yaml",
        "--set", f"data.dataset={tmp_path / 'data' / 'dataset.json'}",
        "--set", "data.preprocess.resize_shape=16",
        "--set", "model.filters=[4,4,4,4,4]", "--set", "model.encoder_depths=[1,1,1,1,1]",
        "--set", "model.decoder_depths=[1,1,1,1]", "--set", "train.epochs=1",
        "--set", "train.verbose=0", "--subjects", "3", "--shape", "16", "--workers", "2",
        "--out", str(out)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "generating the synthetic data set" in res.stdout
    assert "devices [" in res.stdout and "done:" in res.stdout
    assert (tmp_path / "data" / "dataset.json").is_file()
    for name in ("checkpoints/best.keras", "checkpoints/final.keras", "config.yaml",
                 "summary.json", "run.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["epoch_seconds"]) > 0
    assert np.isfinite(float(rows[0]["loss"])) and "val_dice" in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "jax" and summary["tensorflow_imported"] is False
    assert len(summary["epoch_seconds"]) == 1 and summary["jit_compile"] is True
    assert "cpu" in summary["devices"][0].lower()
