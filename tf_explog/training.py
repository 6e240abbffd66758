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
from dataclasses import dataclass
from pathlib import Path

import keras

from tf_explog.builders import TrainingSetup, monitor_name
from tf_explog.callbacks import (BestCheckpoint, EpochSummary, MetricsCSV, StepCallbackList,
                                 TimeBudget)
from tf_explog.config import Config, ConfigError
from tf_explog.errors import NonFiniteError
from tf_explog.runs import Run

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

    monitor = monitor_name(config)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run.backup_dir), save_freq="epoch",
                                         delete_checkpoint=True),
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
        run = Run.open(resume)
        run.check_resumable()
        config = run.config
    check_backend(config)  # before anything is created on disk
    check_dtype_policy(config.train.dtype_policy)
    # Every case of every split is checked here, so bad data never leaves a run directory.
    setup = TrainingSetup.from_config(config)
    if resume is None:
        run = Run.create(config, run_dir)

    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.train.dtype_policy)
    try:
        if config.train.strategy == "multi_worker":
            from tf_explog.distributed import train_multi_worker

            history = train_multi_worker(config, run, setup, fresh=resume is None)
        else:
            history = _fit(config, run, setup, extra_callbacks, fresh=resume is None)
    except NonFiniteError as err:
        # Marked so nobody takes the run for a finished one; best.keras (if any) is from an
        # earlier, finite epoch.
        run.mark_failed(str(err))
        raise NonFiniteError(f"{err} (run directory: {run.path})") from None
    except BaseException:
        # A run that never finished an epoch holds nothing to resume: leave no empty folder.
        # Later failures keep the resume state (--resume continues at the last epoch).
        if resume is None:
            run.discard_if_empty()
        raise
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return TrainResult(run.path, history, run.best_checkpoint, run.final_model)


def _fit(config: Config, run: Run, setup: TrainingSetup, extra_callbacks, fresh: bool) -> dict:
    if fresh:
        run.write_info(config, setup.label_names, setup.num_channels, setup.preprocessor)
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
    # One line whatever the verbosity: which run, and how it is set up.
    print(f"[tf_explog] run {run.path} backend={keras.backend.backend()} seed={config.seed} "
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
    return history.history
