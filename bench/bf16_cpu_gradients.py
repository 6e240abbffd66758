"""Why ``train.dtype_policy: mixed_bfloat16`` is refused on a TensorFlow CPU.

Measures, for one Conv3D (8 -> 12 channels, 3³ kernel) at several volume sizes, the relative
error of the bfloat16 computation against float32 run on the *same bfloat16-rounded inputs*,
so that only the arithmetic inside the kernels is measured, not the rounding of the inputs:

    rel err = ||g_bf16 − g_f32|| / ||g_f32||

for the forward output (a sum over 27 × 8 terms per voxel), the input gradient (the same
kind of sum) and the kernel gradient (a sum over every voxel of the volume). bfloat16 keeps
8 significant bits, so a result rounded once is off by ~0.4 %; an error that grows with the
number of voxels means the sum itself is accumulated in bfloat16.

Measured on the 2-core AMD EPYC (AVX2, no AVX512-BF16), TensorFlow 2.21, oneDNN on and off
(identical): kernel gradient 0.4 % at 16³, 9.7 % at 48³, 70 % at 96³, 87 % at 128³; forward
and input gradient 0.8-1.5 % at every size. The weight gradients of a 3D network trained in
mixed_bfloat16 on this CPU are mostly noise at the paper's size (a demo run on an
AVX512-BF16 machine ended with every weight NaN). JAX's XLA CPU backend accumulates the
same kernel gradient in float32: 0.14 % at 48³ and 96³ on the same machine; so do GPUs.

Usage: ``python bench/bf16_cpu_gradients.py [SIZE ...]`` (default 16 48 96 128).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as tf_explog does

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def conv_results(dtype, x, w, dy):
    """(forward, kernel gradient, input gradient) of conv3d in ``dtype``, as float64."""
    xv = tf.cast(x, dtype)
    wv = tf.Variable(tf.cast(w, dtype))
    with tf.GradientTape() as tape:
        tape.watch(xv)
        y = tf.nn.conv3d(xv, wv, [1] * 5, "SAME")
    gw, gx = tape.gradient(y, [wv, xv], output_gradients=tf.cast(dy, dtype))
    return [np.asarray(tf.cast(v, tf.float32), np.float64) for v in (y, gw, gx)]


def main(sizes) -> None:
    print(f"TensorFlow {tf.__version__}, TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')}, devices "
          f"{[d.device_type for d in tf.config.list_physical_devices()]}")
    print(f"{'size':>5} {'forward':>9} {'d kernel':>9} {'d input':>9}   (relative error, bf16 vs f32)")
    rng = np.random.default_rng(0)
    for size in sizes:
        x = rng.normal(1.0, 1.0, (1, size, size, size, 8)).astype(np.float32)
        w = rng.normal(0.0, 0.1, (3, 3, 3, 8, 12)).astype(np.float32)
        dy = (rng.normal(0.0, 1.0, (1, size, size, size, 12)) + 0.5).astype(np.float32)
        rounded = [tf.cast(tf.cast(a, tf.bfloat16), tf.float32) for a in (x, w, dy)]
        ref = conv_results(tf.float32, *rounded)
        got = conv_results(tf.bfloat16, *rounded)
        errors = [np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in zip(got, ref)]
        print(f"{size:>5} " + " ".join(f"{100 * e:8.2f}%" for e in errors), flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [16, 48, 96, 128])
