"""`tf-explog dataset init / check` and `train --data`: your own data, laid out and checked."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from tf_explog import cli
from tf_explog.data.layout import check_dataset, init_dataset, pair_files
from tf_explog.data.manifest import Manifest, ManifestError


def _save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine),
             str(path))


def _labels(seed, ids):
    """A 16³ label volume with a box of each id (so every id occurs)."""
    lab = np.zeros((16, 16, 16), np.int16)
    for k, value in enumerate(ids):
        lab[2 + 3 * k: 4 + 3 * k, 3:9, 4 + seed % 3: 10] = value
    return lab


@pytest.fixture
def folders(tmp_path):
    """my_data/images/case0{1,2,3}.nii.gz and my_data/labels/ with the usual name variants."""
    root = tmp_path / "my_data"
    rng = np.random.default_rng(0)
    for i, label_name in enumerate(["case01.nii.gz", "case02_seg.nii.gz", "case03_mask.nii"]):
        _save(root / "images" / f"case0{i + 1}.nii.gz",
              rng.normal(size=(16, 16, 16)).astype(np.float32))
        _save(root / "labels" / label_name, _labels(i, [1, 2]))
    return root


def test_init_pairs_by_name_and_writes_a_valid_msd_dataset(folders, tmp_path, capsys):
    out = folders / "dataset.json"
    assert cli.main(["dataset", "init", "--images", str(folders / "images"), "--labels",
                     str(folders / "labels"), "--out", str(out), "--label-names",
                     "background,liver,tumour"]) == 0
    assert "3 labelled case(s)" in capsys.readouterr().out
    raw = json.loads(out.read_text())
    assert raw["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert raw["numTraining"] == 3 and "label_map" not in raw
    assert raw["training"][1] == {"image": "./images/case02.nii.gz",
                                  "label": "./labels/case02_seg.nii.gz"}
    manifest = Manifest.load(out)
    manifest.validate()  # paths relative to the json resolve, every case decodes
    assert [e.id for e in manifest.training] == ["case01", "case02", "case03"]
    # never replaced without --overwrite; nothing written under a temporary name is left
    before = out.read_bytes()
    assert cli.main(["dataset", "init", "--images", str(folders / "images"), "--labels",
                     str(folders / "labels"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert sorted(p.name for p in folders.iterdir()) == ["dataset.json", "images", "labels"]
    assert cli.main(["dataset", "check", str(folders)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {out}: 3 labelled case(s), 0 test")


def test_init_maps_non_contiguous_ids_to_classes(folders, tmp_path):
    for path in (folders / "labels").iterdir():
        image = nib.load(str(path))
        lab = np.asarray(image.dataobj)
        _save(path, np.where(lab == 1, 41, np.where(lab == 2, 2, 0)).astype(np.int16),
              image.affine)
    raw = init_dataset(folders / "images", folders / "labels", tmp_path / "elsewhere" / "d.json")
    assert raw["labels"] == {"0": "background", "1": "label_2", "2": "label_41"}
    assert raw["label_map"] == {"1": [2], "2": [41]}
    assert raw["training"][0]["image"] == "../my_data/images/case01.nii.gz"
    Manifest.load(tmp_path / "elsewhere" / "d.json").validate()


def test_init_lists_every_unpaired_file_and_writes_nothing(folders, capsys):
    os.remove(folders / "labels" / "case02_seg.nii.gz")
    _save(folders / "labels" / "case09.nii.gz", _labels(0, [1]))
    found_pairs, problems = pair_files(folders / "images", folders / "labels")
    assert [p[0] for p in found_pairs] == ["case01", "case03"]
    assert len(problems) == 2
    assert any(p.startswith(str(folders / "labels" / "case09.nii.gz")) for p in problems)
    assert any(p.startswith(str(folders / "images" / "case02.nii.gz")) for p in problems)
    assert cli.main(["dataset", "init", "--images", str(folders / "images"), "--labels",
                     str(folders / "labels"), "--out", str(folders / "dataset.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case09.nii.gz" in err[0] and "case02.nii.gz" in err[0]
    assert not (folders / "dataset.json").exists()


def test_check_lists_one_line_per_problem_naming_the_file(folders, capsys):
    init_dataset(folders / "images", folders / "labels", folders / "dataset.json")
    # a truncated image, a label on another grid, and a label with no foreground
    (folders / "images" / "case01.nii.gz").write_bytes(b"not a nifti file")
    _save(folders / "labels" / "case02_seg.nii.gz", _labels(0, [1, 2])[:, :, :12])
    _save(folders / "labels" / "case03_mask.nii", np.zeros((16, 16, 16), np.int16))
    assert cli.main(["dataset", "check", str(folders / "dataset.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4, err  # three problems, then the one error line
    assert err[0].startswith(str(folders / "images" / "case01.nii.gz") + ":")
    assert err[1].startswith(str(folders / "labels" / "case02_seg.nii.gz") + ":")
    assert "does not match" in err[1]
    assert err[2].startswith(str(folders / "labels" / "case03_mask.nii") + ":")
    assert "no foreground" in err[2]
    assert err[3] == (f"tf-explog dataset check: error: {folders / 'dataset.json'}: 3 problems "
                      "(listed above)")


def test_check_names_the_json_for_problems_of_its_structure(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "a"},
                                "training": [{"image": "x.nii.gz"}, "y.nii.gz"]}))
    found = check_dataset(path)
    assert not found.ok and len(found.problems) == 2
    assert all(p.startswith(f"{path}: training[") for p in found.problems), found.problems


def test_train_data_is_relative_to_the_current_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text("name: x\ndata: {dataset: nowhere.json}\n")
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["train", "--config", "configs/c.yaml", "--data",
                                          "my_data", "--set", "train.epochs=1"])
    (tmp_path / "my_data").mkdir()
    assert cli.train_overrides(args) == [
        "train.epochs=1", f"data.dataset={tmp_path / 'my_data' / 'dataset.json'}"]
    from tf_explog.config import load_config

    config = load_config("configs/c.yaml", cli.train_overrides(args))
    assert config.resolve(config.data.dataset) == tmp_path / "my_data" / "dataset.json"
    # a path that is not there: one line naming it and where it was looked for
    assert cli.main(["train", "--config", "configs/c.yaml", "--data", "missing.json"]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and str(tmp_path) in err
    assert cli.main(["train", "--resume", "r", "--data", "my_data"]) == 2
