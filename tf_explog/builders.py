"""Keras objects built from a `Config`: model, loss, metrics, optimizer, data settings.

Shared by the TensorFlow training path (`tf_explog.training`) and the TensorFlow-free JAX
path (`bench/train_jax.py` over `tf_explog.data.pydataset`), so this module must not import
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import keras

from tf_explog import losses as losses_lib
from tf_explog.config import Config, ConfigError
from tf_explog.metrics import PerLabelDice
from tf_explog.models import aux_loss_weights, build_model


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    """The paper's Nadam (Adam with Nesterov momentum) by default."""
    lr = config.train.learning_rate
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


def term_metrics(loss: keras.losses.Loss) -> list:
    """Metrics reporting the Dice and cross-entropy terms of an ExpLogLoss separately."""
    if not isinstance(loss, losses_lib.ExpLogLoss):
        return []
    cfg = loss.get_config()
    return [
        keras.metrics.MeanMetricWrapper(
            losses_lib.log_dice_loss, name="dice_term", gamma=cfg["gamma_dice"],
            smooth=cfg["smooth"], from_logits=cfg["from_logits"],
            include_background=cfg["include_background"]),
        keras.metrics.MeanMetricWrapper(
            losses_lib.weighted_cross_entropy, name="cross_term", gamma=cfg["gamma_cross"],
            class_weights=cfg["class_weights"], from_logits=cfg["from_logits"]),
    ]


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
    m = config.model
    return build_model(
        input_shape=(None, None, None, channels), num_classes=num_classes,
        filters=tuple(m.filters), encoder_depths=tuple(m.encoder_depths),
        decoder_depths=tuple(m.decoder_depths), noise_std=m.noise_std, dropout=m.dropout,
        aux_outputs=m.aux_outputs, bn_momentum=m.bn_momentum, seed=config.seed)


def compile_model(model, config: Config, class_weights, label_names, jit_compile):
    """compile() with the configured loss (one per output with aux heads) and metrics."""
    loss = make_loss(config, class_weights)
    dice = PerLabelDice(num_classes=len(label_names), label_names=label_names, name="dice")
    metrics = [dice, *term_metrics(loss)]
    n_aux = config.model.aux_outputs
    if n_aux:
        model.compile(
            optimizer=make_optimizer(config),
            loss=losses_lib.deep_supervision_losses(loss, n_aux),
            loss_weights=aux_loss_weights(n_aux),
            metrics={"segmentation": metrics},
            jit_compile=jit_compile)
    else:
        model.compile(optimizer=make_optimizer(config), loss=loss, metrics=metrics,
                      jit_compile=jit_compile)
    return model


def monitor_name(config: Config) -> str:
    """The logged name of ``train.checkpoint_monitor``.

    `PerLabelDice` returns a dict, whose keys Keras logs as they are ("dice", "dice_<label>"),
    also when the model has auxiliary outputs; other metrics of a dict-output model get the
    output name as prefix ("segmentation_cross_term").
    """
    return config.train.checkpoint_monitor


def patch_window(config: Config):
    """The sliding window of a patch-trained model (its patch size), None for volumes."""
    return tuple(config.data.patch_size) if config.data.mode == "patch" else None


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
    from tf_explog.data.core import clean_batches

    t = config.train
    window = patch_window(config)
    callbacks = [NonFiniteGuard(), EpochTimer()]
    if t.bn_recalibration:
        callbacks.append(BatchNormRecalibration(
            clean_batches(train_volumes, window), every=t.validation_every,
            passes=t.bn_recalibration_passes))
    if val_volumes is not None:
        callbacks.append(InferenceValidation(
            val_volumes, len(label_names), label_names, window=window,
            tta=t.validation_tta, loss=make_loss(config, class_weights),
            every=t.validation_every, eager=eager_validation))
    return callbacks
