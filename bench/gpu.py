"""Forward and training-step time of the paper network on the JAX backend (GPU machine).

Runs this project's ``build_model`` (the paper's network, batch 1) under float32,
mixed_float16 and mixed_bfloat16 with XLA (``jax.jit``), and prints one JSON line per
measurement: device, policy, kind, median / min milliseconds over N runs after warm-up, and
the first (compiling) call. Kinds:

- ``forward``: ``jax.jit(model.stateless_call)`` with ``training=False``, input on device;
- ``train_step``: ``jax.jit(model.train_step)`` — the step ``fit`` runs (loss, gradients,
  Nadam update, loss scaling under mixed_float16), state donated, data on device;
- ``train_on_batch``: the public Keras call, including host→device copies of the batch
  and the logs' device→host copy.

Needs only keras + jax (no TensorFlow), see ../shared/docs/GPU.md. The loss is
``tf_explog.losses.ExpLogLoss`` when available, else sparse categorical cross-entropy.
Without an accelerator it runs on the CPU with small defaults (32³, 3 runs).

Usage::

    KERAS_BACKEND=jax python bench/gpu.py | tee gpu.jsonl
    python bench/gpu.py --size 32 --runs 3 --warmup 1       # quick check (CPU default)
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

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
KINDS = ("forward", "train_step", "train_on_batch")


def _timed(fn, runs: int, warmup: int) -> tuple[float, list[float]]:
    """Seconds of the first call and of ``runs`` calls after ``warmup`` more; fn must sync."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def bench_policy(policy: str, size: int, num_classes: int, runs: int, warmup: int,
                 kinds: list[str]) -> list[dict]:
    """Time the requested kinds for one dtype policy; returns one row per kind."""
    import jax

    from tf_explog.models import build_model

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    rows = []
    try:
        model = build_model((size, size, size, 1), num_classes=num_classes)
        try:
            from tf_explog.losses import ExpLogLoss

            loss, loss_name = ExpLogLoss(), "ExpLogLoss"
        except ImportError:
            loss, loss_name = "sparse_categorical_crossentropy", "sparse_categorical_crossentropy"
        # Keras wraps the optimizer in a LossScaleOptimizer under mixed_float16 itself.
        model.compile(optimizer=keras.optimizers.Nadam(1e-3), loss=loss, jit_compile=True)
        rng = np.random.default_rng(0)
        x_host = rng.normal(size=(1, size, size, size, 1)).astype("float32")
        y_host = rng.integers(0, num_classes, size=(1, size, size, size)).astype("int32")
        x, y = jax.device_put(x_host), jax.device_put(y_host)
        # One public step builds the optimizer and metric variables that train_step needs.
        model.train_on_batch(x_host, y_host)

        def record(kind, first, times):
            rows.append({
                "device": str(jax.devices()[0].device_kind),
                "platform": jax.devices()[0].platform,
                "backend": keras.backend.backend(),
                "policy": policy,
                "kind": kind,
                "size": size,
                "batch": 1,
                "loss": loss_name if kind != "forward" else None,
                "median_ms": round(1e3 * statistics.median(times), 3),
                "min_ms": round(1e3 * min(times), 3),
                "first_call_s": round(first, 3),
                "runs": runs,
            })

        if "forward" in kinds:
            tv = [v.value for v in model.trainable_variables]
            ntv = [v.value for v in model.non_trainable_variables]
            forward = jax.jit(
                lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0]
            )
            record("forward", *_timed(lambda: forward(tv, ntv, x).block_until_ready(),
                                      runs, warmup))

        if "train_step" in kinds:
            # Copies: the step donates its state, and the model's own buffers must survive
            # for the train_on_batch timing below.
            state = [
                [jax.numpy.array(v.value, copy=True) for v in variables]
                for variables in (model.trainable_variables, model.non_trainable_variables,
                                  model.optimizer.variables, model.metrics_variables)
            ]
            step = jax.jit(model.train_step, donate_argnums=0)
            holder = {"state": state}

            def one_step():
                logs, holder["state"] = step(holder["state"], (x, y))
                jax.block_until_ready(logs)

            record("train_step", *_timed(one_step, runs, warmup))

        if "train_on_batch" in kinds:
            # The public call returns host numbers, so it has finished when it returns.
            record("train_on_batch", *_timed(lambda: model.train_on_batch(x_host, y_host),
                                             runs, warmup))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None,
                        help="cubic volume size, a multiple of 16 (default: 128 on a GPU, "
                             "32 on a CPU-only machine)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--runs", type=int, default=None,
                        help="timed calls, median reported (default: 20 on a GPU, 3 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls after the first (default: 3 on a GPU, 1 on a CPU)")
    parser.add_argument("--num-classes", type=int, default=20)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error(f"needs KERAS_BACKEND=jax, got {keras.backend.backend()!r}")

    import jax

    # Small defaults without an accelerator so that `make bench` stays short on a laptop.
    on_gpu = jax.default_backend() != "cpu"
    args.size = args.size if args.size is not None else (128 if on_gpu else 32)
    args.runs = args.runs if args.runs is not None else (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    if args.size < 16 or args.size % 16:
        parser.error(f"--size: {args.size} is not a positive multiple of 16")
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")

    print(json.dumps({
        "machine": platform.node(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "keras": keras.__version__,
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "tensorflow_imported": "tensorflow" in sys.modules,
    }), flush=True)
    for policy in args.policies:
        try:
            rows = bench_policy(policy, args.size, args.num_classes, args.runs, args.warmup,
                                args.kinds)
        except Exception as err:  # report and go on: one policy failing must not lose the rest
            rows = [{"policy": policy, "error": f"{type(err).__name__}: {err}"[:500]}]
        for row in rows:
            print(json.dumps(row), flush=True)
    # keras.utils.set_random_seed imports TensorFlow where it is installed (not on the GPU box).
    print(json.dumps({"done": True, "tensorflow_imported": "tensorflow" in sys.modules}),
          flush=True)


if __name__ == "__main__":
    main()
