"""TensorBoard for this work: grouped scalars, captioned overlays, Dice charts, HParams.

One event-file writer per run (``<run>/tensorboard``), so nothing appears twice, and tags
grouped by what they measure:

| group | tags |
|---|---|
| ``loss/`` | ``train``, ``validation``, ``dice_term``, ``cross_term`` (ExpLogLoss's two terms) |
| ``dice/`` | ``train`` (mean over structures, training batches), ``validation`` (inference mode) |
| ``dice_by_structure/`` | one chart per structure (validation, inference mode) |
| ``time/`` | ``epoch_seconds``, ``validation_seconds``, ``recalibration_seconds`` |
| ``optimizer/`` | ``learning_rate`` |

Images every ``train.image_summary_every`` epochs: ``overlays/axis_<k>`` (image | ground
truth | prediction of the first validation volume, a legend of the structures' colours and a
caption) and ``dice_by_structure/chart`` (validation Dice per structure, smallest first).
At the start of training the run's settings are written as HParams (loss, γ, learning rate,
schedule, geometry, patch size, auxiliary heads, epochs), so ``tensorboard --logdir`` over
the runs of a ``reproduce`` comparison shows its arms side by side in the HParams tab.

Written with TensorBoard's own event-file writer and protos, not ``tf.summary``: it works on
the JAX backend with TensorFlow absent (TensorBoard is a dependency either way).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np

from tf_explog.metrics import log_key

__all__ = ["scalar_tags", "TensorBoardSummary", "EventWriter", "hparams_of"]

# Keras log key -> TensorBoard tag (per-structure keys are handled by prefix).
_SCALARS = {
    "loss": "loss/train",
    "val_loss": "loss/validation",
    "dice_term": "loss/dice_term",
    "cross_term": "loss/cross_term",
    "dice": "dice/train",
    "val_dice": "dice/validation",
    "epoch_seconds": "time/epoch_seconds",
    "time_validation": "time/validation_seconds",
    "time_recalibration": "time/recalibration_seconds",
    "learning_rate": "optimizer/learning_rate",
}


def scalar_tags(logs: dict, structure_keys: Sequence[str] = ()) -> dict:
    """``{tag: value}`` for the epoch logs worth a chart (see the module docstring).

    Args:
        logs: the epoch's Keras logs.
        structure_keys: the log-key form of each structure name (``val_dice_<key>`` become
            ``dice_by_structure/<key>``).
    """
    out = {}
    for key, tag in _SCALARS.items():
        if key in logs:
            out[tag] = float(np.asarray(logs[key]))
    for name in structure_keys:
        key = f"val_dice_{name}"
        if key in logs:
            out[f"dice_by_structure/{name}"] = float(np.asarray(logs[key]))
    return out


def hparams_of(config) -> dict:
    """The settings that tell runs (and ``reproduce`` arms) apart, for the HParams tab."""
    d, p = config.data, config.data.preprocess
    loss_params = dict(config.loss.params)
    return {
        "loss": config.loss.name,
        "gamma_dice": float(loss_params.get("gamma_dice", loss_params.get("gamma", 0.0))),
        "gamma_cross": float(loss_params.get("gamma_cross", loss_params.get("gamma", 0.0))),
        "class_weights": str(config.loss.class_weights if not isinstance(
            config.loss.class_weights, list) else "list"),
        "learning_rate": float(config.train.learning_rate),
        "lr_schedule": config.train.lr_schedule,
        "optimizer": config.train.optimizer,
        "epochs": int(config.train.epochs),
        "steps_per_epoch": int(config.train.steps_per_epoch or 0),
        "mode": d.mode,
        "patch_size": "x".join(str(s) for s in d.patch_size) if d.mode == "patch" else "",
        "preset": p.preset or "",
        "resize_shape": str(p.resize_shape or ""),
        "crop_foreground": bool(p.crop_foreground),
        "aux_outputs": int(config.model.aux_outputs),
        "dtype_policy": config.train.dtype_policy,
        "seed": int(config.seed),
    }


class EventWriter:
    """Scalars, PNG images and HParams into one TensorBoard event file (no TensorFlow)."""

    def __init__(self, log_dir) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(log_dir))

    def _add(self, summary, step: int) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(summary=summary, step=int(step),
                                               wall_time=time.time()))

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        self._add(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, simple_value=float(value))]), step)

    def image(self, tag: str, png: bytes, step: int, description: str = "") -> None:
        from tensorboard.compat.proto import summary_pb2

        height, width = _png_size(png)
        value = summary_pb2.Summary.Value(
            tag=tag, image=summary_pb2.Summary.Image(
                height=height, width=width, colorspace=4, encoded_image_string=png),
            metadata=summary_pb2.SummaryMetadata(summary_description=description))
        self._add(summary_pb2.Summary(value=[value]), step)

    def hparams(self, values: dict, trial_id: str) -> None:
        from tensorboard.plugins.hparams import summary_v2 as hp

        self._add(hp.hparams_pb(values, trial_id=trial_id), 0)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _png_size(png: bytes) -> tuple:
    """``(height, width)`` from a PNG's IHDR chunk."""
    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    return height, width


class TensorBoardSummary(keras.callbacks.Callback):
    """Writes the run's TensorBoard: grouped scalars each epoch, images every ``every``
    epochs, HParams once. Place it after the callbacks that add validation to the logs.

    Args:
        log_dir: the run's ``tensorboard`` folder.
        label_names: names by class id (background first).
        sample: ``(image [D, H, W, C], labels [D, H, W])`` for the overlays, or None.
        every: epochs between images (0: none).
        hparams: ``{name: value}`` written once (see :func:`hparams_of`), or None.
        window: sliding window for the overlay's prediction (patch-trained models).
    """

    def __init__(self, log_dir, label_names: Sequence[str], sample=None, every: int = 5,
                 hparams: Optional[dict] = None, window=None) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.label_names = list(label_names)
        self.keys = [log_key(n) for n in self.label_names[1:]]
        self.sample, self.every, self.hparams, self.window = sample, every, hparams, window
        self.writer: Optional[EventWriter] = None

    def on_train_begin(self, logs=None):
        try:
            self.writer = EventWriter(self.log_dir)
        except ImportError:
            # tensorboard is a dependency of the package, but a bare accelerator machine
            # (JAX, no TensorFlow) may lack it: training goes on, metrics.csv has it all.
            print("[tf_explog] TensorBoard logs off: the tensorboard package is not "
                  "installed (metrics.csv still has every epoch)", flush=True)
            return
        if self.hparams:
            self.writer.hparams(self.hparams, trial_id=self.log_dir.parent.name)

    def on_epoch_end(self, epoch, logs=None):
        if self.writer is None:
            return
        logs = dict(logs or {})
        if "learning_rate" not in logs and self.model is not None:
            try:
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(
                    self.model.optimizer.learning_rate))
            except (AttributeError, TypeError, ValueError):
                pass
        # Steps are epochs numbered from 1, as on the console and in metrics.csv.
        for tag, value in scalar_tags(logs, self.keys).items():
            self.writer.scalar(tag, value, epoch + 1)
        if self.every and (epoch + 1) % self.every == 0:
            self._images(epoch, logs)
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()

    def _images(self, epoch: int, logs: dict) -> None:
        from tf_explog.plots import dice_by_structure_figure, figure_png, overlay_figure

        if self.sample is not None:
            from tf_explog.sliding_window import predict_volume

            image, labels = self.sample
            pred = predict_volume(self.model, image, window=self.window, output="labels")
            fig = overlay_figure(image, labels, pred, self.label_names,
                                 title=f"epoch {epoch + 1}: middle slices")
            # TensorBoard shows the first description a tag was written with for every step,
            # so captions say nothing that changes between epochs: the epoch (and the mean
            # Dice) are drawn in the image's title, and the step slider is the epoch.
            self.writer.image(
                "overlays/middle_slices", figure_png(fig), epoch + 1,
                "First validation volume, inference mode: image | ground truth | prediction "
                "along each axis; colours as in the legend; the epoch is in the title.")
        values = [logs.get(f"val_dice_{k}") for k in self.keys]
        if all(v is not None for v in values):
            mean = float(logs.get("val_dice", np.nan))
            fig = dice_by_structure_figure(
                self.label_names[1:], [float(v) for v in values], None,
                title=f"validation Dice, epoch {epoch + 1}, mean {mean:.3f}")
            self.writer.image(
                "dice_by_structure/chart", figure_png(fig), epoch + 1,
                "Validation Dice per structure (inference mode), smallest structure first; "
                "the epoch and the mean are in the title.")
