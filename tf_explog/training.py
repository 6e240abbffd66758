"""The trainer: a `Config` into ``compile()`` + ``fit()`` inside a run directory.

`tf_explog.builders.TrainingSetup` makes the pieces (data, class weights, model, loss,
metrics, the inference-mode validation callbacks); `tf_explog.runs.Run` owns the run
directory ``<runs_dir>/<name>/<timestamp>/`` (never overwritten). This module adds the
callbacks that write the run (TensorBoard, best checkpoint, BackupAndRestore, CSV log) and
what depends on the backend:

- TensorFlow: the ``tf.data`` stream, the tf.distribute strategy, the dtype-policy check
  (mixed precision refused on a TensorFlow CPU), XLA ``auto`` = on with a GPU, off on a CPU
  (measured ~10x slower there).
- JAX (``KERAS_BACKEND=jax``, no TensorFlow needed): the ``keras.utils.PyDataset`` front end
  (`tf_explog.data.pydataset.VolumeSequence`) with ``train.data_workers`` threads, XLA
  ``auto`` = on (JAX without jit runs op by op: measured 4.7x slower per epoch on this CPU);
  ``train.strategy`` other than ``none`` is refused (tf.distribute is TensorFlow's).

TensorFlow is imported only on the TensorFlow backend.

``strategy: multi_worker`` uses a custom loop (`tf_explog.distributed`), because Keras 3's
``fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import keras

from tf_explog.builders import TrainingSetup
from tf_explog.callbacks import (BestCheckpoint, EpochSummary, MetricsCSV, ResumeState,
                                 StepCallbackList, TimeBudget)
from tf_explog.config import Config, ConfigError
from tf_explog.environment import command_line, device_description, environment
from tf_explog.errors import EnvironmentFault, InputError, NonFiniteError
from tf_explog.files import describe_environment_error, environment_error
from tf_explog.runs import Run, RunError

@dataclass
class TrainResult:
    run_dir: Path
    history: dict
    best_checkpoint: Path
    final_model: Path


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def has_accelerator() -> bool:
    """Whether the Keras backend sees a GPU (TensorFlow) or a non-CPU device (JAX)."""
    if on_tensorflow():
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if keras.backend.backend() == "jax":
        import jax

        return any(d.platform != "cpu" for d in jax.devices())
    return False


def resolve_jit_compile(setting) -> bool:
    """``auto``: on TensorFlow, XLA on a GPU and off on a CPU (measured ~10x slower there);
    on JAX always (without jit JAX runs op by op: on this 2-core CPU a toy model took 1.5 s
    per epoch eager against 0.32 s compiled)."""
    if setting == "auto":
        return True if keras.backend.backend() == "jax" else has_accelerator()
    return bool(setting)


def check_dtype_policy(policy: str) -> None:
    """Refuses mixed precision on a TensorFlow CPU, where it cannot train this network.

    - mixed_bfloat16: TensorFlow's CPU Conv3D accumulates the kernel gradient (a sum over
      every voxel) in bfloat16: measured 10 % off at 48³ and 87 % at 128³
      (``bench/bf16_cpu_gradients.py``), and a demo run ended with every weight NaN.
    - mixed_float16: the CPU has no float16 MaxPool3D kernel.
    """
    if policy == "float32" or not on_tensorflow() or has_accelerator():
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


def check_backend(config: Config) -> None:
    """What only TensorFlow can do, refused on another backend before anything is written."""
    if on_tensorflow() or config.train.strategy == "none":
        return
    raise ConfigError(f"train.strategy={config.train.strategy} needs TensorFlow (tf.distribute)"
                      f"; the Keras backend is {keras.backend.backend()}. Use "
                      "train.strategy=none, or KERAS_BACKEND=tensorflow.")


def make_strategy(name: str):
    """The tf.distribute strategy (TensorFlow backend only)."""
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"train.strategy must be none, mirrored or multi_worker; got {name!r}.")


# --------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------


def standard_callbacks(config: Config, run: Run, sample, label_names, window=None):
    """Resume state, best checkpoint, CSV, TensorBoard and the epoch line (in this order).

    They come after `TrainingSetup.inference_callbacks`, whose validation logs they read.
    """
    from tf_explog.summaries import TensorBoardSummary, hparams_of

    monitor = config.train.checkpoint_monitor
    callbacks = [
        # Atomic, keeps the previous state until the new one is complete (not Keras' own).
        ResumeState(run.backup_dir),
        BestCheckpoint(run.best_checkpoint, monitor=monitor, metrics_csv=run.metrics_csv),
        MetricsCSV(run.metrics_csv),
        TensorBoardSummary(run.tensorboard_dir, label_names, sample,
                           config.train.image_summary_every, hparams_of(config), window),
    ]
    if config.train.verbose:
        callbacks.append(EpochSummary(config.train.epochs, monitor))
    return callbacks


def first_sample(*volume_sets):
    """The first (image, labels) volume of the first non-empty set, for image summaries."""
    for volumes in volume_sets:
        if volumes is not None and len(volumes):
            return volumes[0]
    return None


# --------------------------------------------------------------------------------------
# The run's record
# --------------------------------------------------------------------------------------


def run_results(rows: list, monitor: str) -> dict:
    """What a run found, from its ``metrics.csv`` rows (epochs numbered from 1).

    Returns:
        ``{"epochs_trained", "best": {"monitor", "epoch", "value"} or None,
        "final_metrics": the last row}``; the best is the highest ``monitor`` (lowest for a
        loss), the first epoch reaching it on ties, as `BestCheckpoint` keeps it.
    """
    import math

    from tf_explog.callbacks import improves, lower_is_better

    lower = lower_is_better(monitor)
    best = None
    for row in rows:
        value = row.get(monitor)
        if value is None or not math.isfinite(value):
            continue
        if improves(value, None if best is None else best["value"], lower):
            best = {"monitor": monitor, "epoch": int(row["epoch"]), "value": float(value)}
    return {"epochs_trained": len(rows), "best": best,
            "final_metrics": dict(rows[-1]) if rows else {}}


def record_results(run: Run, monitor: str, seconds: float, status: str = "finished") -> dict:
    """Writes the results into ``run.json`` (best epoch and value, final metrics, duration,
    accumulated over resumed sessions) and returns them."""
    from tf_explog.runs import read_metrics_csv

    rows = read_metrics_csv(run.metrics_csv) if run.metrics_csv.is_file() else []
    results = run_results(rows, monitor)
    earlier = float(run.info.get("duration_s") or 0.0)
    run.update_info(status=status, finished=datetime.now().isoformat(timespec="seconds"),
                    duration_s=round(earlier + seconds, 3), **results)
    return results


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def train(config: Config, *, resume: str | Path | None = None, extra_callbacks=(),
          run_dir: str | Path | None = None) -> TrainResult:
    """Trains the configured model; with ``resume`` continues that run directory.

    Args:
        config: a validated `Config` (ignored in favour of the run's own with ``resume``).
        resume: an existing run directory to continue (`ResumeState` picks up the last
            complete epoch, optimizer state included). Its ``config.yaml`` must still say
            what ``run.json`` says.
        extra_callbacks: more Keras callbacks (after the standard ones).
        run_dir: where to write a new run (default: a fresh timestamped directory).

    The run is held by this process (`Run.lock`) while it trains, except with
    ``train.strategy: multi_worker``.

    Returns:
        `TrainResult` with the run directory, the history and the checkpoint paths.

    Raises:
        RunError: the run is held by another process, finished, or edited since it started.
        InputError: no resume state can be read, or it does not fit the model.
        EnvironmentFault: a full disk, read-only file system or missing permission; the run
            is removed (no finished epoch) or marked ``FAILED.json`` (resumable).
        NonFiniteError: training diverged; the run is marked ``FAILED.json``.
    """
    start = time.perf_counter()
    # One process per run (multi-worker jobs share a resumed run between their workers).
    with contextlib.ExitStack() as held:
        if resume is not None:
            run = Run.open(resume)
            run.check_resumable()
            config = run.config
            if config.train.strategy != "multi_worker":
                held.enter_context(run.lock())  # before anything is read or written
            check_config_file(run, config)
        check_backend(config)  # before anything is created on disk
        check_dtype_policy(config.train.dtype_policy)
        # Every case of every split is checked here, so bad data never leaves a run
        # directory.
        setup = TrainingSetup.from_config(config)
        if resume is None:
            run = Run.create(config, run_dir)
            if config.train.strategy != "multi_worker":
                held.enter_context(run.lock())
        return _train_locked(config, run, setup, extra_callbacks, fresh=resume is None,
                             start=start)


def check_config_file(run: Run, config: Config) -> None:
    """Refuses to resume a run whose ``config.yaml`` no longer says what ``run.json`` says.

    ``--resume`` continues the run as it started (``run.json``); an edited ``config.yaml``
    would be silently ignored, so the first difference is named instead.

    Raises:
        RunError: ``config.yaml`` differs from ``run.json`` or is not a valid config.
    """
    from tf_explog.config import config_from_dict, read_yaml

    path = run.path / "config.yaml"
    if not path.is_file():
        return  # run.json alone describes the run
    advice = (f"--resume continues the run with the config in run.json; restore "
              f"{path.name}, or start a new run with --config {path}.")
    try:
        edited = config_from_dict(read_yaml(path)).to_dict()
    except InputError as err:
        raise RunError(f"{path}: no longer a valid config ({err}); {advice}") from None
    difference = _first_difference(config.to_dict(), edited)
    if difference is not None:
        key, was, now = difference
        raise RunError(f"{path}: {key} was edited since the run started (run.json: {was!r}, "
                       f"config.yaml: {now!r}); {advice}")


def _first_difference(a, b, prefix: str = ""):
    """``(dotted key, a's value, b's value)`` of the first difference, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


class _SessionRecord(keras.callbacks.Callback):
    """Notes in run.json that this process trains the run, once training really begins.

    Placed after `ResumeState`, so a ``--resume`` refused for a torn or mismatched state (or
    anything else before the first step) leaves run.json exactly as it was. A resumed run
    keeps one line per session: the session that continues it may run elsewhere.
    """

    def __init__(self, run: Run, fresh: bool) -> None:
        super().__init__()
        self.run, self.fresh, self.began = run, fresh, False

    def on_train_begin(self, logs=None):
        self.began = True
        if not self.fresh:
            sessions = list(self.run.info.get("resumed") or [])
            sessions.append({"at": datetime.now().isoformat(timespec="seconds"),
                             "command": command_line(), "environment": environment()})
            self.run.update_info(status="running", resumed=sessions)


def _train_locked(config: Config, run: Run, setup: TrainingSetup, extra_callbacks,
                  fresh: bool, start: float) -> TrainResult:
    """`train` once the run is held by this process."""
    run.remove_stale_temporaries()  # left by a writer that was killed
    session = _SessionRecord(run, fresh)
    monitor = config.train.checkpoint_monitor  # validated by TrainingSetup.from_config
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.train.dtype_policy)
    try:
        if config.train.strategy == "multi_worker":
            from tf_explog.distributed import train_multi_worker

            session.on_train_begin()  # its custom loop takes no callbacks
            history = train_multi_worker(config, run, setup, fresh=fresh)
        else:
            history = _fit(config, run, setup, [*extra_callbacks, session], fresh=fresh)
    except NonFiniteError as err:
        # Marked so nobody takes the run for a finished one; best.keras (if any) is from an
        # earlier, finite epoch.
        run.mark_failed(str(err))
        record_results(run, monitor, time.perf_counter() - start, "failed")
        raise NonFiniteError(f"{err} (run directory: {run.path})") from None
    except OSError as err:
        if not environment_error(err):
            raise
        # A full disk, a read-only or unwritable folder: the user's to fix, not a bug.
        what = describe_environment_error(err, run.path)
        if fresh and run.discard_if_empty():
            raise EnvironmentFault(f"{what}; the run had finished no epoch and was removed "
                                   "(train again once fixed)") from None
        marked = run.mark_failed(what, kind="environment")
        raise EnvironmentFault(f"{what}; training stopped"
                               f"{', run marked FAILED.json' if marked else ''} (continue "
                               f"with --resume {run.path} once fixed)") from None
    except BaseException:
        # A run that never finished an epoch holds nothing to resume: leave no empty folder.
        # Later failures keep the resume state (--resume continues at the last epoch).
        discarded = fresh and run.discard_if_empty()
        if not discarded and session.began and (run.path / "run.json").is_file():
            # Resumable: say so in run.json (the results so far, status "interrupted"); a
            # resume refused before training began leaves run.json untouched.
            try:
                record_results(run, monitor, time.perf_counter() - start, "interrupted")
            except Exception:  # never hide the error that stopped the run
                pass
        raise
    finally:
        keras.config.set_dtype_policy(previous_policy)
    run.clear_failed()  # a resumed run that had failed has finished after all
    if run.path.is_dir() and (run.path / "run.json").is_file():  # non-chief workers drop theirs
        record_results(run, monitor, time.perf_counter() - start)
    return TrainResult(run.path, history, run.best_checkpoint, run.final_model)


def _fit(config: Config, run: Run, setup: TrainingSetup, extra_callbacks, fresh: bool) -> dict:
    if fresh:
        run.write_info(config, setup.label_names, setup.num_channels, setup.preprocessor,
                       environment(), command_line())
    if on_tensorflow():
        strategy = make_strategy(config.train.strategy)
        scope, replicas = strategy.scope(), strategy.num_replicas_in_sync
        train_data = setup.tf_dataset(config.train.batch_size)
    else:
        # keras.utils.PyDataset: batches prepared by worker threads while the step runs.
        scope, replicas = contextlib.nullcontext(), 1
        train_data = setup.sequence("training", workers=config.train.data_workers)
    jit = resolve_jit_compile(config.train.jit_compile)
    with scope:
        model = setup.build_model()
        setup.compile(model, jit)
    callbacks = (setup.inference_callbacks(eager_validation=replicas > 1)
                 + standard_callbacks(config, run, first_sample(setup.volumes("validation"),
                                                                setup.volumes("training")),
                                      setup.label_names, setup.window)
                 + list(extra_callbacks))
    budget = None
    if config.train.time_budget_s:
        # Last, so the epoch it measures includes validation and checkpointing.
        budget = TimeBudget(config.train.time_budget_s)
        callbacks.append(budget)
    # One line whatever the verbosity: which run, on what device, and how it is set up.
    print(f"[tf_explog] run {run.path} device=\"{device_description()}\" "
          f"backend={keras.backend.backend()} seed={config.seed} "
          f"policy={config.train.dtype_policy} jit={jit} strategy={config.train.strategy} "
          f"replicas={replicas}", flush=True)
    # No host synchronisation per step: see StepCallbackList.
    callbacks = StepCallbackList(callbacks, add_history=True, add_progbar=False, model=model,
                                 verbose=0, epochs=config.train.epochs,
                                 steps=config.train.steps_per_epoch)
    history = model.fit(
        train_data, epochs=config.train.epochs,
        steps_per_epoch=config.train.steps_per_epoch, callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline / the sequence shuffles, seeded
        # One short line per epoch (EpochSummary); Keras' own would list every structure.
        verbose=0)
    if budget is not None and budget.stopped_by_budget:
        print(f"[tf_explog] time budget of {config.train.time_budget_s:g} s: stopped after "
              f"epoch {budget.epochs_trained} of {config.train.epochs}", flush=True)
    run.save_model(model, "final")
    if not run.best_checkpoint.exists():  # no validation split: the final model is the best
        run.save_model(model, "best")
    run.write_history(history.history)
    # Only now: a kill before this point still finds the resume state of the last epoch.
    run.remove_resume_state()
    return history.history
