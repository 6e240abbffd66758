"""The fit loop's epoch time against its steps alone: where the host stalls the device.

A small network (filters 4–16, 20 classes, the paper's loss) on ``--size``³ synthetic patches
(written to a temporary folder), batch 1, ``--steps`` steps per epoch. Prints one JSON line
per figure, each the median over epochs 2.. (the first compiles):

- ``steps``: ``model.fit`` on one prepared batch served again and again (``tf.data`` /
  ``PyDataset``, as the pipeline), no callbacks: the compiled steps and Keras' loop alone;
- ``epoch_keras_list``: the training data pipeline (``tf.data`` on TensorFlow, the
  ``PyDataset`` on JAX, augmentation on) with the run's step-level callbacks
  (``NonFiniteGuard``, ``EpochTimer``, ``BackupAndRestore``) in Keras' ``CallbackList``,
  which converts every step's logs to floats (a wait for the step);
- ``epoch_step_list``: the same with :class:`tf_explog.callbacks.StepCallbackList` (what
  ``tf-explog train`` uses): no conversion per step;

and ``ratio`` = epoch / (steps per epoch × step), the goal being ≤ 1.25. On a CPU the step
itself waits for its result, so this shows the host's own work (data, callbacks); on a GPU
the same script shows the stalls too. Never passes or fails on time.

    python bench/fit_loop.py [--size 32 --steps 12 --epochs 3]
    KERAS_BACKEND=jax python bench/fit_loop.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402


class SameBatch(keras.utils.PyDataset):
    """The same batch ``steps`` times."""

    def __init__(self, x, y, steps: int) -> None:
        super().__init__()
        self.batch, self.steps = (x, y), steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index):
        return self.batch


def config_for(root: Path, size: int, steps: int, epochs: int):
    import yaml

    from tf_explog.config import load_config

    (root / "c.yaml").write_text(yaml.safe_dump({
        "name": "fit_loop", "runs_dir": "runs", "seed": 0,
        "data": {"dataset": "data/dataset.json", "mode": "patch",
                 "patch_size": [size] * 3, "validation_fraction": 0.0,
                 "preprocess": {"target_shape": 2 * size},
                 "augment": {"enabled": True}},
        "model": {"filters": [4, 8, 8, 16, 16], "encoder_depths": [1] * 5,
                  "decoder_depths": [1] * 4},
        "loss": {"name": "exp_log"},
        "train": {"epochs": epochs, "batch_size": 1, "steps_per_epoch": steps,
                  "bn_recalibration": False, "image_summary_every": 0, "verbose": 0}}))
    return load_config(root / "c.yaml")


def epoch_seconds(model, data, steps: int, epochs: int, callbacks, step_list: bool,
                  backup_dir: Path) -> list:
    from tf_explog.callbacks import EpochTimer, NonFiniteGuard, StepCallbackList

    timer = EpochTimer()
    cbs = [NonFiniteGuard(), timer] + list(callbacks)
    if backup_dir is not None:
        cbs.append(keras.callbacks.BackupAndRestore(str(backup_dir), save_freq="epoch",
                                                    delete_checkpoint=True))
    if step_list:
        cbs = StepCallbackList(cbs, add_history=True, model=model, verbose=0, epochs=epochs,
                               steps=steps)
    history = model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=cbs, verbose=0,
                        shuffle=False)
    return history.history["epoch_seconds"][1:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)

    from tf_explog.builders import TrainingSetup
    from tf_explog.callbacks import EpochTimer
    from tf_explog.data.synthetic import generate_dataset
    from tf_explog.training import on_tensorflow, resolve_jit_compile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root / "data", subjects=4, test_subjects=0, shape=2 * args.size,
                         verbose=False)
        config = config_for(root, args.size, args.steps, args.epochs)
        setup = TrainingSetup.from_config(config)
        jit = resolve_jit_compile(config.train.jit_compile)

        def fresh_model():
            keras.utils.set_random_seed(0)
            model = setup.build_model()
            setup.compile(model, jit)
            return model

        def data():
            if on_tensorflow():
                return setup.tf_dataset(config.train.batch_size)
            return setup.sequence("training", workers=config.train.data_workers)

        # One real batch served again and again by the same kind of input (tf.data /
        # PyDataset): the steps without the pipeline's own work.
        source = data()
        x, y = next(iter(source)) if on_tensorflow() else source[0]
        x, y = np.asarray(x), np.asarray(y)
        if on_tensorflow():
            import tensorflow as tf

            same = tf.data.Dataset.from_tensors((x, y)).repeat()
        else:
            same = SameBatch(x, y, args.steps)
        model = fresh_model()
        history = model.fit(same, epochs=args.epochs, steps_per_epoch=args.steps, verbose=0,
                            callbacks=[EpochTimer()])
        step = statistics.median(history.history["epoch_seconds"][1:]) / args.steps

        head = {"machine": platform.node(), "cpus": os.cpu_count(),
                "backend": keras.backend.backend(), "keras": keras.__version__, "jit": jit,
                "size": args.size, "steps_per_epoch": args.steps, "epochs": args.epochs,
                "model": "filters 4-16, 20 classes, batch 1"}
        print(json.dumps(head), flush=True)
        print(json.dumps({"figure": "steps", "step_s": round(step, 4)}), flush=True)
        for name, step_list in (("epoch_keras_list", False), ("epoch_step_list", True)):
            secs = epoch_seconds(fresh_model(), data(), args.steps, args.epochs, [], step_list,
                                 root / f"backup_{name}")
            epoch = statistics.median(secs)
            print(json.dumps({"figure": name, "epoch_s": round(epoch, 3),
                              "ratio": round(epoch / (args.steps * step), 3)}), flush=True)


if __name__ == "__main__":
    main()
