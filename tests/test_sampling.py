"""The input core shared by tf.data and PyDataset: validation, shapes, element reads, and the
two front ends agreeing with it (and so with each other)."""

import json

import nibabel as nib
import numpy as np
import pytest

from tf_explog.data.manifest import Manifest, ManifestError
from tf_explog.data.preprocess import Preprocessor
from tf_explog.data.pydataset import VolumeSequence
from tf_explog.data.sampling import (SplitSampler, build_augmentation, check_int,
                                     positive_triple)
from tf_explog.errors import InputError

SHAPE = (12, 10, 8)
LIA = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
CROP8 = Preprocessor(target_shape=8)


@pytest.fixture(scope="module")
def toy(msd_dataset):
    """Three labelled cases (two orientations, so two canonical shapes) and one test image."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        lab = np.zeros(SHAPE, np.uint8)
        lab[2 + i:9, 2:8, 1:6] = 1
        lab[10, 1 + i, 6] = 2
        img = rng.normal(size=SHAPE) + 3.0 * lab + i
        cases.append((f"c{i}", img.astype(np.float32), lab, np.eye(4) if i % 2 == 0 else LIA))
    path = msd_dataset(cases, ["background", "block", "dot"], test=["./imagesTr/c0.nii.gz"])
    return Manifest.load(path, validation_fraction=0)


def _sampler(manifest, cache_dir, **kwargs):
    kwargs = {"mode": "volume", "preprocessor": CROP8, **kwargs}
    return SplitSampler(manifest, kwargs.pop("split", "all"), cache_dir=cache_dir, **kwargs)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, name", [
    (dict(mode="slices"), "mode"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(oversample=1.5), "oversample"),
    (dict(oversample=-0.1), "oversample"),
    (dict(oversample="often"), "oversample"),
    (dict(oversample=None), "oversample"),
    (dict(aux_outputs=-1), "aux_outputs"),
    (dict(aux_outputs=1.0), "aux_outputs"),
    (dict(patches_per_volume=0), "patches_per_volume"),
    (dict(patches_per_volume=2.0), "patches_per_volume"),
    (dict(preprocessor={"target_shape": 8}), "preprocessor"),
    (dict(patch_size=(8, 8)), "patch_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(patch_size=(8, 8.5, 8)), "patch_size"),
    (dict(patch_size="big"), "patch_size"),
    (dict(mode="patch"), "patch_size"),  # patch mode without a patch size
    (dict(split="dev"), "split"),
    (dict(split="test", aux_outputs=1), "aux_outputs"),  # no labels to give the heads
    (dict(batch_size=2, preprocessor=None), "batch_size"),  # two volume shapes
])
def test_each_bad_argument_raises_an_input_error_naming_it(toy, tmp_path, kwargs, name):
    with pytest.raises(InputError, match=rf"^{name}\b"):
        _sampler(toy, tmp_path / "c", **kwargs)


@pytest.mark.parametrize("call, name", [
    (lambda: check_int(-1, "workers", 0), "workers"),
    (lambda: check_int(0, "max_queue_size"), "max_queue_size"),
    (lambda: check_int("3", "seed", 0), "seed"),
    (lambda: positive_triple((4, 4, 4, 4), "window"), "window"),
    (lambda: build_augmentation("yes"), "augment"),
])
def test_shared_checks_name_the_argument(call, name):
    with pytest.raises(InputError, match=rf"^{name}: expected"):
        call()


def test_checks_accept_and_normalise_good_values(toy, tmp_path):
    assert check_int(np.int64(3), "n") == 3 and type(check_int(np.int64(3), "n")) is int
    assert positive_triple(np.int32(4), "p") == (4, 4, 4)
    assert positive_triple([4.0, 5, 6], "p") == (4, 5, 6)
    assert build_augmentation(None) is None and build_augmentation(False) is None
    s = _sampler(toy, tmp_path / "c", mode="patch", patch_size=[4, 6, 8], oversample=1,
                 patches_per_volume=3, aux_outputs=np.int64(2), batch_size=np.int16(2))
    assert (s.patch_size, s.oversample, s.patches_per_volume, s.aux_outputs, s.batch_size) == (
        (4, 6, 8), 1.0, 3, 2, 2)
    assert type(s.oversample) is float and type(s.aux_outputs) is int
    assert s.spatial_shape == (4, 6, 8) and s.channels == 1 and len(s) == 3
    # Volume mode reads one element per case whatever patches_per_volume says.
    assert _sampler(toy, tmp_path / "c", patches_per_volume=3).patches_per_volume == 1


def test_missing_files_are_all_named_before_any_read(toy, tmp_path):
    broken = json.loads(toy.path.read_text())
    broken["training"][0]["label"] = "./labelsTr/gone.nii.gz"
    broken["training"][2]["image"] = "./imagesTr/lost.nii.gz"
    (tmp_path / "dataset.json").write_text(json.dumps(broken))
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).symlink_to(toy.path.parent / sub)
    with pytest.raises(ManifestError) as info:
        _sampler(Manifest.load(tmp_path, validation_fraction=0), tmp_path / "c")
    assert sorted(p.split("/")[-1] for p in info.value.problems) == [
        "gone.nii.gz: file not found", "lost.nii.gz: file not found"]


# ------------------------------------------------------------------------------ shapes, reads


def test_spatial_shape_and_the_unequal_shapes_refusal(toy, tmp_path):
    c = tmp_path / "c"
    assert _sampler(toy, c).spatial_shape == (8, 8, 8)
    assert _sampler(toy, c, preprocessor=Preprocessor(resize_shape=(6, 7, 8))).spatial_shape \
        == (6, 7, 8)
    assert _sampler(toy, c, preprocessor=None).spatial_shape == (None, None, None)
    # Equal shapes are read from the headers when a batch needs one shape.
    same = _sampler(toy, c, split="test", preprocessor=None, batch_size=2)
    assert same.spatial_shape == (12, 10, 8)
    with pytest.raises(InputError, match=r"equal volume shapes.*c[01]\.nii\.gz.*c[01]\.nii"):
        _sampler(toy, c, preprocessor=None, batch_size=2)


def test_volume_reads_are_fresh_copies_of_the_cached_case(toy, tmp_path):
    s = _sampler(toy, tmp_path / "c", preprocessor=None)
    entry = s.entry(1)
    image, labels = s.read(entry)
    assert image.dtype == np.float32 and labels.dtype == np.int32
    assert not isinstance(image, np.memmap) and image.flags.writeable
    np.testing.assert_array_equal(labels, np.asarray(entry.labels))
    reference = nib.as_closest_canonical(nib.load(str(s.pairs[1][1]))).get_fdata()
    np.testing.assert_array_equal(labels, reference.astype(np.int32))
    image[...] = 0  # a copy: the cache is untouched
    np.testing.assert_array_equal(s.read(entry)[0], np.asarray(entry.image))
    assert np.asarray(entry.image).std() > 0
    # Unlabelled split: labels None.
    test = _sampler(toy, tmp_path / "c", split="test")
    assert not test.with_labels and test.read(test.entry(0))[1] is None
    # The aux-output dict: the same full-resolution labels under every output name.
    targets = _sampler(toy, tmp_path / "c", aux_outputs=2).targets(labels)
    assert sorted(targets) == ["aux_1", "aux_2", "segmentation"]
    assert all(v is labels for v in targets.values())
    assert s.targets(labels) is labels


def test_patch_reads_are_a_function_of_the_rng(toy, tmp_path):
    s = _sampler(toy, tmp_path / "c", mode="patch", patch_size=(4, 6, 8), oversample=0.5,
                 preprocessor=None)
    entry = s.entry(2)

    def draws(seed, n=6):
        rng = np.random.default_rng(seed)
        return [s.read(entry, rng) for _ in range(n)]

    first, again, other = draws(7), draws(7), draws(8)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert xa.shape == (4, 6, 8, 1) and ya.shape == (4, 6, 8)
        assert xa.dtype == np.float32 and ya.dtype == np.int32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Successive draws and another seed give other patches (so the checks above can fail).
    assert any(not np.array_equal(first[0][0], x) for x, _ in first[1:])
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    with pytest.raises(TypeError, match="rng"):
        s.read(entry)


# ------------------------------------------------------------------------------ front ends


def test_volume_sequence_reads_through_the_core(toy, tmp_path):
    """Batch elements are the core's reads: volumes in manifest order, patch ``j`` of case
    ``c`` in pass ``p`` drawn with ``default_rng([seed, p, 1, c, j])``."""
    c = tmp_path / "c"
    s = _sampler(toy, c)
    seq = VolumeSequence(toy, "all", batch_size=2, shuffle=False, cache_dir=c, preprocessor=CROP8)
    volumes = np.concatenate([y for _, y in (seq[i] for i in range(len(seq)))])
    for case in range(3):
        np.testing.assert_array_equal(volumes[case], s.read(s.entry(case))[1])
    assert not np.array_equal(volumes[0], volumes[1])

    kw = dict(mode="patch", patch_size=(4, 6, 8), oversample=0.5, patches_per_volume=2)
    seq = VolumeSequence(toy, "all", batch_size=3, shuffle=False, seed=9, cache_dir=c,
                         preprocessor=CROP8, **kw)
    seq.set_epoch(4)
    images = np.concatenate([x for x, _ in (seq[i] for i in range(len(seq)))])
    s = _sampler(toy, c, **kw)
    for element, image in enumerate(images):
        j, case = divmod(element, 3)  # patch-major
        rng = np.random.default_rng([9, 4, 1, case, j])
        np.testing.assert_array_equal(image, s.read(s.entry(case), rng)[0])


@pytest.mark.parametrize("batch_size, preprocessor, aux_outputs", [
    (2, CROP8, 1),  # fixed shape, batched, labels as a dict
    (1, None, 0),   # native shapes (two of them), one volume per batch
])
def test_front_ends_give_identical_unshuffled_volume_batches(toy, tmp_path, batch_size,
                                                             preprocessor, aux_outputs):
    tf = pytest.importorskip("tensorflow")
    from tf_explog.data.pipeline import make_dataset

    kw = dict(batch_size=batch_size, cache_dir=tmp_path / "c", preprocessor=preprocessor,
              aux_outputs=aux_outputs, shuffle=False)
    seq = VolumeSequence(toy, "all", **kw)
    ours = [seq[i] for i in range(len(seq))]
    theirs = list(make_dataset(toy, "all", **kw))
    assert len(ours) == len(theirs) == -(-3 // batch_size)
    s = _sampler(toy, tmp_path / "c", preprocessor=preprocessor)
    cases = iter(range(3))
    for (xa, ya), (xb, yb) in zip(ours, theirs):
        assert isinstance(xb, tf.Tensor) and xb.dtype == tf.float32
        np.testing.assert_array_equal(xa, xb.numpy())
        if aux_outputs:
            assert sorted(ya) == sorted(yb) == ["aux_1", "segmentation"]
            ya, yb = ya["aux_1"], yb["aux_1"]
        np.testing.assert_array_equal(ya, yb.numpy())
        for k in range(len(xa)):  # and both are the core's reads, in manifest order
            image, labels = s.read(s.entry(next(cases)))
            np.testing.assert_array_equal(xa[k], image)
            np.testing.assert_array_equal(ya[k], labels)
    assert next(cases, None) is None


def test_tf_data_patches_are_the_cores_reads(toy, tmp_path):
    """Each case read by the pipeline gives ``patches_per_volume`` successive draws from
    ``default_rng([seed, r])``, ``r`` the case's number from its ``Dataset.random`` stream."""
    tf = pytest.importorskip("tensorflow")
    from tf_explog.data.pipeline import make_dataset

    kw = dict(mode="patch", patch_size=(4, 6, 8), oversample=0.5, patches_per_volume=2)
    ds = make_dataset(toy, "all", batch_size=2, shuffle=False, seed=5, cache_dir=tmp_path / "c",
                      preprocessor=CROP8, num_parallel_reads=1, **kw)
    images = np.concatenate([x.numpy() for x, _ in ds])
    stream = tf.data.Dataset.random(seed=5, rerandomize_each_iteration=True)  # the pipeline's
    randoms = [int(r) for r in stream.take(3).as_numpy_iterator()]
    s = _sampler(toy, tmp_path / "c", **kw)
    expected = []
    for case, r in enumerate(randoms):
        rng = np.random.default_rng([5, r & ((1 << 63) - 1)])
        expected += [s.read(s.entry(case), rng)[0] for _ in range(2)]
    assert images.shape == (6, 4, 6, 8, 1)
    np.testing.assert_array_equal(images, np.stack(expected))


def test_front_end_only_arguments_are_checked_too(toy, tmp_path):
    pytest.importorskip("tensorflow")
    from tf_explog.data.pipeline import make_dataset

    for kwargs, name in [(dict(prefetch=-1), "prefetch"),
                         (dict(num_parallel_reads=-2), "num_parallel_reads"),
                         (dict(patches_per_volume=0), "patches_per_volume")]:
        with pytest.raises(InputError, match=rf"^{name}\b"):
            make_dataset(toy, "all", cache_dir=tmp_path / "c", **kwargs)
