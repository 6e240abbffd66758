"""Multi-worker training with a custom loop over ``MultiWorkerMirroredStrategy``.

Keras 3's ``fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585: a
``PerReplica`` conversion error), so this module trains with ``strategy.run``: per-replica
losses with ``reduction=None`` averaged by ``tf.nn.compute_average_loss`` over the global
batch. It keeps what the ``fit`` path writes into the run directory: TensorBoard scalars
(loss, its Dice and cross-entropy terms, validation Dice per label, learning rate), the
CSV log, the best checkpoint by validation mean Dice, and resume state (model, optimizer and
epoch in a ``tf.train.Checkpoint`` under ``backup/``).

The cluster comes from ``TF_CONFIG`` as usual. Only the chief writes the run directory;
the other workers write their (required) checkpoint copies to a temporary directory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tf_explog.batchnorm import recalibrate_batchnorm
from tf_explog.console import epoch_line
from tf_explog.callbacks import (NonFiniteGuard, eager_predict, improves, lower_is_better,
                                 validate_volumes)
from tf_explog.errors import InputError, NonFiniteError
from tf_explog.metrics import log_key
from tf_explog.runs import Run, read_metrics_csv, write_metrics_csv
from tf_explog.summaries import EventWriter, scalar_tags


def _is_chief(resolver) -> bool:
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                            and "chief" not in resolver.cluster_spec().jobs)


def train_multi_worker(config, run: Run, setup, fresh: bool = True) -> dict:
    """Trains ``config`` in ``run`` with the custom loop; returns the history.

    Everything comes from ``setup`` (its `tf_explog.builders.TrainingSetup`), as for
    ``fit``: the same steps per epoch, loss, optimizer, loss terms, recalibration batches
    and checkpoint monitor, with the same improvement rule. ``config`` is not changed.
    """
    from tf_explog.builders import loss_terms, recalibration_batches

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    chief = _is_chief(strategy.cluster_resolver)
    # Only the chief writes the run; the others need somewhere for their checkpoint copies.
    work = run if chief else Run(Path(tempfile.mkdtemp(prefix="tf_explog_worker_")))

    if chief and fresh:
        from tf_explog.environment import command_line, environment

        run.write_info(config, setup.label_names, setup.num_channels, setup.preprocessor,
                       environment(), command_line())
    label_names = setup.label_names
    global_batch = config.train.batch_size
    # The per-epoch step count must be the same on every worker: a repeating stream.
    steps = setup.steps_per_epoch
    train_ds = setup.tf_dataset(global_batch, repeat=True)
    val_volumes = setup.volumes("validation")
    recalibration = recalibration_batches(config, setup.volumes("training"))
    if config.model.aux_outputs:
        raise InputError("train.strategy=multi_worker supports model.aux_outputs=0 only.")
    monitor = config.train.checkpoint_monitor
    lower = lower_is_better(monitor)

    with strategy.scope():
        model = setup.build_model()
        optimizer = setup.optimizer()
        loss_fn = setup.loss(reduction=None)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        optimizer.build(model.trainable_variables)
    terms = loss_terms(loss_fn)
    val_loss_fn = setup.loss()

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, str(work.backup_dir), max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)

    @tf.function
    def train_step(iterator):
        def step_fn(image, labels):
            with tf.GradientTape() as tape:
                pred = model(image, training=True)
                per_sample = loss_fn(labels, pred)
                loss = tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            term_values = [tf.nn.compute_average_loss(fn(labels, pred, **kwargs),
                                                      global_batch_size=global_batch)
                           for fn, kwargs in terms.values()]
            return [loss, *term_values]

        image, labels = next(iterator)
        per_replica = strategy.run(step_fn, args=(image, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for v in per_replica]

    writer = EventWriter(work.tensorboard_dir)
    structure_keys = [log_key(n) for n in label_names[1:]]
    csv_path = work.metrics_csv
    best_path = work.best_checkpoint
    work.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    history: dict[str, list] = {}
    csv_rows = read_metrics_csv(csv_path) if csv_path.is_file() else []
    # A resumed run keeps its best so far (the checkpoint on disk is that epoch's).
    best = None
    for row in csv_rows:
        value = row.get(monitor)
        if (row["epoch"] <= int(epoch_var.numpy())  # rows are numbered from 1
                and value is not None and np.isfinite(value)
                and improves(value, best, lower)):
            best = float(value)
    # Shard by batch: the stream reads from a cache, not from files TF can split.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    iterator = iter(strategy.experimental_distribute_dataset(train_ds.with_options(options)))
    term_names = list(terms)

    for epoch in range(int(epoch_var.numpy()), config.train.epochs):
        start = time.perf_counter()
        sums = np.zeros(1 + len(terms))
        for step in range(steps):
            values = np.array([float(v) for v in train_step(iterator)])
            if not np.isfinite(values[0]):
                raise NonFiniteError(
                    f"training stopped: the loss became {values[0]} at epoch {epoch + 1}, "
                    f"step {step + 1}; nothing from this epoch was saved")
            sums += values
        logs = {"loss": sums[0] / steps}
        logs.update({name: sums[i + 1] / steps for i, name in enumerate(term_names)})
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        logs["epoch_seconds"] = time.perf_counter() - start
        _check_finite(logs, model, epoch)
        # As in the fit path: population BatchNorm statistics, then validation of the model
        # as users run it. Every worker does both on the same data, so they stay identical.
        if config.train.bn_recalibration:
            recalibrate_batchnorm(model, recalibration,
                                  passes=config.train.bn_recalibration_passes)
        if val_volumes is not None:
            result = validate_volumes(model, val_volumes, len(label_names), window=setup.window,
                                      tta=config.train.validation_tta,
                                      loss=val_loss_fn, predict=eager_predict(model))
            logs["val_dice"] = result["dice"]
            logs.update({f"val_dice_{log_key(n)}": v for n, v in
                         zip(label_names[1:], result["dice_per_label"][1:])})
            logs["val_loss"] = result["loss"]

        for tag, value in scalar_tags(logs, structure_keys).items():  # as the fit path
            writer.scalar(tag, value, epoch + 1)  # numbered from 1, as metrics.csv
        writer.flush()
        epoch_var.assign(epoch + 1)
        manager.save()  # every worker must take part; non-chiefs write to a temp dir
        value = logs.get(monitor)
        if chief:
            if value is not None and np.isfinite(value) and improves(value, best, lower):
                best = float(value)
                work.save_model(model, "best")
            csv_rows = ([r for r in csv_rows if r["epoch"] <= epoch]
                        + [{"epoch": epoch + 1, **logs}])
            write_metrics_csv(csv_path, csv_rows)
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if config.train.verbose and chief:
            print(epoch_line(epoch, config.train.epochs, logs), flush=True)

    if not chief:
        shutil.rmtree(work.path, ignore_errors=True)  # only the chief's files are kept
    else:
        run.save_model(model, "final")
        if not best_path.exists():
            run.save_model(model, "best")
        run.write_history(history)
    return history


def _check_finite(logs: dict, model, epoch: int) -> None:
    """The fit path's NonFiniteGuard, for the custom loop (epoch granularity)."""
    for key, value in logs.items():
        if not np.isfinite(value):
            raise NonFiniteError(f"training stopped: {key} is {value} at the end of epoch "
                                 f"{epoch + 1}; nothing from this epoch was saved")
    guard = NonFiniteGuard()
    guard.set_model(model)
    guard.on_epoch_end(epoch, {})


