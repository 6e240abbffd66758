"""Keras callbacks for honest training: inference-mode validation, non-finite guard, timing.

- :class:`InferenceValidation` validates the model the way users run it: whole volumes (or
  sliding windows with Gaussian blending, for patch-trained models) through
  :func:`tf_explog.inference.predict_volume`, in inference mode, after
  :class:`tf_explog.batchnorm.BatchNormRecalibration` has set population statistics. It
  writes ``val_dice``, ``val_dice_<structure>`` and ``val_loss`` into the epoch logs, where
  checkpointing, CSV and TensorBoard callbacks placed after it read them.
- :class:`NonFiniteGuard` stops training at the first non-finite loss (naming the epoch and
  step) or weight, by raising :class:`NonFiniteError`, before anything is checkpointed.
- :class:`EpochTimer` adds ``epoch_seconds`` to the logs.

``keras.ops`` and NumPy only: these run on the TensorFlow and JAX backends and importing the
module does not import TensorFlow.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import keras
import numpy as np

from tf_explog.errors import InputError, NonFiniteError
from tf_explog.metrics import log_key
from tf_explog.models import non_finite_weights
from tf_explog.runs import read_metrics_csv, write_metrics_csv

__all__ = [
    "NonFiniteError",
    "NonFiniteGuard",
    "InferenceValidation",
    "EpochTimer",
    "StepCallbackList",
    "dice_from_counts",
    "validate_volumes",
    "eager_predict",
    "MetricsCSV",
    "BestCheckpoint",
    "EpochSummary",
    "read_metrics_csv",
    "write_metrics_csv",
]


# --------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------


def _as_float(value) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(value)).reshape(-1)[0])


def _overrides(callback, *names: str) -> bool:
    """Whether ``callback`` defines any of the hooks ``names`` itself (not Keras' no-op)."""
    return any(getattr(type(callback), n) is not getattr(keras.callbacks.Callback, n)
               for n in names)


def _python_logs(logs) -> dict:
    """Log values as Python floats (what ``keras.callbacks.CallbackList`` passes on)."""
    out = {}
    for key, value in (logs or {}).items():
        if isinstance(value, dict):
            out.update(_python_logs(value))
            continue
        try:
            out[key] = _as_float(value) if keras.ops.is_tensor(value) else float(value)
        except (TypeError, ValueError, IndexError):
            out[key] = value
    return out


class StepCallbackList(keras.callbacks.CallbackList):
    """``CallbackList`` whose step-end hook does not wait for the step to finish.

    Keras' own converts every logged value to a Python float at the end of every training
    step (``pythonify_logs``), which waits for the step on the accelerator before the next
    one can be queued, whether or not any callback reads the logs. Here a callback gets:

    - nothing, when it does not define ``on_train_batch_end`` / ``on_batch_end``;
    - the logs as they are (backend tensors, no wait), when it says ``tensor_logs = True``
      (:class:`NonFiniteGuard`, which reads each step's loss one step later) or is a
      ``BackupAndRestore`` saving per epoch (it never reads the logs);
    - Python floats otherwise (converted once per step, as Keras does).

    Pass it as ``model.fit(callbacks=StepCallbackList(callbacks, add_history=True,
    model=model, epochs=..., steps=..., verbose=0))``.
    """

    def on_train_batch_end(self, batch, logs=None):
        python = None
        for callback in self.callbacks:
            if not _overrides(callback, "on_train_batch_end", "on_batch_end"):
                continue
            if getattr(callback, "tensor_logs", False) or (
                    isinstance(callback, keras.callbacks.BackupAndRestore)
                    and callback.save_freq == "epoch"):
                callback.on_train_batch_end(batch, logs)
                continue
            if python is None:
                python = _python_logs(logs)
            callback.on_train_batch_end(batch, python)


class NonFiniteGuard(keras.callbacks.Callback):
    """Raises :class:`NonFiniteError` at the first non-finite loss or weight.

    The loss Keras reports at each step is the running mean of the epoch so far, so it turns
    non-finite exactly at the first non-finite step and stays so. To keep the accelerator
    busy the loss of step k is read at the end of step k + 1 (when it is ready anyway); the
    last step of an epoch is read at the epoch's end, together with every logged value and
    every weight, before the callbacks after this one checkpoint anything.

    Put it first among the callbacks. With :class:`StepCallbackList` (``tensor_logs``) the
    loss arrives as a tensor and reading the one of the step before never waits for the
    step just queued; Keras' own list converts it at every step anyway.
    """

    tensor_logs = True  # reads logs["loss"] one step late: see StepCallbackList

    def __init__(self) -> None:
        super().__init__()
        self._epoch = 0
        self._pending = None  # (step, loss tensor) not checked yet

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._pending = None

    def _check_pending(self) -> None:
        if self._pending is None:
            return
        step, loss = self._pending
        self._pending = None
        value = _as_float(loss)
        if not math.isfinite(value):
            raise NonFiniteError(
                f"training stopped: the loss became {value} at epoch {self._epoch + 1}, "
                f"step {step + 1}; nothing from this epoch was saved (lower the learning "
                "rate, or check the data and the dtype policy)")

    def on_train_batch_end(self, batch, logs=None):
        self._check_pending()
        if logs and "loss" in logs:
            self._pending = (batch, logs["loss"])

    def on_epoch_end(self, epoch, logs=None):
        self._check_pending()
        for key, value in (logs or {}).items():
            try:
                number = _as_float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(number):
                raise NonFiniteError(
                    f"training stopped: {key} is {number} at the end of epoch {epoch + 1}; "
                    "nothing from this epoch was saved")
        bad = non_finite_weights(self.model)
        if bad:
            raise NonFiniteError(
                f"training stopped: {len(bad)} weight tensor(s) hold NaN/Inf at the end of "
                f"epoch {epoch + 1} (first: {bad[0]}); nothing from this epoch was saved")


# --------------------------------------------------------------------------------------
# Validation in inference mode
# --------------------------------------------------------------------------------------


def dice_from_counts(tp: np.ndarray, pred: np.ndarray, true: np.ndarray,
                     include_background: bool = False) -> tuple:
    """Hard Dice per label from voxel counts, and their mean, as `PerLabelDice` reports them.

    ``Dice_i = 2 TP_i / (P_i + T_i)``; a label absent from both is 1.0 and left out of the
    mean; background is left out unless ``include_background``.

    Returns:
        ``(mean, dice per label [K] float64)``.
    """
    tp, pred, true = (np.asarray(a, np.float64) for a in (tp, pred, true))
    denom = pred + true
    present = denom > 0
    dice = np.where(present, 2.0 * tp / np.where(present, denom, 1.0), 1.0)
    first = 0 if include_background else 1
    chosen = present[first:]
    mean = float(dice[first:][chosen].mean()) if chosen.any() else 1.0
    return mean, dice


def validate_volumes(
    model: keras.Model,
    volumes: Iterable,
    num_classes: int,
    *,
    window: Optional[Sequence[int]] = None,
    overlap: float = 0.5,
    tta: Union[bool, Sequence[int]] = False,
    loss: Optional[Callable] = None,
    predict: Optional[Callable] = None,
) -> dict:
    """Per-label Dice over whole volumes predicted in inference mode (and the loss).

    Each ``(image [D, H, W, C], labels [D, H, W])`` pair goes through
    :func:`tf_explog.inference.predict_volume` (padding to a multiple of 16, or sliding
    windows of ``window`` blended with a Gaussian, optional flip TTA), blended on the device
    unless ``predict`` is given: the probabilities stay there for the loss, and only the
    argmax labels are copied to the host. Voxel counts are
    summed over all volumes before the Dice is taken (the definition of `PerLabelDice`).

    Args:
        model: the model; its "segmentation" output (or only output) is used.
        volumes: an iterable of ``(image, labels)`` NumPy pairs.
        num_classes: labels, background included.
        window, overlap, tta: see :func:`tf_explog.inference.predict_volume`.
        loss: optional ``loss(y_true, y_pred)`` evaluated per volume on the full-volume
            probabilities; its mean is returned as ``"loss"``.
        predict: how to run a batch on the host (e.g. :func:`eager_predict`, under a
            tf.distribute strategy); default: blended on the device.

    Returns:
        ``{"dice": mean, "dice_per_label": [K], "loss": mean or None, "volumes": n}``.
    """
    from tf_explog.sliding_window import predict_volume

    tp = np.zeros(num_classes, np.int64)
    pred_sum = np.zeros(num_classes, np.int64)
    true_sum = np.zeros(num_classes, np.int64)
    losses, n = [], 0
    for image, labels in volumes:
        truth = np.asarray(labels).astype(np.int64)
        if predict is None:
            # Blended on the device; only the labels (and the loss, a number) come back.
            probs = predict_volume(model, image, window=window, overlap=overlap, tta=tta,
                                   output="tensor")
            pred = np.asarray(keras.ops.convert_to_numpy(keras.ops.argmax(probs, axis=-1)))
        else:
            probs = predict_volume(model, image, window=window, overlap=overlap, tta=tta,
                                   predict_fn=predict)
            pred = np.argmax(probs, axis=-1)
        valid = (truth >= 0) & (truth < num_classes)
        t, p = truth[valid], pred[valid]
        tp += np.bincount(t[t == p], minlength=num_classes)[:num_classes]
        pred_sum += np.bincount(p, minlength=num_classes)[:num_classes]
        true_sum += np.bincount(t, minlength=num_classes)[:num_classes]
        if loss is not None:
            value = loss(truth[np.newaxis].astype(np.int32), keras.ops.expand_dims(probs, 0))
            losses.append(_as_float(value))
        n += 1
    if n == 0:
        raise InputError("validate_volumes: no validation volumes")
    mean, per_label = dice_from_counts(tp, pred_sum, true_sum)
    return {"dice": mean, "dice_per_label": per_label.tolist(),
            "loss": float(np.mean(losses)) if losses else None, "volumes": n}


def eager_predict(model: keras.Model) -> Callable:
    """``batch -> model(batch, training=False)``: a direct call, no compiled predict step."""
    def predict(batch):
        return model(batch, training=False)
    return predict


class InferenceValidation(keras.callbacks.Callback):
    """Validates on whole volumes in inference mode at the end of epochs.

    Writes ``<prefix>dice`` (mean over structures), ``<prefix>dice_<structure>`` and, with a
    loss, ``<prefix>loss`` into the epoch logs, so ``ModelCheckpoint(monitor="val_dice")``,
    ``CSVLogger`` and ``TensorBoard`` placed after it use them. Place it after
    :class:`tf_explog.batchnorm.BatchNormRecalibration`.

    Args:
        volumes: a re-iterable of ``(image, labels)`` NumPy pairs (e.g. a list, or
            :func:`tf_explog.data.core.volumes`), or a function returning one.
        num_classes: labels, background included.
        label_names: names used in the keys (default: label ids).
        window, overlap, tta: see :func:`tf_explog.inference.predict_volume`.
        loss: optional loss for ``<prefix>loss``.
        every: validate every this many epochs.
        prefix: key prefix (Keras' own validation uses ``"val_"``).
        eager: call the model directly instead of ``predict_on_batch`` (needed under a
            tf.distribute strategy with several replicas, whose ``predict_on_batch`` splits
            the batch).
    """

    def __init__(self, volumes, num_classes: int, label_names: Optional[Sequence[str]] = None,
                 *, window=None, overlap: float = 0.5, tta=False, loss=None, every: int = 1,
                 prefix: str = "val_", eager: bool = False) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"InferenceValidation: every must be an integer >= 1, got {every!r}")
        self.volumes = volumes
        self.num_classes = int(num_classes)
        names = list(label_names) if label_names is not None else [
            str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise InputError(f"InferenceValidation: {len(names)} label names for "
                             f"{self.num_classes} classes")
        self.keys = [log_key(name) for name in names]
        self.window, self.overlap, self.tta, self.loss = window, overlap, tta, loss
        self.every, self.prefix, self.eager = every, prefix, bool(eager)
        self.history: list = []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        start = time.perf_counter()
        volumes = self.volumes() if callable(self.volumes) else self.volumes
        result = validate_volumes(self.model, volumes, self.num_classes, window=self.window,
                                  overlap=self.overlap, tta=self.tta, loss=self.loss,
                                  predict=eager_predict(self.model) if self.eager else None)
        self.history.append(result)
        if logs is None:
            return
        p = self.prefix
        logs[f"{p}dice"] = result["dice"]
        for key, value in zip(self.keys[1:], result["dice_per_label"][1:]):
            logs[f"{p}dice_{key}"] = value
        if result["loss"] is not None:
            logs[f"{p}loss"] = result["loss"]
        logs["time_validation"] = time.perf_counter() - start


class MetricsCSV(keras.callbacks.Callback):
    """One row per epoch in ``path``, the whole file rewritten atomically at each epoch's end.

    Epochs are numbered from 1 (Keras' epoch index + 1), as on the console and in TensorBoard.

    Unlike ``keras.callbacks.CSVLogger`` (which appends in place and fixes its columns at the
    first epoch), a kill leaves the previous complete file, epochs without validation keep
    their columns, and a resumed run first drops the rows of epochs it repeats (the one that
    was cut, and any after it).
    """

    def __init__(self, path) -> None:
        super().__init__()
        self.path = path
        self.rows: Optional[list] = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.rows is None:
            from pathlib import Path

            previous = read_metrics_csv(self.path) if Path(self.path).is_file() else []
            # Keras' 0-based ``epoch`` is the number of epochs finished before this one.
            self.rows = [row for row in previous if row["epoch"] <= epoch]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": int(epoch) + 1}
        for key, value in (logs or {}).items():
            try:
                row[key] = _as_float(value)
            except (TypeError, ValueError, IndexError):
                continue
        self.rows = [r for r in (self.rows or []) if r["epoch"] != row["epoch"]] + [row]
        write_metrics_csv(self.path, self.rows)


def lower_is_better(monitor: str) -> bool:
    """Whether a lower ``monitor`` is better: for a loss (a key ending in "loss"), not for
    a Dice or anything else. The one rule for every checkpointing and reporting path."""
    return str(monitor).endswith("loss")


def improves(value: float, best: Optional[float], lower: bool) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet), lower or higher being better
    (strictly: on ties the first epoch stays the best)."""
    if best is None:
        return True
    return value < best if lower else value > best


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model whenever ``monitor`` improves, atomically.

    What ``keras.callbacks.ModelCheckpoint(save_best_only=True)`` does, with two differences
    that matter for long runs: the file is written under a temporary name and renamed (Keras
    writes in place, so a kill during the save left a 0-byte ``best.keras``), and a resumed
    run starts from the best value of its earlier epochs, read from its ``metrics.csv``
    (Keras starts from scratch, so the first resumed epoch replaced a better checkpoint).

    Args:
        path: the ``.keras`` file.
        monitor: the log key, e.g. ``"val_dice"``.
        mode: "max", "min" or "auto" (min for keys ending in "loss", else max).
        metrics_csv: the run's ``metrics.csv`` (see :class:`MetricsCSV`), for resuming.
    """

    def __init__(self, path, monitor: str = "val_dice", mode: str = "auto",
                 metrics_csv=None) -> None:
        super().__init__()
        if mode not in ("auto", "min", "max"):
            raise InputError(f"BestCheckpoint: mode must be auto, min or max, got {mode!r}")
        self.path, self.monitor, self.metrics_csv = path, monitor, metrics_csv
        self.mode = ("min" if lower_is_better(monitor) else "max") if mode == "auto" else mode
        self.best: Optional[float] = None
        self._resumed = False

    def _better(self, value: float) -> bool:
        return improves(value, self.best, lower=self.mode == "min")

    def on_epoch_begin(self, epoch, logs=None):
        if self._resumed:
            return
        self._resumed = True
        from pathlib import Path

        if self.metrics_csv is not None and Path(self.metrics_csv).is_file() and Path(
                self.path).is_file():
            for row in read_metrics_csv(self.metrics_csv):
                value = row.get(self.monitor)
                # Rows are numbered from 1: epochs 1..epoch finished before this one.
                if row["epoch"] <= epoch and value is not None and np.isfinite(value) and (
                        self._better(value)):
                    self.best = float(value)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        value = _as_float(value)
        if not np.isfinite(value) or not self._better(value):
            return
        from tf_explog.files import atomic_path

        with atomic_path(self.path) as tmp:
            self.model.save(str(tmp))
        self.best = value


class EpochSummary(keras.callbacks.Callback):
    """Prints one short line per epoch (`tf_explog.console.epoch_line`): loss, mean Dice,
    validation Dice with the best so far, seconds. Place it after the callbacks that add
    validation and timing to the logs."""

    def __init__(self, epochs: Optional[int] = None, monitor: str = "val_dice") -> None:
        super().__init__()
        self.epochs, self.monitor = epochs, monitor
        self.best: Optional[tuple] = None

    def on_epoch_end(self, epoch, logs=None):
        from tf_explog.console import epoch_line

        logs = logs or {}
        value = logs.get(self.monitor)
        if value is not None and np.isfinite(_as_float(value)):
            value = _as_float(value)
            if improves(value, None if self.best is None else self.best[0],
                        lower=lower_is_better(self.monitor)):
                self.best = (value, epoch)
        print(epoch_line(epoch, self.epochs, logs, self.best, self.monitor), flush=True)


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to the logs (read by the loss-comparison report)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._start


class TimeBudget(keras.callbacks.Callback):
    """Stops training when the next epoch would end past ``seconds`` (``train.time_budget_s``).

    Counted from the start of ``fit`` in this process, per epoch end to end (validation and
    checkpointing included when this callback comes last): after each epoch, training stops
    if the time spent plus the longest epoch so far exceeds the budget. At least one epoch
    always runs. ``epochs_trained`` and ``stopped_by_budget`` say what happened.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.seconds, self.clock = float(seconds), clock
        self.epochs_trained, self.stopped_by_budget = 0, False

    def on_train_begin(self, logs=None):
        self._start = self._last = self.clock()
        self._longest = 0.0

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        self._longest = max(self._longest, now - self._last)
        self._last = now
        self.epochs_trained = epoch + 1
        last = self.epochs_trained >= int((self.params or {}).get("epochs") or 0)
        if not last and now - self._start + self._longest > self.seconds:
            self.stopped_by_budget = True
            self.model.stop_training = True


class ResumeState(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` whose state is written like every other run file.

    Keras rewrites ``latest.weights.h5`` in place at every epoch's end, so a kill during that
    write (or a full disk) left a torn file that ``--resume`` could not read. Here each
    epoch's state (weights and optimizer variables) is its own file,
    ``epoch-<NNNN>.weights.h5`` (NNNN = epochs finished), written under a temporary name,
    fsync'ed and renamed (`tf_explog.files.atomic_path`); only then are states older than
    the newest ``keep`` removed. A kill at any moment leaves at least the previous complete
    state.

    On restore the newest state that loads wins; a newer unreadable one (torn by hand, a bad
    disk) is reported in one line and skipped. When no state loads, `InputError` says why in
    one line: a state that does not fit the model (``run.json`` or the weights were edited)
    or no complete state at all. A state written by Keras' own callback
    (``latest.weights.h5`` + ``training_metadata.json``, runs from older versions) is read
    too. Temporary files left by killed writers are removed first.

    Args:
        backup_dir: the run's ``backup/`` folder.
        keep: how many complete states to keep (at least 1; 2 leaves a fallback when the
            newest file is damaged after it was written).
        delete_checkpoint: remove ``backup_dir`` when training ends (the trainer removes it
            itself once the final model is saved, so that a kill in between still resumes).
    """

    PREFIX, SUFFIX = "epoch-", ".weights.h5"

    def __init__(self, backup_dir, keep: int = 2, delete_checkpoint: bool = False) -> None:
        super().__init__(str(backup_dir), save_freq="epoch",
                         delete_checkpoint=delete_checkpoint)
        from pathlib import Path

        if keep < 1:
            raise InputError(f"ResumeState: keep must be at least 1, got {keep}")
        self.folder, self.keep = Path(backup_dir), int(keep)
        self.restored_epoch: Optional[int] = None

    def states(self) -> list:
        """``(epochs finished, path)`` of the complete states on disk, newest first."""
        import json

        found = []
        if self.folder.is_dir():
            for path in self.folder.glob(f"{self.PREFIX}*{self.SUFFIX}"):
                digits = path.name[len(self.PREFIX):-len(self.SUFFIX)]
                if digits.isdigit():
                    found.append((int(digits), path))
            legacy = self.folder / "latest.weights.h5"
            meta = self.folder / "training_metadata.json"
            if legacy.is_file() and meta.is_file():
                try:
                    found.append((int(json.loads(meta.read_text())["epoch"]), legacy))
                except (OSError, ValueError, KeyError, TypeError):
                    pass
        return sorted(found, key=lambda item: -item[0])

    def on_train_begin(self, logs=None):
        from tf_explog.files import remove_stale_temporaries

        remove_stale_temporaries(self.folder)
        states = self.states()
        if not states:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        failures = []
        for epoch, path in states:
            try:
                self.model.load_weights(str(path))
            except Exception as err:  # noqa: BLE001 - h5py and Keras raise many kinds
                failures.append((path, err))
                continue
            for bad, err in failures:
                print(f"[tf_explog] resume state {bad} is unreadable ({_first_line(err)}); "
                      f"resuming from {path.name} instead", flush=True)
            self.model._initial_epoch = epoch  # what BackupAndRestore sets for fit()
            self.restored_epoch = epoch
            return
        path, err = failures[0]
        if any(isinstance(e, ValueError) for _, e in failures):
            raise InputError(
                f"{path}: the resume state does not fit the model described by run.json "
                f"({_first_line(err)}); run.json or the weights were changed since the run "
                "started. Restore them, or start a new run with --config <run>/config.yaml.")
        raise InputError(
            f"{self.folder}: no complete resume state ({len(failures)} file(s) unreadable, "
            f"newest {path.name}: {_first_line(err)}). Start a new run with --config "
            "<run>/config.yaml.")

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self._save_model()

    def _save_model(self):
        from tf_explog.files import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.PREFIX}{self._current_epoch:04d}{self.SUFFIX}"
        with atomic_path(path) as tmp:
            self.model.save_weights(str(tmp))
        # Only now, with the new state complete on disk, do older ones go.
        for _, old in self.states()[self.keep:]:
            old.unlink(missing_ok=True)
        if self.folder.joinpath("latest.weights.h5").exists():  # superseded Keras state
            for name in ("latest.weights.h5", "training_metadata.json"):
                self.folder.joinpath(name).unlink(missing_ok=True)


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (h5py and Keras write several)."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
