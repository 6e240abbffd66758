"""What full resolution costs: sliding-window inference and patch training, in ratios.

Prints one JSON line per figure (machine, backend, policy included):

- ``forward``: one compiled forward pass of the paper network on a ``--window``³ volume;
- ``sliding_window``: ``predict_volume`` of a ``--volume``³ volume with ``--window``³
  Gaussian-blended windows (overlap 0.5), and its ratio to ``forward``;
- ``train_patch`` / ``train_volume``: seconds per training step (batch fetch included) when
  steps take ``--window``³ patches of ``--volume``³ cached volumes versus whole ``--window``³
  volumes (the paper's preset resized to ``--window``): equal voxels per step.

Defaults fit a 2-core CPU (96³ volumes, 64³ windows); on a GPU use ``--volume 256 --window
128``. Never pass/fail on time.

Usage::

    python bench/fullres.py [--volume 96 --window 64 --steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402


def timed(fn, runs: int) -> list:
    """Seconds of ``runs`` calls of ``fn`` after one untimed call (compile / warm up)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_seconds(fn, runs: int) -> float:
    return statistics.median(timed(fn, runs))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volume", type=int, default=96)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)

    from tf_explog.builders import TrainingSetup
    from tf_explog.config import config_from_dict
    from tf_explog.data.synthetic import generate_dataset
    from tf_explog.inference import predict_volume
    from tf_explog.losses import ExpLogLoss
    from tf_explog.models import build_model

    machine = {"machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "backend": keras.backend.backend(),
               "policy": keras.config.dtype_policy().name}

    def emit(**row):
        print(json.dumps({**row, **machine}), flush=True)

    w, v = args.window, args.volume
    model = build_model(num_classes=20)
    model.compile(optimizer=keras.optimizers.Nadam(1e-3), loss=ExpLogLoss())
    x = np.random.default_rng(0).normal(size=(1, w, w, w, 1)).astype("float32")
    forward = _median_seconds(lambda: keras.ops.convert_to_numpy(model.predict_on_batch(x)),
                              args.runs)
    emit(figure="forward", size=w, seconds=round(forward, 4))
    volume = np.random.default_rng(1).normal(size=(v, v, v, 1)).astype("float32")
    sliding = _median_seconds(lambda: predict_volume(model, volume, window=w),
                              max(1, args.runs - 1))
    emit(figure="sliding_window", size=v, window=w, seconds=round(sliding, 3),
         ratio_to_forward=round(sliding / forward, 1),
         windows_times_voxels=round((v / w) ** 3, 2))

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp) / "data", subjects=4, test_subjects=1, shape=v,
                         verbose=False)
        for arm, data in (
            ("train_patch", {"mode": "patch", "patch_size": [w] * 3, "oversample": 0.33}),
            ("train_volume", {"mode": "volume",
                              "preprocess": {"preset": "paper", "resize_shape": w}}),
        ):
            config = config_from_dict({
                "name": arm, "data": {"dataset": str(Path(tmp) / "data" / "dataset.json"),
                                      "cache_dir": str(Path(tmp) / "cache"),
                                      "validation_fraction": 0.0, **data},
                "train": {"steps_per_epoch": args.steps}})
            setup = TrainingSetup.from_config(config, validate=False)
            sequence = setup.sequence("training")
            sequence.warm()
            arm_model = setup.build_model()
            setup.compile(arm_model, jit_compile=keras.backend.backend() == "jax")
            arm_model.train_on_batch(*sequence[0])  # compile

            def step(i=[0]):
                i[0] += 1
                arm_model.train_on_batch(*sequence[i[0] % len(sequence)])

            seconds = _median_seconds(step, args.steps)
            emit(figure=arm, size=v, block=w, seconds_per_step=round(seconds, 3),
                 steps_per_second=round(1 / seconds, 2))


if __name__ == "__main__":
    main()
