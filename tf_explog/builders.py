"""From a `Config` to everything training needs: :class:`TrainingSetup`.

``TrainingSetup.from_config(config)`` reads and validates the data set, fixes the
preprocessing and the volume cache, counts the class weights, and builds the model, loss,
metrics, optimizer, augmentation, the input stream (``tf.data`` or a ``PyDataset``) and the
callbacks that validate in inference mode. Every trainer uses it: ``tf_explog.training``
(``fit``), ``tf_explog.distributed`` (the multi-worker loop), the JAX path
(``bench/train_jax.py``) and, through those, ``tf_explog.experiments``.

The module-level functions are its parts, for callers that hold the pieces already. This
module must not import TensorFlow (only :meth:`TrainingSetup.tf_dataset` does, when called).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import keras

from tf_explog import losses as losses_lib
from tf_explog.config import Config, ConfigError
from tf_explog.metrics import PerLabelDice
from tf_explog.models import MODELS, aux_loss_weights


def learning_rate(config: Config, steps_per_epoch: Optional[int] = None):
    """``train.learning_rate``, constant or decayed by ``train.lr_schedule``.

    ``poly`` (nnU-Net; Isensee et al., Nat. Methods 2021): ``lr_t = lr · (1 − t / T)^p`` with
    ``T = epochs × steps_per_epoch`` optimizer steps and ``p = train.lr_poly_power``
    (Keras' ``PolynomialDecay`` with end rate 0, so it resumes with the optimizer's
    iteration count).
    """
    t = config.train
    if t.lr_schedule == "constant":
        return t.learning_rate
    steps = t.steps_per_epoch or steps_per_epoch
    if not steps:
        raise ConfigError("train.lr_schedule=poly needs the steps per epoch "
                          "(train.steps_per_epoch, or a training split to count).")
    return keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=t.learning_rate, decay_steps=int(t.epochs * steps),
        end_learning_rate=0.0, power=t.lr_poly_power)


def make_optimizer(config: Config, steps_per_epoch: Optional[int] = None
                   ) -> keras.optimizers.Optimizer:
    """The paper's Nadam (Adam with Nesterov momentum) by default."""
    lr = learning_rate(config, steps_per_epoch)
    return {
        "nadam": lambda: keras.optimizers.Nadam(lr),
        "adam": lambda: keras.optimizers.Adam(lr),
        "sgd": lambda: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    }[config.train.optimizer]()


def make_loss(config: Config, class_weights, reduction="sum_over_batch_size"):
    """The configured loss, with class weights where the loss takes them."""
    params = dict(config.loss.params)
    cls = losses_lib.LOSSES[config.loss.name]
    if "class_weights" in inspect.signature(cls.__init__).parameters and (
            "class_weights" not in params):
        params["class_weights"] = class_weights
    return cls(reduction=reduction, **params)


def loss_terms(loss: keras.losses.Loss) -> dict:
    """The Dice and cross-entropy terms of an ExpLogLoss, by the name they are logged under:
    ``{name: (fn, kwargs)}`` with ``fn(y_true, y_pred, **kwargs)`` the per-sample values
    (registered functions, so a metric made of them saves with the model). Empty for other
    losses."""
    if not isinstance(loss, losses_lib.ExpLogLoss):
        return {}
    cfg = loss.get_config()
    return {
        "dice_term": (losses_lib.log_dice_loss, dict(
            gamma=cfg["gamma_dice"], smooth=cfg["smooth"], from_logits=cfg["from_logits"],
            include_background=cfg["include_background"])),
        "cross_term": (losses_lib.weighted_cross_entropy, dict(
            gamma=cfg["gamma_cross"], class_weights=cfg["class_weights"],
            from_logits=cfg["from_logits"])),
    }


def term_metrics(loss: keras.losses.Loss) -> list:
    """Metrics reporting the Dice and cross-entropy terms of an ExpLogLoss separately."""
    return [keras.metrics.MeanMetricWrapper(fn, name=name, **kwargs)
            for name, (fn, kwargs) in loss_terms(loss).items()]


def load_manifest(config: Config):
    """The data set of a config, with ``data.label_map`` (a file) when it gives one."""
    from tf_explog.data.manifest import Manifest
    from tf_explog.labels import load_label_map

    d = config.data
    label_map = load_label_map(config.resolve(d.label_map)) if d.label_map else None
    return Manifest.load(config.resolve(d.dataset), validation_fraction=d.validation_fraction,
                         seed=config.seed, label_map=label_map,
                         unknown_labels=d.unknown_labels)


def make_preprocessor(config: Config, manifest=None):
    """The configured Preprocessor, with the data set's label map when it has one."""
    from tf_explog.data.preprocess import Preprocessor

    preprocessor = Preprocessor(**dataclasses.asdict(config.data.preprocess))
    return manifest.preprocessor_for(preprocessor) if manifest is not None else preprocessor


def cache_dir_for(config: Config) -> Path:
    if config.data.cache_dir:
        return config.resolve(config.data.cache_dir)
    return config.resolve(config.data.dataset).parent / ".cache"


def make_augmentation(config: Config, seed: int):
    a = config.data.augment
    if not a.enabled or a.probability == 0:
        return None
    from tf_explog.augmentation import RandomAffine3D

    return RandomAffine3D(
        rotation=a.rotation, rotation_axes=a.rotation_axes, shift=a.shift,
        zoom=tuple(a.zoom), probability=a.probability, seed=seed)


def class_weights_for(config: Config, manifest, preprocessor, cache_dir):
    """``loss.class_weights``: "auto" counts label frequencies over the training split once."""
    setting = config.loss.class_weights
    if setting is None:
        return None
    if setting == "auto":
        from tf_explog.data.manifest import label_frequencies

        freqs = label_frequencies(manifest, preprocessor=preprocessor, cache_dir=cache_dir)
        return losses_lib.class_weights_from_frequencies(freqs)
    if len(setting) != manifest.num_classes:
        raise ConfigError(
            f"loss.class_weights has {len(setting)} entries; the data set has "
            f"{manifest.num_classes} labels."
        )
    return list(setting)


def build_from_config(config: Config, num_classes: int, channels: int) -> keras.Model:
    """The network ``model.name`` names (`tf_explog.models.MODELS`), given the ``model``
    settings its builder takes."""
    m = config.model
    builder = MODELS[m.name]
    settings = dict(
        filters=tuple(m.filters), encoder_depths=tuple(m.encoder_depths),
        decoder_depths=tuple(m.decoder_depths), noise_std=m.noise_std, dropout=m.dropout,
        aux_outputs=m.aux_outputs, bn_momentum=m.bn_momentum,
        input_downsample=m.input_downsample)
    accepted = inspect.signature(builder).parameters
    return builder(input_shape=(None, None, None, channels), num_classes=num_classes,
                   seed=config.seed, **{k: v for k, v in settings.items() if k in accepted})


def compile_model(model, config: Config, class_weights, label_names, jit_compile,
                  steps_per_epoch: Optional[int] = None):
    """compile() with the configured loss (one per output with aux heads), metrics and
    optimizer (``steps_per_epoch`` sizes a decaying learning-rate schedule)."""
    loss = make_loss(config, class_weights)
    dice = PerLabelDice(num_classes=len(label_names), label_names=label_names, name="dice")
    metrics = [dice, *term_metrics(loss)]
    n_aux = config.model.aux_outputs
    if n_aux:
        model.compile(
            optimizer=make_optimizer(config, steps_per_epoch),
            loss=losses_lib.deep_supervision_losses(loss, n_aux,
                                                    config.model.input_downsample),
            loss_weights=aux_loss_weights(n_aux),
            metrics={"segmentation": metrics},
            jit_compile=jit_compile)
    else:
        model.compile(optimizer=make_optimizer(config, steps_per_epoch), loss=loss,
                      metrics=metrics,
                      jit_compile=jit_compile)
    return model


def logged_metrics(config: Config, label_names) -> list:
    """The names a run of ``config`` logs each epoch (``metrics.csv``, TensorBoard), the
    ``val_*`` ones when it has a validation split: what ``train.checkpoint_monitor`` may
    name.

    `PerLabelDice` returns a dict, whose keys Keras logs as they are ("dice",
    "dice_<label>"), also when the model has auxiliary outputs; other metrics of a
    dict-output model get the output name as prefix ("segmentation_dice_term").
    """
    from tf_explog.labels import aux_name
    from tf_explog.metrics import log_key

    structures = [log_key(n) for n in list(label_names)[1:]]
    dice = ["dice", *(f"dice_{k}" for k in structures)]
    n_aux = config.model.aux_outputs
    terms = list(loss_terms(make_loss(config, None)))
    if n_aux:
        terms = [f"segmentation_{t}" for t in terms]
        losses = ["segmentation_loss", *(f"{aux_name(k)}_loss" for k in range(1, n_aux + 1))]
    else:
        losses = []
    return ["loss", *losses, *dice, *terms, "val_loss", *(f"val_{d}" for d in dice)]


def check_monitor(config: Config, label_names) -> str:
    """``train.checkpoint_monitor``, if a run of ``config`` logs it; else a `ConfigError`
    listing what it logs (a typo would otherwise never improve, and the final model would
    be taken for the best)."""
    monitor = config.train.checkpoint_monitor
    names = logged_metrics(config, label_names)
    if monitor not in names:
        raise ConfigError(f"train.checkpoint_monitor: {monitor!r} is not a metric this run "
                          f"logs; expected one of {', '.join(names)}.")
    return monitor


def patch_window(config: Config):
    """The sliding window of a patch-trained model (its patch size), None for volumes."""
    return tuple(config.data.patch_size) if config.data.mode == "patch" else None


def recalibration_batches(config: Config, train_volumes):
    """Clean batches for BatchNorm recalibration, like the training batches: whole training
    volumes (volume mode), or training-like patches without augmentation (patch mode, see
    `tf_explog.data.core.clean_patches`)."""
    from tf_explog.data.core import clean_batches, clean_patches

    window = patch_window(config)
    if window is None:
        return clean_batches(train_volumes)
    return clean_patches(train_volumes, window, config.data.oversample,
                         per_case=config.train.bn_recalibration_patches, seed=config.seed)


def inference_callbacks(config: Config, train_volumes, val_volumes, label_names,
                        class_weights, eager_validation: bool = False) -> list:
    """The callbacks that make a run judge the model as users run it, in their order.

    ``NonFiniteGuard`` (first: stops at a NaN before anything is saved), ``EpochTimer``
    (training steps only), ``BatchNormRecalibration`` on the clean training volumes, and
    ``InferenceValidation`` on the validation volumes (whole volumes or sliding windows),
    which writes the ``val_*`` logs that checkpointing and logging callbacks read.
    """
    from tf_explog.batchnorm import BatchNormRecalibration
    from tf_explog.callbacks import EpochTimer, InferenceValidation, NonFiniteGuard

    t = config.train
    window = patch_window(config)
    callbacks = [NonFiniteGuard(), EpochTimer()]
    if t.bn_recalibration:
        callbacks.append(BatchNormRecalibration(
            recalibration_batches(config, train_volumes), every=t.validation_every,
            passes=t.bn_recalibration_passes))
    if val_volumes is not None:
        callbacks.append(InferenceValidation(
            val_volumes, len(label_names), label_names, window=window,
            tta=t.validation_tta, loss=make_loss(config, class_weights),
            every=t.validation_every, eager=eager_validation))
    return callbacks


# --------------------------------------------------------------------------------------
# The whole setup
# --------------------------------------------------------------------------------------


@dataclass
class TrainingSetup:
    """A config turned into data, class weights and Keras objects, in one place.

    Attributes:
        config: the validated `Config`.
        manifest: the data set (`tf_explog.data.manifest.Manifest`, label map applied).
        preprocessor: the preprocessing (`tf_explog.data.preprocess.Preprocessor`).
        cache_dir: the volume cache shared by every front end.
    """

    config: Config
    manifest: Any
    preprocessor: Any
    cache_dir: Path

    @classmethod
    def from_config(cls, config: Config, *, validate: bool = True) -> "TrainingSetup":
        """Reads the data set of ``config`` and, with ``validate``, checks every case of
        every split first (all problems at once, each naming its file; a clean check is
        remembered in the cache until a file changes).

        Raises:
            ManifestError: the data set is unusable.
            ConfigError: the config does not fit the data set.
        """
        manifest = load_manifest(config)
        check_monitor(config, manifest.label_names)
        cache_dir = cache_dir_for(config)
        if validate:
            manifest.validate(cache_dir=cache_dir)
        return cls(config, manifest, make_preprocessor(config, manifest), cache_dir)

    # ------------------------------------------------------------------ data

    @property
    def label_names(self) -> list:
        return list(self.manifest.label_names)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.label_names)

    @property
    def num_channels(self) -> int:
        return int(self.manifest.num_channels)

    @cached_property
    def class_weights(self) -> Optional[list]:
        """``loss.class_weights`` resolved ("auto": from the training split, counted once)."""
        return class_weights_for(self.config, self.manifest, self.preprocessor,
                                 self.cache_dir)

    def volumes(self, split: str):
        """The preprocessed whole volumes of a split (`SplitVolumes`), None when empty."""
        from tf_explog.data.core import split_volumes

        return split_volumes(self.manifest, split, self.preprocessor, self.cache_dir)

    @property
    def window(self) -> Optional[tuple]:
        """The sliding window of a patch-trained model (its patch size), None for volumes."""
        return patch_window(self.config)

    def augmentation(self):
        return make_augmentation(self.config, self.config.seed)

    def tf_dataset(self, batch_size: Optional[int] = None, repeat: Optional[bool] = None):
        """The shuffled, augmented ``tf.data`` stream of the training split (TensorFlow);
        endless when ``repeat`` (default: when ``train.steps_per_epoch`` is set).

        Validation does not stream: it runs on whole volumes in inference mode
        (:meth:`inference_callbacks`).
        """
        from tf_explog.data.pipeline import make_dataset

        c, d = self.config, self.config.data
        return make_dataset(
            self.manifest, "training", mode=d.mode, patch_size=tuple(d.patch_size),
            batch_size=batch_size or c.train.batch_size, cache_dir=self.cache_dir,
            preprocessor=self.preprocessor, aux_outputs=c.model.aux_outputs, shuffle=True,
            seed=c.seed, oversample=d.oversample, augment=self.augmentation(),
            repeat=c.train.steps_per_epoch is not None if repeat is None else repeat)

    def sequence(self, split: str = "training", *, batch_size: Optional[int] = None,
                 workers: int = 1, use_multiprocessing: bool = False,
                 max_queue_size: int = 10):
        """The `VolumeSequence` (``keras.utils.PyDataset``, any backend) of a split.

        Training: shuffled, augmented as ``data.augment`` says, endless when
        ``train.steps_per_epoch`` is set. Other splits: manifest order, no augmentation.
        """
        from tf_explog.data.pydataset import VolumeSequence

        c, d = self.config, self.config.data
        training = split == "training"
        return VolumeSequence(
            self.manifest, split, mode=d.mode, patch_size=tuple(d.patch_size),
            batch_size=int(batch_size or c.train.batch_size), shuffle=training,
            seed=int(c.seed), oversample=d.oversample, cache_dir=self.cache_dir,
            preprocessor=self.preprocessor,
            augment=self.augmentation() if training else None,
            aux_outputs=int(c.model.aux_outputs), workers=workers,
            use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size,
            repeat=training and c.train.steps_per_epoch is not None)

    def sequences(self, **kwargs) -> tuple:
        """``(training sequence, validation sequence or None)``; see :meth:`sequence`."""
        val = (self.sequence("validation", **kwargs)
               if self.manifest.entries("validation") else None)
        return self.sequence("training", **kwargs), val

    # ------------------------------------------------------------------ Keras objects

    def loss(self, reduction: Optional[str] = "sum_over_batch_size") -> keras.losses.Loss:
        return make_loss(self.config, self.class_weights, reduction=reduction)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: ``train.steps_per_epoch``, else one pass over the
        training split (its cases over the batch size, rounded up: the last batch may be
        short, as Keras' ``fit`` takes it). Every trainer uses this count."""
        t = self.config.train
        if t.steps_per_epoch:
            return int(t.steps_per_epoch)
        cases = len(self.manifest.entries("training"))
        return max(1, math.ceil(cases / t.batch_size))

    def optimizer(self) -> keras.optimizers.Optimizer:
        return make_optimizer(self.config, self.steps_per_epoch)

    def build_model(self) -> keras.Model:
        return build_from_config(self.config, self.num_classes, self.num_channels)

    def compile(self, model: keras.Model, jit_compile) -> keras.Model:
        return compile_model(model, self.config, self.class_weights, self.label_names,
                             jit_compile, self.steps_per_epoch)

    def inference_callbacks(self, eager_validation: bool = False) -> list:
        """NaN guard, epoch timer, BatchNorm recalibration and inference-mode validation,
        in that order (see :func:`inference_callbacks`)."""
        return inference_callbacks(self.config, self.volumes("training"),
                                   self.volumes("validation"), self.label_names,
                                   self.class_weights, eager_validation=eager_validation)
