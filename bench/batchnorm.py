"""Cost of one BatchNorm recalibration pass against one training epoch (figures only).

For the paper network (20 labels, batch 1) at each size, on N random z-scored volumes:

- one training epoch: N ``train_on_batch`` steps (after a warm-up step);
- one forward pass over the N volumes with ``predict_on_batch`` (compiled);
- one recalibration pass (:func:`tf_explog.batchnorm.recalibrate_batchnorm`, eager, the
  moments of all 30 BatchNorm inputs collected).

The goal: recalibration costs no more than a forward pass over the training set.

Usage: ``python bench/batchnorm.py [--sizes 48 128] [--volumes 4]``; the backend is the
Keras default (``KERAS_BACKEND=jax`` for JAX).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as tf_explog does (4x on AVX2 CPUs)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_explog.batchnorm import recalibrate_batchnorm  # noqa: E402
from tf_explog.losses import ExpLogLoss  # noqa: E402
from tf_explog.models import build_model  # noqa: E402


def seconds(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 128])
    p.add_argument("--volumes", type=int, default=4)
    args = p.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"Keras {keras.__version__} on {keras.backend.backend()}; float32; batch 1")
    print(f"{'size':>5} {'epoch s':>9} {'forward s':>10} {'recal s':>9} "
          f"{'recal/epoch':>12} {'recal/forward':>14}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        volumes = [rng.normal(size=(1, size, size, size, 1)).astype("float32")
                   for _ in range(args.volumes)]
        labels = [rng.integers(0, 20, (1, size, size, size)) for _ in volumes]
        model = build_model(num_classes=20, seed=0)
        model.compile(optimizer=keras.optimizers.Nadam(1e-3), loss=ExpLogLoss(),
                      jit_compile=keras.backend.backend() == "jax")
        model.train_on_batch(volumes[0], labels[0])  # compile
        model.predict_on_batch(volumes[0])
        recalibrate_batchnorm(model, volumes[:1])
        epoch = seconds(lambda: [model.train_on_batch(x, y) for x, y in zip(volumes, labels)])
        forward = seconds(lambda: [model.predict_on_batch(x) for x in volumes])
        recal = seconds(lambda: recalibrate_batchnorm(model, volumes))
        print(f"{size:>5} {epoch:9.2f} {forward:10.2f} {recal:9.2f} {recal / epoch:12.2f} "
              f"{recal / forward:14.2f}", flush=True)


if __name__ == "__main__":
    main()
