"""Config loading: YAML into dataclasses, every error names the key."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from tf_explog.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def minimal(**sections):
    raw = {"name": "t", "data": {"dataset": "data/dataset.json"}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def test_shipped_configs_load():
    paths = [p for p in sorted((REPO / "train_configs").glob("*.yaml"))
             if not p.name.startswith("reproduce_")]  # those: tests/test_experiments.py
    assert {p.name for p in paths} >= {"paper.yaml", "demo.yaml"}
    for path in paths:
        config = load_config(path)
        assert config.base_dir == str(path.parent)
        assert config.name


def test_paper_config_is_the_paper():
    c = load_config(REPO / "train_configs" / "paper.yaml")
    assert c.data.mode == "volume" and c.data.preprocess.resize_shape == 128
    assert c.data.preprocess.preset == "paper"
    assert c.train.batch_size == 1 and c.train.optimizer == "nadam"
    assert c.train.learning_rate == 1e-3 and c.train.epochs == 100
    assert c.data.augment.probability == 0.8 and c.model.aux_outputs == 0
    assert c.loss.name == "exp_log"
    assert c.loss.params == {"gamma_dice": 0.3, "gamma_cross": 0.3, "w_dice": 0.8,
                             "w_cross": 0.2, "smooth": 1.0}


def test_defaults_and_overrides():
    c = config_from_dict(minimal(), ["train.epochs=3", "data.patch_size=[32,32,32]",
                                     "train.jit_compile=false", "loss.params.gamma_dice=0.5"])
    assert c.train.epochs == 3 and c.data.patch_size == [32, 32, 32]
    assert c.train.jit_compile is False and c.loss.params == {"gamma_dice": 0.5}
    assert c.train.dtype_policy == "float32"


def test_fingerprint_changes_with_settings():
    a = config_from_dict(minimal())
    b = config_from_dict(minimal(), ["train.epochs=7"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == config_from_dict(minimal()).fingerprint()


def test_dump_round_trips():
    c = config_from_dict(minimal(), ["model.aux_outputs=2"])
    again = config_from_dict(yaml.safe_load(c.dump()))
    assert again.to_dict() == c.to_dict()


@pytest.mark.parametrize("overrides,key", [
    (["train.epochz=3"], "train.epochz"),
    (["colour=red"], "colour"),
    (["data.preprocess.spacingg=1"], "data.preprocess.spacingg"),
    (["train.epochs=three"], "train.epochs"),
    (["train.epochs=0"], "train.epochs"),
    (["train.epochs=2.5"], "train.epochs"),
    (["train.learning_rate=-1"], "train.learning_rate"),
    (["train.dtype_policy=float16"], "train.dtype_policy"),
    (["train.strategy=tpu"], "train.strategy"),
    (["train.jit_compile=maybe"], "train.jit_compile"),
    (["data.mode=slices"], "data.mode"),
    (["data.patch_size=[30,32,32]"], "data.patch_size"),
    (["data.patch_size=[32,32]"], "data.patch_size"),
    (["data.augment.probability=1.5"], "data.augment.probability"),
    (["data.augment.zoom=[1.2,0.8]"], "data.augment.zoom"),
    (["model.filters=[1,2,3]"], "model.filters"),
    (["model.aux_outputs=4"], "model.aux_outputs"),
    (["loss.name=focal"], "loss.name"),
    (["loss.class_weights=sometimes"], "loss.class_weights"),
    (["loss.params={gamma_dice: -1}"], "loss.params"),
    (["loss.params={colour: 1}"], "loss.params"),
    (["data.preprocess.normalization=minmax"], "data.preprocess.normalization"),
    (["data.dataset=''"], "data.dataset"),
    (["train.time_budget_s=0"], "train.time_budget_s"),
    (["train.time_budget_s=soon"], "train.time_budget_s"),
    (["train.data_workers=0"], "train.data_workers"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        config_from_dict(minimal(), overrides)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(minimal(train={"batch_size": "big"})))
    with pytest.raises(ConfigError, match=r"wrong.yaml.*train\.batch_size"):
        load_config(wrong)
    with pytest.raises(ConfigError, match="missing.yaml.*not found"):
        load_config(tmp_path / "missing.yaml")


def test_bn_recalibration_patches_sets_the_patches_per_case(tmp_path):
    from tf_explog.builders import recalibration_batches

    assert config_from_dict(minimal()).train.bn_recalibration_patches == 8
    with pytest.raises(ConfigError, match=r"train\.bn_recalibration_patches"):
        config_from_dict(minimal(), ["train.bn_recalibration_patches=0"])
    c = config_from_dict(minimal(), ["data.mode=patch", "data.patch_size=[16,16,16]",
                                     "train.bn_recalibration_patches=3"])

    class Entry:
        def sample_patch(self, patch, rng, oversample):
            return np.zeros(tuple(patch) + (1,), np.float32), None, None

    class Volumes:
        pairs = [("a", "a"), ("b", "b")]

        class cache:
            @staticmethod
            def entry(*pair):
                return Entry()

    patches = list(recalibration_batches(c, Volumes())())
    assert len(patches) == 2 * 3 and patches[0].shape == (1, 16, 16, 16, 1)
