"""Turns a `Config` into ``compile()`` + ``fit()``: the one place where training is wired.

It chooses the dtype policy, XLA (``jit_compile="auto"``: on with a GPU, off on CPU where it
measured ~10x slower), the tf.distribute strategy, the losses (with class weights from the
training set's label frequencies), the metrics and the callbacks (TensorBoard with per-label
Dice and image overlays, best checkpoint, BackupAndRestore, CSV log), inside a run directory
``<runs_dir>/<name>/<timestamp>/`` that is never overwritten.

``strategy: multi_worker`` uses a custom loop (`tf_explog.distributed`), because Keras 3's
``fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tf_explog.builders import (build_from_config, cache_dir_for, class_weights_for,
                                compile_model, inference_callbacks, load_manifest,
                                make_augmentation, make_preprocessor, monitor_name)
from tf_explog.config import Config, ConfigError, config_from_dict
from tf_explog.data.core import split_volumes
from tf_explog.callbacks import MetricsCSV
from tf_explog.errors import InputError, NonFiniteError
from tf_explog.plots import overlay_panel

RUN_FILE = "run.json"
BEST_CHECKPOINT = "checkpoints/best.keras"
FINAL_MODEL = "checkpoints/final.keras"
FAILED_FILE = "FAILED.json"


@dataclass
class TrainResult:
    run_dir: Path
    history: dict
    best_checkpoint: Path
    final_model: Path


# --------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------


def new_run_dir(config: Config) -> Path:
    """``<runs_dir>/<name>/<timestamp>/``, created fresh (a suffix avoids any collision)."""
    root = config.resolve(config.runs_dir) / config.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {root}")


def write_run_file(run_dir: Path, config: Config, label_names, num_channels,
                   preprocessor) -> None:
    """``run.json``: everything inference and export need without the data set."""
    info = {
        "config": config.to_dict(),
        "base_dir": config.base_dir,
        "fingerprint": config.fingerprint(),
        "seed": config.seed,
        "created": datetime.now().isoformat(timespec="seconds"),
        "label_names": list(label_names),
        "num_channels": int(num_channels),
        "preprocessor": preprocessor.to_dict(),
        "best_checkpoint": BEST_CHECKPOINT,
        "final_model": FINAL_MODEL,
    }
    _atomic_write(run_dir / RUN_FILE, json.dumps(info, indent=2))
    _atomic_write(run_dir / "config.yaml", config.dump())


def load_run_info(run_dir: str | Path) -> dict:
    """The contents of a run's ``run.json`` (config, label names, channels, preprocessing)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found.")
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: not a tf_explog run directory ({RUN_FILE} is missing)."
        )
    return json.loads(path.read_text())


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was started with (for --resume, export, inference)."""
    info = load_run_info(run_dir)
    config = config_from_dict(info["config"])
    config.base_dir = info["base_dir"]
    return config


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def resolve_jit_compile(setting) -> bool:
    """``auto`` means XLA on a GPU and off on CPU (where it measured ~10x slower)."""
    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return bool(setting)


def check_dtype_policy(policy: str) -> None:
    """Refuses mixed precision on a TensorFlow CPU, where it cannot train this network.

    - mixed_bfloat16: TensorFlow's CPU Conv3D accumulates the kernel gradient (a sum over
      every voxel) in bfloat16: measured 10 % off at 48³ and 87 % at 128³
      (``bench/bf16_cpu_gradients.py``), and a demo run ended with every weight NaN.
    - mixed_float16: the CPU has no float16 MaxPool3D kernel.
    """
    if policy == "float32" or tf.config.list_physical_devices("GPU"):
        return
    why = {
        "mixed_bfloat16": "TensorFlow's CPU kernels accumulate Conv3D weight gradients in "
                          "bfloat16 (87% error at 128^3, see bench/bf16_cpu_gradients.py) "
                          "and such runs ended with NaN weights",
        "mixed_float16": "TensorFlow has no float16 MaxPool3D kernel on the CPU",
    }[policy]
    raise ConfigError(f"train.dtype_policy={policy} is not supported on a CPU with the "
                      f"TensorFlow backend: {why}. Use float32 here; mixed precision is for "
                      "GPUs (or the JAX backend, which accumulates in float32).")


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"train.strategy must be none, mirrored or multi_worker; got {name!r}.")


def make_train_dataset(config: Config, manifest, preprocessor, cache_dir, global_batch_size):
    """The shuffled, augmented tf.data stream of the training split.

    Validation does not go through tf.data: it runs on whole volumes in inference mode
    (`tf_explog.callbacks.InferenceValidation`).
    """
    from tf_explog.data.pipeline import make_dataset

    d = config.data
    return make_dataset(
        manifest, "training", mode=d.mode, patch_size=tuple(d.patch_size),
        batch_size=global_batch_size, cache_dir=cache_dir, preprocessor=preprocessor,
        aux_outputs=config.model.aux_outputs, shuffle=True, seed=config.seed,
        oversample=d.oversample, augment=make_augmentation(config, config.seed),
        repeat=config.train.steps_per_epoch is not None)


# --------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------


class ImageSummary(keras.callbacks.Callback):
    """Every N epochs: middle slices of image, ground truth and prediction as overlays."""

    def __init__(self, log_dir, image, labels, num_classes, every=5):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir))
        self.image, self.labels = image, labels
        self.num_classes, self.every = num_classes, every

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch + 1) % self.every:
            return
        out = self.model(self.image[None], training=False)
        if isinstance(out, dict):
            out = out["segmentation"]
        pred = np.argmax(keras.ops.convert_to_numpy(out)[0], axis=-1)
        with self.writer.as_default():
            for axis in range(3):
                panel = overlay_panel(self.image, self.labels, pred, self.num_classes, axis)
                # Small volumes make tiny images: enlarge (nearest) to >= 256 px high.
                scale = max(1, 256 // panel.shape[0])
                panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
                tf.summary.image(f"overlay/axis{axis}", panel[None], step=epoch)
        self.writer.flush()


def standard_callbacks(config: Config, run_dir: Path, sample, num_classes):
    """Resume state, best checkpoint, CSV, TensorBoard and overlays (in this order).

    They come after `builders.inference_callbacks`, whose validation logs they read.
    """
    monitor = monitor_name(config)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), save_freq="epoch",
                                         delete_checkpoint=True),
        keras.callbacks.ModelCheckpoint(str(run_dir / BEST_CHECKPOINT), monitor=monitor,
                                        mode="min" if monitor.endswith("loss") else "max",
                                        save_best_only=True, verbose=0),
        MetricsCSV(run_dir / "metrics.csv"),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False,
                                    profile_batch=0),
    ]
    if sample is not None and config.train.image_summary_every:
        image, labels = sample
        callbacks.append(ImageSummary(run_dir / "tensorboard" / "images", image, labels,
                                      num_classes, config.train.image_summary_every))
    return callbacks


def first_sample(*volume_sets):
    """The first (image, labels) volume of the first non-empty set, for image summaries."""
    for volumes in volume_sets:
        if volumes is not None and len(volumes):
            return volumes[0]
    return None


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def train(config: Config, *, resume: str | Path | None = None, extra_callbacks=(),
          run_dir: str | Path | None = None) -> TrainResult:
    """Trains the configured model; with ``resume`` continues that run directory.

    Args:
        config: a validated `Config` (ignored in favour of the run's own with ``resume``).
        resume: an existing run directory to continue (BackupAndRestore picks up the last
            finished epoch, optimizer state included).
        extra_callbacks: more Keras callbacks (after the standard ones).
        run_dir: where to write a new run (default: a fresh timestamped directory).

    Returns:
        `TrainResult` with the run directory, the history and the checkpoint paths.
    """
    if resume is not None:
        run_dir = Path(resume)
        config = load_run_config(run_dir)
        if (run_dir / FINAL_MODEL).exists() and not (run_dir / "backup").exists():
            raise InputError(f"{run_dir}: this run finished ({FINAL_MODEL} exists); there is "
                             "nothing to resume. Start a new run with --config.")
    check_dtype_policy(config.train.dtype_policy)  # before anything is created on disk
    if resume is None and run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=False)
    elif resume is None:
        run_dir = new_run_dir(config)
    (run_dir / "checkpoints").mkdir(exist_ok=True)

    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.train.dtype_policy)
    try:
        if config.train.strategy == "multi_worker":
            from tf_explog.distributed import train_multi_worker

            return train_multi_worker(config, run_dir, fresh=resume is None)
        return _fit(config, run_dir, extra_callbacks, fresh=resume is None)
    except NonFiniteError as err:
        # Marked so nobody takes the run for a finished one; best.keras (if any) is from an
        # earlier, finite epoch.
        _atomic_write(run_dir / FAILED_FILE, json.dumps({"error": str(err)}, indent=1))
        raise NonFiniteError(f"{err} (run directory: {run_dir})") from None
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _fit(config: Config, run_dir: Path, extra_callbacks, fresh: bool) -> TrainResult:
    manifest = load_manifest(config)
    cache_dir = cache_dir_for(config)
    # Every case of every split, all problems at once, before anything trains.
    manifest.validate(cache_dir=cache_dir)
    preprocessor = make_preprocessor(config, manifest)
    if fresh:
        write_run_file(run_dir, config, manifest.label_names, manifest.num_channels,
                       preprocessor)
    class_weights = class_weights_for(config, manifest, preprocessor, cache_dir)
    strategy = make_strategy(config.train.strategy)
    train_ds = make_train_dataset(config, manifest, preprocessor, cache_dir,
                                  config.train.batch_size)
    train_volumes = split_volumes(manifest, "training", preprocessor, cache_dir)
    val_volumes = split_volumes(manifest, "validation", preprocessor, cache_dir)
    label_names = manifest.label_names
    with strategy.scope():
        model = build_from_config(config, len(label_names), manifest.num_channels)
        compile_model(model, config, class_weights, label_names,
                      resolve_jit_compile(config.train.jit_compile))
    callbacks = (inference_callbacks(config, train_volumes, val_volumes, label_names,
                                     class_weights,
                                     eager_validation=strategy.num_replicas_in_sync > 1)
                 + standard_callbacks(config, run_dir, first_sample(val_volumes, train_volumes),
                                      len(label_names))
                 + list(extra_callbacks))
    # One line whatever the verbosity: which run, and how it is set up.
    print(f"[tf_explog] run {run_dir} seed={config.seed} policy="
          f"{config.train.dtype_policy} jit={resolve_jit_compile(config.train.jit_compile)}"
          f" strategy={config.train.strategy} replicas={strategy.num_replicas_in_sync}",
          flush=True)
    history = model.fit(
        train_ds, epochs=config.train.epochs,
        steps_per_epoch=config.train.steps_per_epoch, callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=config.train.verbose)
    final = run_dir / FINAL_MODEL
    model.save(str(final))
    best = run_dir / BEST_CHECKPOINT
    if not best.exists():  # no validation split: the final model is the best we have
        model.save(str(best))
    _atomic_write(run_dir / "history.json", json.dumps(history.history, indent=1))
    return TrainResult(run_dir, history.history, best, final)
