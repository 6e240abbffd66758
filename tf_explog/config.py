"""Typed training configuration read from YAML.

A config file is parsed with ``yaml.safe_load`` into the dataclasses below. Unknown keys,
wrong types and out-of-range values are errors that name the key (``train.epochs``) and the
file; ``--set key=value`` overrides go through the same validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from tf_explog.errors import InputError
from tf_explog.geometry import DIVISOR, POOLINGS, network_divisor


class ConfigError(InputError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# A run name is one folder name: letters, digits and . _ - (not "." or ".."), so that a
# config can never place its run outside runs_dir (``runs_dir/<name>/<stamp>/``).
_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def check_run_name(name: str, key: str = "name") -> str:
    """``name`` if it is a plain folder name (see ``_RUN_NAME``); else a `ConfigError`
    naming ``key``."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"{key} must be a folder name of letters, digits, '.', '_' and '-' "
                          f"(not starting with '.' or '-', at most 128 characters); got "
                          f"{name!r}.")
    return name


@dataclass
class PreprocessConfig:
    """Options of `tf_explog.data.preprocess.Preprocessor` (see its docstring)."""

    preset: Optional[str] = None  # "paper": isotropic at the smallest spacing, cube, resize
    target_spacing: Optional[Union[str, float, list[float]]] = None  # mm, or "min"
    pad_to_cube: bool = False
    resize_shape: Optional[Union[int, list[int]]] = None
    target_shape: Optional[Union[int, list[int]]] = None
    normalization: Optional[str] = "zscore"  # zscore | zscore_nonzero | null
    clip_percentiles: Optional[list[float]] = None
    image_order: int = 1
    crop_foreground: bool = False  # crop to the head's bounding box (from the image alone)
    crop_threshold: float = 0.0  # 0: nonzero voxels; else a fraction of the 99.5th percentile
    crop_margin: float = 10.0  # mm around the foreground box
    crop_method: str = "threshold"  # threshold | otsu (robust to noise in the air)

    def validate(self, key):
        from tf_explog.data.preprocess import Preprocessor  # numpy/scipy only

        try:
            Preprocessor(**dataclasses.asdict(self))
        except ValueError as err:
            raise ConfigError(f"{key}.{err}") from None


@dataclass
class AugmentConfig:
    enabled: bool = True
    probability: float = 0.8
    rotation: float = 30.0  # degrees
    # axes rotated about (canonical RAS: 2 = superior, i.e. in-plane axial rotation) or "all"
    rotation_axes: Union[str, list[int]] = field(default_factory=lambda: [2])
    shift: float = 0.2  # fraction of the size
    zoom: list[float] = field(default_factory=lambda: [0.8, 1.2])

    def validate(self, key):
        _range(f"{key}.probability", self.probability, 0.0, 1.0)
        _range(f"{key}.rotation", self.rotation, 0.0, 180.0)
        _range(f"{key}.shift", self.shift, 0.0, 1.0)
        if isinstance(self.rotation_axes, str):
            _choice(f"{key}.rotation_axes", self.rotation_axes, ("all",))
        elif not self.rotation_axes or not set(self.rotation_axes) <= {0, 1, 2} or len(
                set(self.rotation_axes)) != len(self.rotation_axes):
            raise ConfigError(f"{key}.rotation_axes must be \"all\" or distinct axes from "
                              f"[0, 1, 2]; got {self.rotation_axes!r}.")
        _length(f"{key}.zoom", self.zoom, 2)
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ConfigError(f"{key}.zoom must be [low, high] with 0 < low <= high; "
                              f"got {self.zoom}.")


@dataclass
class DataConfig:
    dataset: str = ""  # path to an MSD dataset.json, relative to the config file's folder
    cache_dir: Optional[str] = None  # default: <dataset folder>/.cache
    mode: str = "volume"  # volume | patch
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    oversample: float = 0.33
    validation_fraction: float = 0.2
    # JSON {"class index": [original ids]} relative to this file; overrides dataset.json's
    label_map: Optional[str] = None
    unknown_labels: str = "raise"  # raise | background: label ids the label map does not list
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, key):
        if not self.dataset:
            raise ConfigError(f"{key}.dataset is required: the path of a dataset.json.")
        _choice(f"{key}.mode", self.mode, ("volume", "patch"))
        _length(f"{key}.patch_size", self.patch_size, 3)
        for size in self.patch_size:
            if size <= 0 or size % DIVISOR:
                raise ConfigError(f"{key}.patch_size must be positive multiples of {DIVISOR} "
                                  f"({POOLINGS} poolings); got {self.patch_size}.")
        _range(f"{key}.oversample", self.oversample, 0.0, 1.0)
        _range(f"{key}.validation_fraction", self.validation_fraction, 0.0, 0.9)
        _choice(f"{key}.unknown_labels", self.unknown_labels, ("raise", "background"))
        self.preprocess.validate(f"{key}.preprocess")
        self.augment.validate(f"{key}.augment")


@dataclass
class ModelConfig:
    name: str = "wong2018"  # the builder, see tf_explog.models.MODELS
    filters: list[int] = field(default_factory=lambda: [12, 24, 48, 96, 192])
    encoder_depths: list[int] = field(default_factory=lambda: [1, 2, 3, 3, 3])
    decoder_depths: list[int] = field(default_factory=lambda: [3, 3, 2, 1])
    noise_std: float = 1.0
    dropout: float = 0.5
    aux_outputs: int = 0  # 0 = the paper's fused head alone; up to 3 auxiliary heads
    bn_momentum: float = 0.99  # not given by the paper; Keras' default
    # 1 = the paper. 2: the network works at half the input's resolution and its logits are
    # upsampled back (trilinear), so the loss sees the labels at their own resolution.
    input_downsample: int = 1

    def validate(self, key):
        from tf_explog.models import MODELS  # Keras only, no TensorFlow

        _choice(f"{key}.name", self.name, tuple(MODELS))
        _length(f"{key}.filters", self.filters, 5)
        _positive(f"{key}.filters", self.filters)
        _length(f"{key}.encoder_depths", self.encoder_depths, 5)
        _positive(f"{key}.encoder_depths", self.encoder_depths)
        _length(f"{key}.decoder_depths", self.decoder_depths, 4)
        _positive(f"{key}.decoder_depths", self.decoder_depths)
        _range(f"{key}.noise_std", self.noise_std, 0.0, 100.0)
        _range(f"{key}.dropout", self.dropout, 0.0, 0.99)
        _range(f"{key}.aux_outputs", self.aux_outputs, 0, 3)
        _range(f"{key}.bn_momentum", self.bn_momentum, 0.0, 0.9999)
        _choice(f"{key}.input_downsample", self.input_downsample, (1, 2, 4))


@dataclass
class LossConfig:
    name: str = "exp_log"  # see tf_explog.losses.LOSSES
    class_weights: Union[str, list[float], None] = "auto"  # auto = from training frequencies
    params: dict[str, Any] = field(default_factory=dict)  # passed to the loss constructor

    def validate(self, key):
        from tf_explog.losses import LOSSES  # no TensorFlow needed

        _choice(f"{key}.name", self.name, tuple(LOSSES))
        if isinstance(self.class_weights, str):
            _choice(f"{key}.class_weights", self.class_weights, ("auto",))
        try:
            LOSSES[self.name](**self.params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}.params is not valid for loss {self.name!r}: {err}") from None


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 1  # global batch size (split across replicas)
    steps_per_epoch: Optional[int] = None  # None = one pass over the training split
    optimizer: str = "nadam"  # nadam | adam | sgd
    learning_rate: float = 1e-3
    # constant, or poly: lr * (1 - step / total steps) ** lr_poly_power (nnU-Net's schedule)
    lr_schedule: str = "constant"
    lr_poly_power: float = 0.9
    dtype_policy: str = "float32"  # float32 | mixed_float16 | mixed_bfloat16
    jit_compile: Union[str, bool] = "auto"  # auto: on with a GPU, off on CPU (10x slower)
    strategy: str = "none"  # none | mirrored | multi_worker
    image_summary_every: int = 5  # epochs between TensorBoard image summaries; 0 = never
    checkpoint_monitor: str = "val_dice"
    # Population BatchNorm statistics from the clean training volumes before every
    # validation, checkpoint and at the end (tf_explog.batchnorm); false keeps Keras' EMA.
    bn_recalibration: bool = True
    bn_recalibration_passes: int = 1  # 1: batch statistics while collecting; more: refine
    # Patch mode: training-like patches per training case it recalibrates on (measured:
    # 4 kept the validation Dice of 8, bench/bn_patches.py; docs/performance.md).
    bn_recalibration_patches: int = 8
    validation_every: int = 1  # epochs between inference-mode validations
    validation_tta: bool = False  # flip test-time augmentation in validation
    # Stop after the epoch that would otherwise end past this many seconds of training
    # (the run stays a normal, finished one; DONE.json records the epochs it got).
    time_budget_s: Optional[float] = None
    # JAX backend: threads preparing batches (keras.utils.PyDataset) while the step runs;
    # TensorFlow uses tf.data's own parallelism.
    data_workers: int = 2
    verbose: int = 1

    def validate(self, key):
        _range(f"{key}.epochs", self.epochs, 1, 100000)
        _range(f"{key}.batch_size", self.batch_size, 1, 4096)
        if self.steps_per_epoch is not None:
            _range(f"{key}.steps_per_epoch", self.steps_per_epoch, 1, 10**9)
        _choice(f"{key}.optimizer", self.optimizer, ("nadam", "adam", "sgd"))
        _range(f"{key}.learning_rate", self.learning_rate, 1e-12, 10.0)
        _choice(f"{key}.lr_schedule", self.lr_schedule, ("constant", "poly"))
        _range(f"{key}.lr_poly_power", self.lr_poly_power, 1e-3, 100.0)
        _choice(f"{key}.dtype_policy", self.dtype_policy,
                ("float32", "mixed_float16", "mixed_bfloat16"))
        _choice(f"{key}.jit_compile", self.jit_compile, ("auto", True, False))
        _choice(f"{key}.strategy", self.strategy, ("none", "mirrored", "multi_worker"))
        _range(f"{key}.image_summary_every", self.image_summary_every, 0, 10**6)
        _range(f"{key}.bn_recalibration_passes", self.bn_recalibration_passes, 1, 100)
        _range(f"{key}.bn_recalibration_patches", self.bn_recalibration_patches, 1, 10**4)
        _range(f"{key}.validation_every", self.validation_every, 1, 10**6)
        if self.time_budget_s is not None:
            _range(f"{key}.time_budget_s", self.time_budget_s, 1e-3, 1e9)
        _range(f"{key}.data_workers", self.data_workers, 1, 256)
        _choice(f"{key}.verbose", self.verbose, (0, 1, 2))


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Folder that relative paths in the file are resolved against (not a YAML key).
    base_dir: str = field(default=".", metadata={"internal": True})

    def validate(self):
        check_run_name(self.name)  # the run folder must stay inside runs_dir
        # NumPy, Python and the backends all accept seeds in [0, 2**32).
        _range("seed", self.seed, 0, 2**32 - 1)
        self.data.validate("data")
        self.model.validate("model")
        self.loss.validate("loss")
        self.train.validate("train")
        target = self.data.preprocess.target_shape
        if self.data.mode == "volume" and target is not None:
            # Whole volumes reach the network at this shape: it must survive 4 poolings.
            sizes = [target] * 3 if isinstance(target, int) else list(target)
            if any(int(s) % DIVISOR for s in sizes):
                raise ConfigError(f"data.preprocess.target_shape must be multiples of "
                                  f"{DIVISOR} in volume mode (the network halves the "
                                  f"resolution {POOLINGS} times); got {target!r}.")
        factor = self.model.input_downsample
        if factor > 1:
            if self.data.mode != "patch":
                raise ConfigError(f"model.input_downsample: {factor} needs data.mode: patch "
                                  f"(whole volumes are padded to multiples of {DIVISOR} only); "
                                  f"got "
                                  f"data.mode: {self.data.mode}.")
            divisor = network_divisor(factor)
            if any(size % divisor for size in self.data.patch_size):
                raise ConfigError(f"data.patch_size must be multiples of {divisor} with "
                                  f"model.input_downsample: {factor}; got "
                                  f"{self.data.patch_size}.")
        return self

    def resolve(self, path: str | None) -> Path | None:
        """A path from the config, relative to the config file's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("base_dir")
        return out

    def fingerprint(self) -> str:
        """Stable hash of the settings (recorded with runs and exported models)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


#: YAML aliases (``*name``) allowed in one file: enough for any config, far too few for an
#: alias bomb (nested aliases that expand to gigabytes once copied).
MAX_YAML_ALIASES = 100
#: Largest config file read.
MAX_CONFIG_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice."""


def _no_duplicate_keys(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice "
                              f"(first on line {seen[key] + 1})")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _no_duplicate_keys)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path`` (``yaml.safe_load``) with the checks a config needs:
    at most 1 MiB, no key given twice, at most ``MAX_YAML_ALIASES`` aliases.

    Raises:
        ConfigError: naming the file (and the line) for anything wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config is at most "
                          f"{MAX_CONFIG_BYTES} bytes.")
    try:
        text = path.read_text()
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text))
        if aliases > MAX_YAML_ALIASES:
            raise ConfigError(f"{aliases} YAML aliases; at most {MAX_YAML_ALIASES} "
                              "are allowed in a config.")
        raw = yaml.load(text, Loader=_StrictLoader) or {}
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping; got "
                          f"{type(raw).__name__}.")
    return raw


def packaged_config(name: str) -> Path:
    """The path of a config shipped with the package (``train_configs/NAME.yaml`` in the
    source tree, ``tf_explog/train_configs/`` once installed), e.g. ``"demo"``.

    Raises:
        ConfigError: no such packaged config (the message lists those there are).
    """
    from importlib import resources

    root = Path(str(resources.files("tf_explog.train_configs")))
    path = root / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        known = sorted(p.stem for p in root.glob("*.yaml"))
        raise ConfigError(f"no packaged config {name!r}; there are {known}.")
    return path


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML config file, applies ``key=value`` overrides and validates it.

    Raises:
        ConfigError: naming the file and the key for anything wrong.
    """
    path = Path(path)
    raw = read_yaml(path)
    try:
        config = config_from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    config.base_dir = str(path.resolve().parent)
    return config


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping; got {type(raw).__name__}.")
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=3).")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(part.strip() for part in parts):
            raise ConfigError(f"override {item!r}: the key {key.strip()!r} must be dotted "
                              "names without empty parts (e.g. train.epochs=3).")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({str(err).splitlines()[0]}).") from None
        _set_dotted(raw, key.strip(), parsed)
    return dataclass_from_dict(Config, raw, "").validate()


def _set_dotted(raw, key, value):
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section.")
    node[parts[-1]] = value


def dataclass_from_dict(cls, raw, prefix):
    """An instance of the config dataclass ``cls`` from a mapping, sections recursively;
    unknown keys and wrong types raise a `ConfigError` naming ``prefix.key``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping; got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; allowed: "
            f"{', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(hint, value, key):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return dataclass_from_dict(hint, value, key)
    if origin is Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key} has the wrong type: got {value!r} ({type(value).__name__}); "
                          f"expected {_describe(hint)}.")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_describe(item)}; got {value!r}.")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {value!r}.")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r}.")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}.")


def _describe(hint):
    origin = typing.get_origin(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _choice(key, value, allowed):
    if value not in allowed:
        shown = ", ".join("null" if a is None else repr(a) for a in allowed)
        raise ConfigError(f"{key} must be one of {shown}; got {value!r}.")


def _range(key, value, low, high):
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high}; got {value!r}.")


def _length(key, value, n):
    if len(value) != n:
        raise ConfigError(f"{key} must have {n} entries; got {value!r}.")


def _positive(key, values):
    if any(v <= 0 for v in values):
        raise ConfigError(f"{key} must be positive; got {values!r}.")
