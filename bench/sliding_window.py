"""Sliding windows blended on the device against the same windows' forward passes alone.

On one brain-like volume (default ``90 × 120 × 120``, a 2 mm cropped head; 64³ windows,
overlap 0.5: 2 × 3 × 3 = 18 windows) prints one JSON line per figure, median of ``--runs``
calls after one call for compilation (its time beside), the figures interleaved:

- ``forward``: the windows' forward passes alone: the same compiled model call on the same
  batches of windows, already on the device, each output reduced to a number to wait for it;
- ``device``: ``predict_volume(blend="device")`` (the default): every window in one compiled
  program, Gaussian blending on the device, labels (or probabilities) transferred once;
- ``host``: ``predict_volume(blend="host")``, today's baseline: each window's output copied
  to NumPy and blended on the CPU;

with the ratios ``device / forward`` (goal ≤ 1.15) and ``host / forward``, and the largest
probability difference between the two blendings. The model is the paper network
(``build_model`` defaults, 20 classes, BatchNorm folded as ``tf-explog predict`` does), or
``--model small`` (filters 4–16, for a quick look), or ``--model pointwise`` (a 1³
convolution and softmax: the blending's own cost). Never passes or fails on time.

    python bench/sliding_window.py                        # TensorFlow
    KERAS_BACKEND=jax python bench/sliding_window.py      # JAX
    python bench/sliding_window.py --shape 256 256 256 --window 128 --tta   # on a GPU
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402


def interleaved(fns: dict, runs: int) -> dict:
    """``{name: (first call's seconds, [seconds of each later call], last result)}``.

    One untimed-for-the-median call each (compilation), then ``runs`` rounds calling every
    function once per round, so load from other processes falls on all of them alike.
    """
    out = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        result = fn()
        out[name] = (time.perf_counter() - start, [], result)
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            out[name] = (out[name][0], out[name][1] + [time.perf_counter() - start], result)
    return out


def forward_only(model, image: np.ndarray, window: tuple, overlap: float, window_batch: int,
                 flips: list):
    """A function running the same windows' forward passes as ``predict_volume``, no
    blending: batches prepared (padded, on the device) beforehand."""
    from tf_explog.sliding_window import (_backend_compile, _corners, _select_segmentation,
                                     _pass_window)

    win = _pass_window(image.shape[:3], window, False, 16)
    padded = tuple(max(s, w) for s, w in zip(image.shape[:3], win))
    from tf_explog.geometry import pad_end

    x = pad_end(image, padded)
    crops = [x[tuple(slice(c, c + w) for c, w in zip(corner, win))]
             for corner in _corners(padded, win, overlap)] * len(flips)
    crops += [crops[0]] * (-len(crops) % window_batch)
    batches = [ops.convert_to_tensor(np.stack(crops[i:i + window_batch]))
               for i in range(0, len(crops), window_batch)]

    def forward(trainable, non_trainable, batch):
        out, _ = model.stateless_call(trainable, non_trainable, batch, training=False)
        return ops.sum(_select_segmentation(out, model)[..., 0])

    program = _backend_compile(forward)

    def run():
        # Read per call, as predict_volume does: on JAX, Keras' own predict donates the
        # variables' buffers, so values held from before would be gone.
        trainable = [ops.convert_to_tensor(v.value) for v in model.trainable_variables]
        non_trainable = [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables]
        for batch in batches:
            ops.convert_to_numpy(program(trainable, non_trainable, batch))
    return run, len(crops)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(90, 120, 120))
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--window-batch", type=int, default=1)
    p.add_argument("--tta", action="store_true", help="8 flips (the windows' count × 8)")
    p.add_argument("--model", choices=("paper", "small", "pointwise"), default="paper")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-host", action="store_true", help="skip the host-blending baseline")
    args = p.parse_args(argv)

    from tf_explog.folding import fold_batchnorm
    from tf_explog.sliding_window import _flip_sets, predict_volume
    from tf_explog.models import build_model

    keras.utils.set_random_seed(0)
    if args.model == "paper":
        model = build_model(seed=0)
    elif args.model == "pointwise":
        # A 1³ convolution and softmax: almost no forward work, so the figures show what
        # the blending itself costs.
        inp = keras.Input((None, None, None, 1))
        logits = keras.layers.Conv3D(20, 1)(inp)
        model = keras.Model(inp, keras.layers.Softmax(name="segmentation")(logits))
    else:
        model = build_model(num_classes=20, filters=(4, 8, 8, 16, 16),
                            encoder_depths=(1,) * 5, decoder_depths=(1,) * 4, seed=0)
    model = fold_batchnorm(model)
    rng = np.random.default_rng(0)
    image = rng.normal(size=tuple(args.shape) + (1,)).astype("float32")
    window = (args.window,) * 3
    kw = dict(window=window, overlap=args.overlap, tta=args.tta, window_batch=args.window_batch)
    flips = _flip_sets(args.tta)

    run_forward, n_windows = forward_only(model, image, window, args.overlap,
                                          args.window_batch, flips)
    head = {"machine": platform.node(), "cpus": os.cpu_count(),
            "backend": keras.backend.backend(), "keras": keras.__version__,
            "model": args.model, "shape": list(args.shape), "window": args.window,
            "overlap": args.overlap, "tta": args.tta, "window_batch": args.window_batch,
            "windows": n_windows, "runs": args.runs}
    print(json.dumps(head), flush=True)

    fns = {"forward": run_forward}
    for output in ("labels", "probabilities"):
        fns[f"device_{output}"] = (lambda output=output: predict_volume(
            model, image, output=output, **kw))
    if not args.no_host:
        fns["host"] = lambda: predict_volume(model, image, blend="host", **kw)
    results = interleaved(fns, args.runs)
    forward = statistics.median(results["forward"][1])
    for name, (first, times, _) in results.items():
        median = statistics.median(times)
        line = {"figure": name, "median_s": round(median, 3), "min_s": round(min(times), 3),
                "first_call_s": round(first, 2)}
        if name == "forward":
            line["per_window_s"] = round(median / n_windows, 4)
        else:
            line["ratio_to_forward"] = round(median / forward, 3)
            line["min_ratio_to_forward"] = round(min(times) / min(results["forward"][1]), 3)
        print(json.dumps(line), flush=True)
    if not args.no_host:
        diff = np.abs(results["host"][2] - results["device_probabilities"][2]).max()
        print(json.dumps({"figure": "max_probability_difference_device_vs_host",
                          "value": float(diff)}), flush=True)

if __name__ == "__main__":
    main()
