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

from tf_explog.builders import (EpochTimer, build_from_config, cache_dir_for,
                                class_weights_for, compile_model, load_manifest,
                                make_augmentation, make_preprocessor,
                                monitor_name)
from tf_explog.config import Config, ConfigError, config_from_dict

RUN_FILE = "run.json"
BEST_CHECKPOINT = "checkpoints/best.keras"
FINAL_MODEL = "checkpoints/final.keras"


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


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"train.strategy must be none, mirrored or multi_worker; got {name!r}.")


def make_datasets(config: Config, manifest, preprocessor, cache_dir, global_batch_size):
    from tf_explog.data.pipeline import make_dataset

    d = config.data
    pyramid = config.model.aux_outputs
    common = dict(mode=d.mode, patch_size=tuple(d.patch_size), batch_size=global_batch_size,
                  cache_dir=cache_dir, preprocessor=preprocessor, pyramid_levels=pyramid)
    train = make_dataset(
        manifest, "training", shuffle=True, seed=config.seed, oversample=d.oversample,
        augment=make_augmentation(config, config.seed),
        repeat=config.train.steps_per_epoch is not None, **common)
    val = None
    if manifest.entries("validation"):
        val = make_dataset(manifest, "validation", shuffle=False, seed=config.seed,
                           oversample=d.oversample, augment=None, repeat=False, **common)
    return train, val


# --------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------


def label_colours(num_classes: int) -> np.ndarray:
    """An RGB colour per label (0 = black), from matplotlib's tab20 cycle."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colours = np.array([cmap(i % 20)[:3] for i in range(num_classes)], np.float32)
    colours[0] = 0.0
    return colours


def overlay_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                  num_classes: int, axis: int, alpha: float = 0.5) -> np.ndarray:
    """Middle slice along ``axis``: [image | truth overlay | prediction overlay], RGB in [0,1]."""
    mid = image.shape[axis] // 2
    img = np.take(image[..., 0], mid, axis=axis)
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, -1)
    colours = label_colours(num_classes)

    def blend(labels):
        lab = np.take(labels, mid, axis=axis)
        out = grey.copy()
        mask = lab > 0
        out[mask] = (1 - alpha) * grey[mask] + alpha * colours[lab[mask]]
        return out

    return np.concatenate([grey, blend(truth), blend(pred)], axis=1)


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
    monitor = monitor_name(config)
    callbacks = [
        EpochTimer(),
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), save_freq="epoch",
                                         delete_checkpoint=True),
        keras.callbacks.ModelCheckpoint(str(run_dir / BEST_CHECKPOINT), monitor=monitor,
                                        mode="min" if monitor.endswith("loss") else "max",
                                        save_best_only=True, verbose=0),
        keras.callbacks.CSVLogger(str(run_dir / "metrics.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False,
                                    profile_batch=0),
    ]
    if sample is not None and config.train.image_summary_every:
        image, labels = sample
        callbacks.append(ImageSummary(run_dir / "tensorboard" / "images", image, labels,
                                      num_classes, config.train.image_summary_every))
    return callbacks


def first_sample(dataset):
    """One (image, labels) example at full resolution, for image summaries."""
    if dataset is None:
        return None
    for image, labels in dataset.take(1):
        if isinstance(labels, dict):
            labels = labels["segmentation"]
        return image.numpy()[0], labels.numpy()[0]
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
            raise ValueError(f"{run_dir}: this run finished ({FINAL_MODEL} exists); there is "
                             "nothing to resume. Start a new run with --config.")
    elif run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=False)
    else:
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
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _fit(config: Config, run_dir: Path, extra_callbacks, fresh: bool) -> TrainResult:
    manifest = load_manifest(config)
    preprocessor = make_preprocessor(config, manifest)
    if fresh:
        write_run_file(run_dir, config, manifest.label_names, manifest.num_channels,
                       preprocessor)
    cache_dir = cache_dir_for(config)
    class_weights = class_weights_for(config, manifest, preprocessor, cache_dir)
    strategy = make_strategy(config.train.strategy)
    train_ds, val_ds = make_datasets(config, manifest, preprocessor, cache_dir,
                                     config.train.batch_size)
    label_names = manifest.label_names
    with strategy.scope():
        model = build_from_config(config, len(label_names), manifest.num_channels)
        compile_model(model, config, class_weights, label_names,
                      resolve_jit_compile(config.train.jit_compile))
    callbacks = standard_callbacks(config, run_dir, first_sample(val_ds or train_ds),
                                   len(label_names)) + list(extra_callbacks)
    # One line whatever the verbosity: which run, and how it is set up.
    print(f"[tf_explog] run {run_dir} seed={config.seed} policy="
          f"{config.train.dtype_policy} jit={resolve_jit_compile(config.train.jit_compile)}"
          f" strategy={config.train.strategy} replicas={strategy.num_replicas_in_sync}",
          flush=True)
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=config.train.epochs,
        steps_per_epoch=config.train.steps_per_epoch,
        validation_steps=config.train.validation_steps, callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=config.train.verbose)
    final = run_dir / FINAL_MODEL
    model.save(str(final))
    best = run_dir / BEST_CHECKPOINT
    if not best.exists():  # no validation split: the final model is the best we have
        model.save(str(best))
    _atomic_write(run_dir / "history.json", json.dumps(history.history, indent=1))
    return TrainResult(run_dir, history.history, best, final)
