"""Forward time of the paper network with BatchNorm folded into its convolutions, or not.

For each dtype policy the backend allows here, builds the paper network (``build_model``
defaults, 20 classes) with non-trivial BatchNorm statistics, folds it
(``tf_explog.folding.fold_batchnorm``) and times ``tf_explog.inference.predict_volume`` on one
``--size``³ volume (what ``tf-explog predict`` runs per case: padding, the compiled
``predict_on_batch``, the softmax output back on the host) for both, after a warm-up call.
Prints one JSON line per (policy, model) with the median and min seconds, the folded/unfolded
ratio, and the largest probability difference between the two.

    python bench/folding.py                         # TensorFlow backend, float32 on a CPU
    KERAS_BACKEND=jax python bench/folding.py       # JAX: float32, mixed_float16, mixed_bfloat16
    python bench/folding.py --size 64 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from fullres import timed  # noqa: E402  (bench/ is on sys.path when a script runs)


def policies_here() -> list:
    """TensorFlow refuses mixed precision on a CPU (see README); JAX takes all three."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return ["float32"]
    return ["float32", "mixed_float16", "mixed_bfloat16"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--policies", nargs="+", default=None)
    args = p.parse_args(argv)

    from tf_explog.folding import fold_batchnorm
    from tf_explog.inference import predict_volume
    from tf_explog.models import build_model

    print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                      "backend": keras.backend.backend(), "keras": keras.__version__,
                      "size": args.size}), flush=True)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(args.size,) * 3 + (1,)).astype("float32")
    for policy in args.policies or policies_here():
        keras.config.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = build_model(num_classes=20)
            for w in model.non_trainable_weights:  # trained-like statistics
                if "moving_mean" in w.path:
                    w.assign(rng.normal(0, 0.3, w.shape))
                elif "moving_variance" in w.path:
                    w.assign(rng.uniform(0.5, 2.0, w.shape))
            folded = fold_batchnorm(model)
            outputs, rows = {}, {}
            for name, m in (("unfolded", model), ("folded", folded)):
                outputs[name] = predict_volume(m, image)
                times = timed(lambda m=m: predict_volume(m, image), args.runs)
                rows[name] = {"policy": policy, "model": name,
                              "median_s": round(statistics.median(times), 4),
                              "min_s": round(min(times), 4), "runs": args.runs}
            rows["folded"]["folded_over_unfolded"] = round(
                rows["folded"]["median_s"] / rows["unfolded"]["median_s"], 3)
            rows["folded"]["max_abs_probability_difference"] = float(
                np.max(np.abs(outputs["folded"] - outputs["unfolded"])))
            for row in rows.values():
                print(json.dumps(row), flush=True)
        finally:
            keras.config.set_dtype_policy("float32")


if __name__ == "__main__":
    main()
