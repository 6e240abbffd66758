"""Run directories: the one module that knows their layout.

A training run writes everything into ``<runs_dir>/<name>/<timestamp>/``::

    run.json                 config (resolved), fingerprint, seed, label names, channels,
                             the preprocessing (invertible record), checkpoint paths; the
                             environment (versions, device) and command line; at the end
                             the results (best epoch and value, final metrics, duration)
    config.yaml              the resolved config, for reading and for ``--config``
    checkpoints/best.keras   best validation checkpoint (train.checkpoint_monitor)
    checkpoints/final.keras  the model at the end of training
    metrics.csv              one row per epoch (training and inference-mode validation)
    history.json             Keras' history of the finished fit
    tensorboard/             event files (scalars, images)
    backup/                  resume state while the run is unfinished (epoch-NNNN.weights.h5)
    FAILED.json              written when training stopped on NaN/Inf or an environment
                             error (full disk, read-only or unwritable folder); removed
                             when a resumed run finishes
    .lock                    held (``fcntl.flock``) by the process training the run
    DONE.json                an experiment's summary of a finished, evaluated run
    test_predictions/        segmentations an experiment made with this run's model

Training creates and writes a run through :class:`Run`; inference, export, evaluation and
the experiments read it through :class:`Run`. Nothing else spells these names.

One process per run: training holds an exclusive ``flock`` on ``.lock`` (released by the
operating system when the process ends, however it ends); a second training of the run
(``--resume``) and ``predict``/``export`` of the run while it trains are refused.

Standard library, NumPy-free and TensorFlow-free.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from tf_explog.config import ConfigError, check_run_name, config_from_dict
from tf_explog.errors import InputError
from tf_explog.files import atomic_path, atomic_write, write_json

__all__ = ["Run", "RunError", "RunNotFoundError", "read_metrics_csv", "write_metrics_csv"]

PathLike = Union[str, os.PathLike]

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
BEST_CHECKPOINT = "checkpoints/best.keras"
FINAL_MODEL = "checkpoints/final.keras"
METRICS_FILE = "metrics.csv"
HISTORY_FILE = "history.json"
TENSORBOARD_DIR = "tensorboard"
BACKUP_DIR = "backup"
FAILED_FILE = "FAILED.json"
DONE_FILE = "DONE.json"
PREDICTIONS_DIR = "test_predictions"
LOCK_FILE = ".lock"

class RunError(InputError):
    """A run directory is missing, malformed, failed or not in the state asked for."""


class RunNotFoundError(RunError, FileNotFoundError):
    """The path is not a run directory (missing, or no ``run.json``)."""


def _child(name: str) -> property:
    """A read-only attribute: the path of ``name`` inside the run directory."""
    return property(lambda self: self.path / name, doc=f"``{name}`` in the run directory.")


@dataclass(frozen=True)
class Run:
    """One run directory (see the module docstring for its layout).

    Create one with :meth:`create` (training) or :meth:`open` (everything else).
    """

    path: Path

    # ------------------------------------------------------------------ creating

    @classmethod
    def create(cls, config, path: Optional[PathLike] = None) -> "Run":
        """A fresh run directory: ``path`` (must not exist) or
        ``<runs_dir>/<name>/<timestamp>/`` (a numeric suffix avoids collisions).

        Raises:
            ConfigError: a name that is not a plain folder name.
            FileExistsError: ``path`` exists.
        """
        if path is not None:
            path = Path(path)
            path.mkdir(parents=True, exist_ok=False)
        else:
            root = config.resolve(config.runs_dir) / check_run_name(config.name)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            for i in range(1000):
                candidate = root / (stamp if i == 0 else f"{stamp}-{i}")
                try:
                    candidate.mkdir(parents=True, exist_ok=False)
                    path = candidate
                    break
                except FileExistsError:
                    continue
            else:
                raise RunError(f"{root}: could not create a new run directory")
        run = cls(path)
        run.checkpoints_dir.mkdir(exist_ok=True)
        return run

    def write_info(self, config, label_names: Sequence[str], num_channels: int,
                   preprocessor, environment: Optional[dict] = None,
                   command: Optional[Sequence[str]] = None) -> None:
        """``run.json`` and ``config.yaml``: what inference and export need without the data,
        and what the run is computed with (``environment``: versions and device, see
        `tf_explog.environment.environment`; ``command``: the command line)."""
        info = {
            "status": "running",
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
        if environment is not None:
            info["environment"] = dict(environment)
        if command is not None:
            info["command"] = list(command)
        write_json(self.path / RUN_FILE, info, indent=2)
        atomic_write(self.path / CONFIG_FILE, config.dump())
        self.__dict__.pop("info", None)  # re-read on next access

    def update_info(self, **fields: Any) -> dict:
        """Sets top-level entries of ``run.json`` (rewritten atomically); returns the whole."""
        info = dict(self.info)
        info.update(fields)
        write_json(self.path / RUN_FILE, info, indent=2)
        self.__dict__.pop("info", None)
        return info

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, path: PathLike) -> "Run":
        """An existing run directory.

        Raises:
            RunNotFoundError: ``path`` is not a directory or has no ``run.json``.
        """
        path = Path(path)
        if not path.is_dir():
            raise RunNotFoundError(f"{path}: run directory not found.")
        if not (path / RUN_FILE).is_file():
            raise RunNotFoundError(f"{path}: not a tf_explog run directory ({RUN_FILE} is "
                                   "missing).")
        return cls(path)

    @cached_property
    def info(self) -> dict:
        """The contents of ``run.json``."""
        file = self.path / RUN_FILE
        try:
            info = json.loads(file.read_text())
        except FileNotFoundError:
            raise RunNotFoundError(f"{self.path}: not a tf_explog run directory ({RUN_FILE} "
                                   "is missing).") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{file}: unreadable ({err}).") from None
        except RecursionError:
            raise RunError(f"{file}: unreadable (JSON nested too deeply).") from None
        if not isinstance(info, dict):
            raise RunError(f"{file}: expected a JSON object.")
        return info

    def _field(self, key: str, kind, default: Any = ...) -> Any:
        if key not in self.info:
            if default is not ...:
                return default
            raise RunError(f"{self.path / RUN_FILE}: missing the {key!r} entry.")
        value = self.info[key]
        if not isinstance(value, kind):
            raise RunError(f"{self.path / RUN_FILE}: {key!r} must be a "
                           f"{getattr(kind, '__name__', kind)}, got {value!r}.")
        return value

    @property
    def config(self):
        """The resolved `tf_explog.config.Config` the run was started with."""
        try:
            config = config_from_dict(self._field("config", dict))
        except ConfigError as err:
            raise RunError(f"{self.path / RUN_FILE}: config: {err}") from None
        config.base_dir = str(self._field("base_dir", str, "."))
        return config

    @property
    def preprocessor(self):
        """The `tf_explog.data.preprocess.Preprocessor` of the run (label map included)."""
        from tf_explog.data.preprocess import Preprocessor

        entry = self._field("preprocessor", dict)  # an unreadable run.json says so itself
        try:
            return Preprocessor.from_dict(entry)
        except (InputError, KeyError, TypeError) as err:
            raise RunError(f"{self.path / RUN_FILE}: invalid 'preprocessor' entry: "
                           f"{err}") from None

    @property
    def label_names(self) -> Optional[list]:
        names = self._field("label_names", list, None)
        return None if names is None else [str(n) for n in names]

    @property
    def num_channels(self) -> Optional[int]:
        value = self._field("num_channels", int, None)
        return None if value is None else int(value)

    @property
    def window(self) -> Optional[tuple]:
        """The training patch size of a patch-mode run (the sliding window), else None."""
        data = (self.info.get("config") or {}).get("data") or {}
        if data.get("mode") != "patch" or not data.get("patch_size"):
            return None
        size = data["patch_size"]
        size = [size] * 3 if isinstance(size, int) else list(size)
        if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
            raise RunError(f"{self.path / RUN_FILE}: config.data.patch_size must be 3 "
                           f"positive ints, got {data['patch_size']!r}.")
        return tuple(size)

    # ------------------------------------------------------------------ paths

    def _checkpoint(self, key: str, default: str) -> Path:
        rel = self.info.get(key, default) if (self.path / RUN_FILE).is_file() else default
        if not isinstance(rel, str) or not rel:
            raise RunError(f"{self.path / RUN_FILE}: field {key!r} is missing or not a path.")
        return self.path / rel

    @property
    def best_checkpoint(self) -> Path:
        return self._checkpoint("best_checkpoint", BEST_CHECKPOINT)

    @property
    def final_model(self) -> Path:
        return self._checkpoint("final_model", FINAL_MODEL)

    checkpoints_dir = _child("checkpoints")
    metrics_csv = _child(METRICS_FILE)
    history_file = _child(HISTORY_FILE)
    tensorboard_dir = _child(TENSORBOARD_DIR)
    backup_dir = _child(BACKUP_DIR)
    failed_file = _child(FAILED_FILE)
    done_file = _child(DONE_FILE)
    predictions_dir = _child(PREDICTIONS_DIR)

    def checkpoint(self, which: str = "best") -> Path:
        """The model file to use: ``"best"`` (the final model when there is no best one) or
        ``"final"``.

        Raises:
            RunError: the run failed (``FAILED.json``) or is still training.
            RunNotFoundError: no such checkpoint.
        """
        if which not in ("best", "final"):
            raise RunError(f"checkpoint: expected 'best' or 'final', got {which!r}.")
        self.check_not_in_use()
        self.check_not_failed()
        fields = ["best_checkpoint", "final_model"] if which == "best" else ["final_model"]
        candidates = [self.best_checkpoint if f == "best_checkpoint" else self.final_model
                      for f in fields]
        for path in candidates:
            if path.is_file():
                return path
        looked = ", ".join(f"{p.relative_to(self.path)} ({RUN_FILE} field {f!r})"
                           for p, f in zip(candidates, fields))
        raise RunNotFoundError(f"{self.path}: no model checkpoint found (looked for {looked}); "
                               "has the run saved one yet?")

    # ------------------------------------------------------------------ state

    @property
    def finished(self) -> bool:
        """Training ended normally (final model written, no resume state left)."""
        return self.final_model.is_file() and not self.backup_dir.exists()

    @property
    def failed(self) -> bool:
        return self.failed_file.is_file()

    def check_not_failed(self) -> None:
        if self.failed:
            raise RunError(f"{self.path}: this run failed ({self.failed_file}); its weights "
                           "are not usable. Use another run.")

    def check_resumable(self) -> None:
        """Raises `RunError` when there is nothing to resume (the run finished)."""
        if self.finished:
            raise RunError(f"{self.path}: this run finished ({FINAL_MODEL} exists); there is "
                           "nothing to resume. Start a new run with --config.")

    def mark_failed(self, error: str, kind: str = "non_finite") -> bool:
        """``FAILED.json``: nobody takes this run for a finished one.

        Args:
            error: the one-line reason.
            kind: ``"non_finite"`` (NaN/Inf) or ``"environment"`` (disk full, read-only...).

        Returns:
            Whether it was written (on a full or read-only disk it may not be).
        """
        try:
            write_json(self.failed_file, {"error": str(error), "kind": kind})
        except OSError:
            return False
        return True

    def clear_failed(self) -> None:
        """Removes ``FAILED.json`` (a resumed run finished after all)."""
        self.failed_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ one process

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @contextlib.contextmanager
    def lock(self):
        """Holds the run for this process (training): an exclusive ``flock`` on ``.lock``.

        The operating system releases it when the process ends, even on SIGKILL.

        Raises:
            RunError: another process holds the run.
        """
        import fcntl

        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f"{self.path}: in use by another process ({self._holder(fd)}); "
                               "wait for it to finish or stop it first.") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield self
        finally:
            os.close(fd)  # releases the lock

    def check_not_in_use(self) -> None:
        """Raises `RunError` while another process trains this run (reading needs no lock).

        Raises:
            RunError: a training process holds ``.lock``.
        """
        import fcntl

        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except OSError:  # never locked, or unreadable: nobody we can see trains it
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f"{self.path}: still training ({self._holder(fd)}); wait for "
                               "it to finish, or use a copy of its checkpoints/best.keras."
                               ) from None
        finally:
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        with contextlib.suppress(OSError, ValueError):
            text = os.pread(fd, 32, 0).decode().strip()
            if text.isdigit():
                return f"pid {int(text)}"
        return "pid unknown"

    def save_model(self, model, which: str = "final") -> Path:
        """Saves a Keras model as the run's ``"final"`` or ``"best"`` checkpoint, atomically
        (a kill leaves the previous complete file, never a truncated one)."""
        if which not in ("best", "final"):
            raise RunError(f"save_model: expected 'best' or 'final', got {which!r}.")
        path = self.best_checkpoint if which == "best" else self.final_model
        with atomic_path(path) as tmp:
            model.save(str(tmp))
        return path

    def discard_if_empty(self) -> bool:
        """Removes the run directory when no epoch of it ever finished (no metrics, no resume
        state, no checkpoint): a run that failed at its start leaves nothing behind.

        Returns:
            Whether it was removed.
        """
        import shutil

        started = (self.metrics_csv.exists() or any(self.backup_dir.glob("epoch-*.weights.h5"))
                   or (self.backup_dir / "latest.weights.h5").exists()
                   or any(self.checkpoints_dir.glob("*.keras")) or self.failed)
        if started or not self.path.is_dir():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    def remove_resume_state(self) -> None:
        """Removes ``backup/`` once the final model is on disk (the run is finished)."""
        import shutil

        shutil.rmtree(self.backup_dir, ignore_errors=True)

    def remove_stale_temporaries(self) -> list:
        """Temporary files left in the run by killed writers (see `tf_explog.files`)."""
        from tf_explog.files import remove_stale_temporaries

        removed = []
        for folder in (self.path, self.checkpoints_dir, self.backup_dir):
            removed += remove_stale_temporaries(folder)
        return removed

    def write_history(self, history: dict) -> None:
        write_json(self.history_file, history)

    def read_done(self) -> Optional[dict]:
        """An experiment's stored summary (``DONE.json``), or None."""
        if not self.done_file.is_file():
            return None
        return json.loads(self.done_file.read_text())

    def write_done(self, summary: dict) -> None:
        write_json(self.done_file, summary, indent=None)


# ------------------------------------------------------------------ metrics.csv


def read_metrics_csv(path) -> list:
    """The rows of a run's ``metrics.csv`` as dicts of floats (``epoch`` an int; empty cells absent).

    Epochs are numbered from 1, as on the console and in TensorBoard. Files written before
    that convention numbered them from 0; their first row is epoch 0 (a run's file always
    starts with its first epoch), and they are read shifted by one, so ``--resume`` and the
    best-value resume of `tf_explog.callbacks.BestCheckpoint` work on old runs too.
    """
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if value in ("", None):
                    continue
                try:
                    row[key] = int(value) if key == "epoch" else float(value)
                except ValueError:
                    continue
            if "epoch" in row:
                rows.append(row)
    if rows and rows[0]["epoch"] == 0:  # numbered from 0 (an older run): shift
        for row in rows:
            row["epoch"] += 1
    return rows


def write_metrics_csv(path, rows: Sequence[dict]) -> None:
    """Writes every row (``epoch`` first, then the union of the keys, sorted), atomically."""
    keys = sorted({k for row in rows for k in row} - {"epoch"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["epoch", *keys], restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write(path, buf.getvalue())
