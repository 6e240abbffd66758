"""Training-step time of the paper network on this machine (CPU), batch 1.

Prints, for each volume size × dtype policy × jit_compile setting, the median wall time of
``model.train_on_batch`` over N steps after warm-up steps (the first step includes graph
tracing or XLA compilation and is reported separately). The loss is
``tf_explog.losses.ExpLogLoss`` (paper defaults) when that module is available, otherwise
sparse categorical cross-entropy; the output says which. Figures only, never pass/fail.

Usage::

    python bench/train_step.py                      # 64³ and 128³, jit on only at 64³
    python bench/train_step.py --jit-128            # also XLA at 128³ (slow to compile on CPU)
    python bench/train_step.py --sizes 64 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as tf_explog does (4x on AVX2 CPUs)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_explog.models import build_model  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16")


def machine() -> str:
    """One line describing this machine: CPU model, cores, backend and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import tensorflow as tf

    return (f"{cpu}; {os.cpu_count()} logical CPUs visible; Python {platform.python_version()}; "
            f"TensorFlow {tf.__version__}; Keras {keras.__version__} "
            f"({keras.backend.backend()} backend)")


def make_loss():
    """ExpLogLoss when the losses module provides it, else sparse cross-entropy."""
    try:
        from tf_explog.losses import ExpLogLoss
    except ImportError:
        return "sparse_categorical_crossentropy", "sparse_categorical_crossentropy"
    return ExpLogLoss(), "ExpLogLoss (gamma 0.3, w 0.8/0.2)"


def time_case(size: int, policy: str, jit: bool, steps: int, warmup: int,
              num_classes: int) -> dict:
    """Build, compile and time ``train_on_batch`` for one configuration."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    try:
        model = build_model((size, size, size, 1), num_classes=num_classes)
        loss, _ = make_loss()
        model.compile(optimizer=keras.optimizers.Nadam(1e-3), loss=loss, jit_compile=jit)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(1, size, size, size, 1)).astype("float32")
        y = rng.integers(0, num_classes, size=(1, size, size, size)).astype("int32")
        start = time.perf_counter()
        model.train_on_batch(x, y)  # returns numpy: the step has finished
        first = time.perf_counter() - start
        for _ in range(max(warmup - 1, 0)):
            model.train_on_batch(x, y)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {
        "size": size,
        "policy": policy,
        "jit_compile": jit,
        "first_step_s": round(first, 3),
        "median_step_s": round(statistics.median(times), 4),
        "min_step_s": round(min(times), 4),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128],
                        help="cubic volume sizes (multiples of 16)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, the first included")
    parser.add_argument("--jit-128", action="store_true",
                        help="also time jit_compile=True at sizes >= 128 (minutes of XLA "
                             "compilation on a small CPU)")
    parser.add_argument("--no-jit", action="store_true", help="skip jit_compile=True entirely")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    for size in args.sizes:
        if size < 16 or size % 16:
            parser.error(f"--sizes: {size} is not a positive multiple of 16")

    _, loss_name = make_loss()
    if not args.json:
        print(f"machine: {machine()}")
        print(f"network: build_model() defaults (4,994,036 parameters at 20 labels), batch 1, "
              f"Nadam; loss: {loss_name}")
        print(f"{'size':>5} {'policy':<15} {'jit':<5} {'first step s':>12} "
              f"{'median s':>9} {'min s':>8}")
    for size in args.sizes:
        for policy in args.policies:
            for jit in (False, True):
                if jit and (args.no_jit or (size >= 128 and not args.jit_128)):
                    continue
                row = time_case(size, policy, jit, args.steps, args.warmup, args.num_classes)
                row["loss"] = loss_name
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{size:>5} {policy:<15} {str(jit):<5} {row['first_step_s']:>12.2f} "
                          f"{row['median_step_s']:>9.3f} {row['min_step_s']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
