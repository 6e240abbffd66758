"""Tests for tf_explog.data.synthetic: phantoms, size table, MSD data set on disk.

Expected values are computed independently in the tests (np.bincount, nibabel's own
orientation handling, world coordinates from the affine), never by the module itself.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from tf_explog.data import synthetic as syn

N_LABELS = 20


def _counts(labels):
    return np.bincount(np.asarray(labels).ravel(), minlength=N_LABELS)


def test_label_names():
    assert len(syn.LABEL_NAMES) == N_LABELS
    assert syn.LABEL_NAMES[0] == "background"
    assert len(set(syn.LABEL_NAMES)) == N_LABELS


def test_same_seed_same_bytes_different_seed_differs():
    img_a, lab_a = syn.generate_subject((32, 32, 32), seed=7)
    img_b, lab_b = syn.generate_subject((32, 32, 32), seed=7)
    assert img_a.dtype == np.float32 and lab_a.dtype == np.uint8
    assert img_a.shape == lab_a.shape == (32, 32, 32)
    assert img_a.tobytes() == img_b.tobytes()
    assert lab_a.tobytes() == lab_b.tobytes()
    img_c, lab_c = syn.generate_subject((32, 32, 32), seed=8)
    assert not np.array_equal(img_a, img_c)
    assert not np.array_equal(lab_a, lab_c)
    assert np.isfinite(img_a).all() and img_a.min() >= 0


@pytest.mark.parametrize("shape", [(16, 16, 16), (16, 20, 24), (32, 32, 32)])
def test_all_19_structures_present_at_small_shapes(shape):
    for seed in range(4):
        _, labels = syn.generate_subject(shape, seed=seed)
        assert labels.shape == shape
        assert (_counts(labels) > 0).all(), (shape, seed, _counts(labels))
        assert labels.max() == N_LABELS - 1


def test_every_structure_survives_many_seeds_at_16():
    # At 16³ neighbouring nuclei can hide each other entirely (seed 28 hides the left
    # putamen before the generator gives it back a voxel); none may go missing.
    for seed in range(40):
        _, labels = syn.generate_subject(16, seed=seed)
        assert (_counts(labels) > 0).all(), (seed, _counts(labels))


def test_imbalance_bound_at_64_and_128():
    # At 64³ over two subjects, and one subject at the paper's 128³.
    counts = sum(_counts(syn.generate_subject(64, seed=s)[1]) for s in range(2))
    ratio_64 = counts[1:].min() / counts[1:].max()
    assert ratio_64 <= 0.003, ratio_64
    _, lab128 = syn.generate_subject(128, seed=0)
    c = _counts(lab128)
    assert (c > 0).all()
    ratio_128 = c[1:].min() / c[1:].max()
    assert ratio_128 <= 0.003, ratio_128
    # Large shells are the largest structures; small nuclei have a few hundred voxels.
    names = syn.LABEL_NAMES
    assert names[1 + int(np.argmax(c[1:]))] in ("white_matter", "cortex", "csf")
    assert 100 <= c[1:].min() <= 1000, c[1:].min()


def test_left_structures_lie_at_negative_x():
    _, labels = syn.generate_subject(32, seed=3)
    names = syn.LABEL_NAMES
    for k, name in enumerate(names):
        if name.startswith("left_"):
            right = names.index("right_" + name[len("left_"):])
            x_left = np.argwhere(labels == k)[:, 0].mean()
            x_right = np.argwhere(labels == right)[:, 0].mean()
            assert x_left < x_right, name


def test_size_table_hand_worked():
    rows = syn.size_table(
        [np.array([0, 0, 0, 1], np.uint8), np.array([[1, 2], [0, 0]], np.int32)]
    )
    assert [r["voxels"] for r in rows] == [5, 2, 1]
    assert [r["name"] for r in rows] == ["background", "white_matter", "cortex"]
    assert rows[1]["fraction"] == pytest.approx(2 / 8)
    assert rows[1]["mean_voxels"] == pytest.approx(1.0)
    assert rows[0]["ratio_to_largest"] is None
    assert rows[2]["ratio_to_largest"] == pytest.approx(0.5)
    assert syn.smallest_to_largest(rows) == pytest.approx(0.5)
    text = syn.format_size_table(rows)
    assert "cortex" in text and "50.00%" in text and "62.500%" in text
    with pytest.raises(ValueError, match="labels_list"):
        syn.size_table([])
    with pytest.raises(ValueError, match="integer"):
        syn.size_table([np.zeros(3, np.float32)])


def test_size_table_matches_bincount():
    _, labels = syn.generate_subject(32, seed=1)
    rows = syn.size_table([labels])
    c = _counts(labels)
    assert [r["voxels"] for r in rows] == c.tolist()
    assert rows[5]["ratio_to_largest"] == pytest.approx(c[5] / c[1:].max())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": 8}, "shape"),
        ({"shape": (32, 32)}, "shape"),
        ({"subjects": 0}, "subjects"),
        ({"seed": -1}, "seed"),
        ({"test_subjects": -2}, "test_subjects"),
        ({"spacing": -1.0}, "spacing"),
    ],
)
def test_generate_dataset_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        syn.generate_dataset(tmp_path / "ds", verbose=False, **kwargs)
    assert not (tmp_path / "ds").exists()


def test_generate_dataset_msd_layout_and_affines(tmp_path, capsys):
    out = tmp_path / "synth"
    shape = (16, 20, 24)  # non-cubic, so reoriented files have permuted shapes
    info = syn.generate_dataset(out, subjects=3, test_subjects=1, shape=shape, seed=5)
    assert "smallest/largest structure" in capsys.readouterr().out
    assert info["num_training"] == 3 and info["num_test"] == 1
    # Nothing half-written is left beside the data set.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]

    with open(out / "dataset.json") as fh:
        meta = json.load(fh)
    for key in ("name", "labels", "modality", "numTraining", "training", "test"):
        assert key in meta
    assert meta["modality"] == {"0": "T1"}
    assert meta["labels"] == {str(k): n for k, n in enumerate(syn.LABEL_NAMES)}
    assert meta["numTraining"] == len(meta["training"]) == 3
    assert len(meta["test"]) == 1
    entries = [(e, i) for i, e in enumerate(meta["training"] + meta["test"])]
    dirs = ["imagesTr"] * 3 + ["imagesTs"]
    expected_codes = [("L", "I", "A"), ("R", "A", "S"), ("L", "P", "S"), ("L", "I", "A")]
    left_thalamus = syn.LABEL_NAMES.index("left_thalamus")
    right_thalamus = syn.LABEL_NAMES.index("right_thalamus")
    for entry, i in entries:
        assert entry["image"].startswith(f"./{dirs[i]}/")
        assert entry["label"].startswith("./" + dirs[i].replace("images", "labels") + "/")
        img = nib.load(out / entry["image"])
        lab = nib.load(out / entry["label"])
        assert np.allclose(img.affine, lab.affine)
        assert not np.allclose(img.affine, np.eye(4))
        assert nib.aff2axcodes(img.affine) == expected_codes[i]
        assert np.allclose(img.header.get_zooms(), (1.5, 1.5, 1.5))
        assert img.get_data_dtype() == np.float32
        assert np.issubdtype(lab.get_data_dtype(), np.integer)
        # A canonical (RAS) reader sees exactly the in-memory subject.
        ref_img, ref_lab = syn.generate_subject(shape, seed=[5, i])
        canon_img = nib.as_closest_canonical(img)
        canon_lab = nib.as_closest_canonical(lab)
        np.testing.assert_array_equal(np.asanyarray(canon_img.dataobj), ref_img)
        np.testing.assert_array_equal(np.asanyarray(canon_lab.dataobj), ref_lab)
        # Consistent head in world space, whatever the storage order: the left thalamus
        # lies at negative world x (RAS), the right one at positive x.
        stored = np.asanyarray(lab.dataobj)
        for k, sign in ((left_thalamus, -1), (right_thalamus, 1)):
            centroid = np.argwhere(stored == k).mean(axis=0)
            world = lab.affine @ np.append(centroid, 1.0)
            assert np.sign(world[0]) == sign, (entry, k, world)


def test_generate_dataset_refuses_non_empty_dir_then_overwrites(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(syn.OutputExistsError, match="overwrite") as err:
        syn.generate_dataset(out, subjects=1, test_subjects=0, shape=16, verbose=False)
    assert isinstance(err.value, ValueError)
    assert sorted(os.listdir(out)) == ["notes.txt"]

    syn.generate_dataset(out, subjects=2, test_subjects=0, shape=16, overwrite=True,
                         verbose=False)
    first = nib.load(out / "labelsTr" / "brain_001.nii.gz").get_fdata()
    syn.generate_dataset(out, subjects=1, test_subjects=1, shape=16, seed=1,
                         overwrite=True, verbose=False)
    assert (out / "notes.txt").read_text() == "keep me"
    # The old set is replaced, not merged: brain_001 now is the test subject of seed 1.
    assert sorted(os.listdir(out / "imagesTr")) == ["brain_000.nii.gz"]
    assert sorted(os.listdir(out / "imagesTs")) == ["brain_001.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1
    second = nib.load(out / "labelsTs" / "brain_001.nii.gz").get_fdata()
    assert not np.array_equal(first, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_generate_dataset_into_empty_dir_and_file_target(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    info = syn.generate_dataset(out, subjects=1, shape=16, verbose=False)
    assert info["num_test"] == 1  # None → max(1, subjects // 4)
    assert (out / "dataset.json").is_file()
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        syn.generate_dataset(target, subjects=1, shape=16, verbose=False)


def test_failed_overwrite_rolls_back(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    syn.generate_dataset(out, subjects=1, test_subjects=1, shape=16, verbose=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_replace = os.replace
    failed = []

    def failing_replace(src, dst):
        # Fail once, when the new dataset.json is moved in (the last step of the swap).
        if os.fspath(dst) == os.fspath(out / "dataset.json") and not failed:
            failed.append(src)
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(syn.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        syn.generate_dataset(out, subjects=2, test_subjects=0, shape=16, seed=3,
                             overwrite=True, verbose=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_parallel_workers_write_the_same_data_set(tmp_path):
    one = syn.generate_dataset(tmp_path / "one", subjects=3, test_subjects=1, shape=16, seed=4,
                           verbose=False)
    two = syn.generate_dataset(tmp_path / "two", subjects=3, test_subjects=1, shape=16, seed=4,
                           verbose=False, workers=2)
    assert one["size_table"] == two["size_table"]
    files = sorted(p.relative_to(tmp_path / "one")
                   for p in (tmp_path / "one").rglob("*.nii.gz"))
    assert len(files) == 8
    for rel in files:
        a, b = nib.load(str(tmp_path / "one" / rel)), nib.load(str(tmp_path / "two" / rel))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
    with pytest.raises(ValueError, match="workers"):
        syn.generate_dataset(tmp_path / "three", subjects=1, shape=16, workers=0)
