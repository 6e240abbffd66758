"""Manifest (MSD dataset.json): splits, validation listing every problem, label frequencies."""

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest

from tf_explog.data.manifest import Manifest, ManifestError, label_frequencies
from tf_explog.data.preprocess import Preprocessor

SHAPE = (16, 16, 16)


def _write_case(root, name, *, labels=None, image=None, affine=None, label_affine=None):
    """Write imagesTr/<name>.nii.gz and labelsTr/<name>.nii.gz; return the json entry."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    if labels is None:
        labels = np.zeros(SHAPE, np.uint8)
        labels[4:10, 4:10, 4:10] = 1
        labels[2, 3, 4] = 2
    if image is None:
        image = rng.normal(size=labels.shape).astype(np.float32)
    affine = np.diag([1.2, 1.2, 1.2, 1.0]) if affine is None else affine
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine if label_affine is None else label_affine),
             str(root / "labelsTr" / f"{name}.nii.gz"))
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def _write_json(root, training, **extra):
    data = {"name": "toy", "modality": {"0": "T1"},
            "labels": {"0": "background", "1": "big", "2": "tiny"},
            "training": training, "test": [], **extra}
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def test_load_splits_and_names(tmp_path):
    training = [_write_case(tmp_path, f"case{i}") for i in range(10)]
    path = _write_json(tmp_path, training, test=["./imagesTr/case0.nii.gz",
                                                 {"image": "./imagesTr/case1.nii.gz"}])
    m = Manifest.load(tmp_path)  # the folder works as well as the json
    assert m.path == path
    assert m.label_names == ["background", "big", "tiny"] and m.num_classes == 3
    assert m.num_channels == 1
    train, val = m.entries("training"), m.entries("validation")
    assert len(val) == 2 and len(train) == 8
    names = sorted(e.id for e in train + val)
    assert names == sorted(f"case{i}" for i in range(10))
    assert not {e.id for e in train} & {e.id for e in val}
    assert all(e.image.is_file() and e.label.is_file() for e in train)
    # Deterministic for a seed, different for another seed (for this seed pair).
    assert [e.id for e in Manifest.load(path).entries("validation")] == [e.id for e in val]
    other = [e.id for e in Manifest.load(path, seed=1).entries("validation")]
    assert other != [e.id for e in val]
    assert len(Manifest.load(path, validation_fraction=0.0).entries("training")) == 10
    assert len(m.entries("all")) == 10
    test = m.entries("test")
    assert [e.label for e in test] == [None, None]
    assert test[0].image == tmp_path / "imagesTr" / "case0.nii.gz"
    with pytest.raises(ValueError, match="split"):
        m.entries("train")


def test_explicit_validation_list(tmp_path):
    training = [_write_case(tmp_path, f"c{i}") for i in range(4)]
    _write_json(tmp_path, training, validation=[training[1]])
    m = Manifest.load(tmp_path / "dataset.json")
    assert [e.id for e in m.entries("validation")] == ["c1"]
    assert [e.id for e in m.entries("training")] == ["c0", "c2", "c3"]
    m.validate()  # a validation case repeated from training is not a duplicate


def test_structural_problems_listed_at_load(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({
        "labels": {"0": "background", "2": "gap"},
        "training": [{"image": "./a.nii.gz"}, 42, {"label": "./b.nii.gz"}],
    }))
    with pytest.raises(ManifestError) as info:
        Manifest.load(path)
    problems = info.value.problems
    assert len(problems) == 4
    assert any("labels: ids must be 0..1" in p for p in problems)
    assert any("training[0]: ./a.nii.gz: missing 'label'" in p for p in problems)
    assert any(p.startswith("training[1]") for p in problems)
    assert any("training[2]: missing or invalid 'image'" in p for p in problems)
    assert str(path) in str(info.value)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(path)
    with pytest.raises(ManifestError, match="file not found"):
        Manifest.load(tmp_path / "missing.json")


def test_validate_lists_every_problem_with_file_names(tmp_path):
    good = _write_case(tmp_path, "good")
    entries = [good]
    entries.append({"image": "./imagesTr/absent.nii.gz", "label": "./labelsTr/absent.nii.gz"})
    trunc = _write_case(tmp_path, "trunc")
    blob = (tmp_path / "labelsTr" / "trunc.nii.gz").read_bytes()
    (tmp_path / "labelsTr" / "trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
    entries.append(trunc)
    entries.append(_write_case(tmp_path, "flat", image=np.zeros((16, 16), np.float32)))
    entries.append(_write_case(tmp_path, "five", image=np.zeros((*SHAPE, 1, 2), np.float32)))
    entries.append(_write_case(tmp_path, "shape", labels=np.ones((16, 16, 15), np.uint8),
                               image=np.zeros(SHAPE, np.float32)))
    entries.append(_write_case(tmp_path, "affine", label_affine=np.diag([1.0, 1.2, 1.2, 1.0])))
    nan_img = np.zeros(SHAPE, np.float32)
    nan_img[3, 3, 3] = np.nan
    entries.append(_write_case(tmp_path, "nan", image=nan_img))
    outside = np.zeros(SHAPE, np.uint8)
    outside[1, 1, 1] = 9
    entries.append(_write_case(tmp_path, "outside", labels=outside))
    entries.append(_write_case(tmp_path, "empty", labels=np.zeros(SHAPE, np.uint8)))
    entries.append(dict(good))  # duplicated entry
    _write_json(tmp_path, entries)

    m = Manifest.load(tmp_path)
    with pytest.raises(ManifestError) as info:
        m.validate()
    problems = info.value.problems
    expected = {
        "absent.nii.gz: file not found": 2,  # image and label
        "trunc.nii.gz: cannot decode voxel data": 1,
        "flat.nii.gz: image has 2 dimensions": 1,
        "five.nii.gz: image has 5 dimensions": 1,
        "shape.nii.gz: label shape (16, 16, 15) does not match": 1,
        "affine.nii.gz: affine does not match image affine.nii.gz": 1,
        "nan.nii.gz: image contains 1 NaN/Inf": 1,
        "outside.nii.gz: label values [9] are outside the label ids [0, 1, 2]": 1,
        "empty.nii.gz: no foreground": 1,
        "good.nii.gz: listed 2 times (training[0].image, training[10].image)": 1,
        "labelsTr/good.nii.gz: listed 2 times": 1,
    }
    for text, count in expected.items():
        hits = [p for p in problems if text in p]
        assert len(hits) == count, (text, problems)
    assert len(problems) == sum(expected.values()), problems
    msg = str(info.value)
    assert f"{len(problems)} problems in the data set" in msg and "dataset.json" in msg
    # Header-only validation skips the decoding checks.
    with pytest.raises(ManifestError) as info:
        m.validate(check_data=False)
    assert not any("NaN" in p or "foreground" in p for p in info.value.problems)


def test_label_map_from_json(tmp_path):
    fs = np.zeros(SHAPE, np.int16)
    fs[2:6, 2:6, 2:6] = 2
    fs[8:12, 8:12, 8:12] = 41
    fs[1, 1, 1] = 17
    fs[0, 0, 0], fs[15, 15, 15] = 3, 42
    _write_json(tmp_path, [_write_case(tmp_path, "fs", labels=fs)],
                label_map={"1": [2, 41], "2": [3, 42]})
    m = Manifest.load(tmp_path, validation_fraction=0.0)
    with pytest.raises(ManifestError, match=r"fs.nii.gz: label values \[17\] are not in"):
        m.validate()
    m = Manifest.load(tmp_path, validation_fraction=0.0, unknown_labels="background")
    m.validate()
    np.testing.assert_array_equal(label_frequencies(m), [16**3 - 130, 128, 2])
    # an original id that no file holds is a typo in the map
    _write_json(tmp_path, [_write_case(tmp_path, "fs", labels=fs)],
                label_map={"1": [2, 41], "2": [3, 42, 99]})
    m = Manifest.load(tmp_path, validation_fraction=0.0, unknown_labels="background")
    with pytest.raises(ManifestError, match=r"class 2 lists original id\(s\) \[99\]"):
        m.validate()


def test_label_frequencies_cached_and_invalidated(tmp_path):
    rng = np.random.default_rng(7)
    training, raw = [], []
    for i in range(3):
        lab = rng.integers(0, 3, size=SHAPE).astype(np.uint8)
        raw.append(lab)
        training.append(_write_case(tmp_path, f"f{i}", labels=lab))
    _write_json(tmp_path, training)
    m = Manifest.load(tmp_path, validation_fraction=0.0)
    expected = sum(np.bincount(lab.ravel(), minlength=3) for lab in raw)
    cache = tmp_path / "cache"
    counts = label_frequencies(m, cache_dir=cache)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(label_frequencies(m, normalize=True), expected / expected.sum())
    cached = [p for p in os.listdir(cache) if p.startswith("label_frequencies-")]
    assert len(cached) == 1
    # Served from the cache file (poison it to prove it is read) ...
    (cache / cached[0]).write_text(json.dumps({"counts": [1, 2, 3]}))
    np.testing.assert_array_equal(label_frequencies(m, cache_dir=cache), [1, 2, 3])
    # ... and recomputed when a label file changes.
    time.sleep(0.01)
    new = np.ones(SHAPE, np.uint8)
    nib.save(nib.Nifti1Image(new, np.diag([1.2, 1.2, 1.2, 1.0])),
             str(tmp_path / "labelsTr" / "f0.nii.gz"))
    expected = np.bincount(new.ravel(), minlength=3) + sum(
        np.bincount(lab.ravel(), minlength=3) for lab in raw[1:])
    np.testing.assert_array_equal(label_frequencies(m, cache_dir=cache), expected)
    # With a geometry-preserving preprocessor, counts come from the volume cache and agree.
    np.testing.assert_array_equal(
        label_frequencies(m, preprocessor=Preprocessor(), cache_dir=cache), expected)
    # Upsampling by 2 multiplies every count by 8 (nearest neighbour).
    np.testing.assert_array_equal(
        label_frequencies(m, preprocessor=Preprocessor(target_spacing=0.6), cache_dir=cache),
        8 * expected)


def test_data_modules_import_without_tensorflow():
    import subprocess
    import sys

    code = ("import sys; import tf_explog.data.nifti, tf_explog.data.preprocess, "
            "tf_explog.data.manifest, tf_explog.data.cache; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    # `import tf_explog` imports Keras (to register custom objects); on the TensorFlow
    # backend Keras itself imports TensorFlow, so check on JAX that no tf_explog code does.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), env={**os.environ, "KERAS_BACKEND": "jax",
                                          "JAX_PLATFORMS": "cpu"})
