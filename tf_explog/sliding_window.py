"""Sliding-window prediction of one preprocessed volume: Gaussian-weighted blending, flip TTA.

:func:`predict_volume` turns one preprocessed image ``[D, H, W, C]`` into class probabilities
``[D, H, W, K]`` of any size: the volume is padded with its background intensity to a
multiple of the network's divisor (16 for the paper network, which halves the resolution
four times; :func:`tf_explog.geometry.spatial_divisor`) and predicted in one call, or, when
it is larger than the window, covered by overlapping windows whose softmax outputs are
blended with a Gaussian importance map (Isensee et al., nnU-Net, Nat. Methods 2021; MONAI
``SlidingWindowInferer``):

    P(x) = Σ_w g(x - o_w) · p_w(x - o_w)  /  Σ_w g(x - o_w)

where ``o_w`` is the corner of window ``w`` and ``g`` a separable Gaussian centred in the
window with standard deviation ``gaussian_sigma × window size`` per axis, scaled to a maximum
of 1 and floored at ``1e-3`` (MONAI's floor) so that window edges keep a non-zero weight.
Optional flip test-time augmentation averages ``flip_S(P(flip_S(x)))`` over every subset
``S`` of the chosen spatial axes (8 for all three), which makes the result exactly
flip-symmetric whatever the model: ``TTA(flip_a(x)) = flip_a(TTA(x))``.

Windows are blended on the device by default: every TTA pass and window in one compiled
program (see "Sliding windows blended on the device" below and ``docs/performance.md``);
``blend="host"`` keeps the NumPy blending. The module works on arrays and a Keras model
only — files and run directories are :mod:`tf_explog.inference`'s — so the validation
callbacks use it without importing a later stage. NumPy and Keras; TensorFlow is imported
only on the TensorFlow backend, for ``tf.function``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import keras
import numpy as np
from keras import ops

from tf_explog.errors import InferenceError, InputError
from tf_explog.geometry import (
    background_value,
    pad_end,
    round_up,
    spatial_divisor,
    window_starts,
)
from tf_explog.labels import SEGMENTATION

__all__ = ["predict_volume", "gaussian_importance_map", "sliding_window_weights",
           "window_starts", "model_input", "WEIGHT_FLOOR", "FIXED_POINT_SCALE"]

WEIGHT_FLOOR = 1e-3  # MONAI's minimum importance, so no voxel of a window has weight 0
# accumulate="int16": probabilities in [0, 1] as multiples of 1/30000 (sums stay below the
# int16 maximum 32767 whatever the rounding of up to ~5000 window contributions).
FIXED_POINT_SCALE = 30000.0


# --------------------------------------------------------------------------------------------
# Window geometry
# --------------------------------------------------------------------------------------------


def gaussian_importance_map(
    window: Sequence[int], sigma_scale: float = 0.125, floor: float = WEIGHT_FLOOR
) -> np.ndarray:
    """Separable Gaussian weight of each voxel of a window, maximum 1, floored.

    ``g(i, j, k) = Π_axis exp(-½ ((i - (n - 1)/2) / (sigma_scale · n))²)``, divided by its
    maximum, then ``max(g, floor)``. Centred at ``(n - 1)/2`` so it is flip-symmetric.

    Args:
        window: window shape ``(d, h, w)``.
        sigma_scale: standard deviation as a fraction of the window size (nnU-Net: 1/8).
        floor: minimum weight (MONAI uses 1e-3).

    Returns:
        float32 ``[d, h, w]``.
    """
    if not sigma_scale > 0:
        raise InputError(f"gaussian_sigma: expected a positive number, got {sigma_scale!r}")
    g = np.ones((), dtype=np.float64)
    for n in window:
        i = np.arange(int(n), dtype=np.float64)
        axis = np.exp(-0.5 * ((i - (n - 1) / 2.0) / (sigma_scale * n)) ** 2)
        g = np.multiply.outer(g, axis)
    g /= g.max()
    return np.maximum(g, floor).astype(np.float32)


def _corners(shape: Sequence[int], window: Sequence[int], overlap: float) -> list:
    return list(itertools.product(*(window_starts(s, w, overlap) for s, w in zip(shape, window))))


def sliding_window_weights(
    shape: Sequence[int], window: Sequence[int], overlap: float = 0.5,
    gaussian_sigma: float = 0.125,
) -> np.ndarray:
    """Summed importance weights ``Σ_w g(x - o_w)`` that :func:`predict_volume` divides by.

    Args:
        shape: (padded) volume shape ``(D, H, W)``, each ≥ the window.
        window: window shape.
        overlap: overlap fraction.
        gaussian_sigma: see :func:`gaussian_importance_map`.

    Returns:
        float32 ``[D, H, W]``.
    """
    g = gaussian_importance_map(window, gaussian_sigma)
    total = np.zeros(tuple(shape), np.float32)
    for corner in _corners(shape, window, overlap):
        total[tuple(slice(c, c + w) for c, w in zip(corner, window))] += g
    return total


# --------------------------------------------------------------------------------------------
# predict_volume
# --------------------------------------------------------------------------------------------


def model_input(model) -> tuple:
    """``(fixed spatial dims or None per axis, channels)`` of a single-input 3D model."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise InferenceError(f"model: expected a single input, got {len(shape)} inputs")
        shape = shape[0]
    if isinstance(shape, dict) or len(shape) != 5:
        raise InferenceError(
            f"model: expected one input of shape [batch, D, H, W, C], got {shape!r}"
        )
    return tuple(shape[1:4]), shape[4]


def _triple_int(value, name: str) -> tuple:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value),) * 3
    try:
        out = tuple(int(v) for v in value)
        ok = len(out) == 3 and all(o == v and o > 0 for o, v in zip(out, value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InferenceError(f"{name}: expected a positive int or 3 of them, got {value!r}")
    return out


def _flip_sets(tta) -> list:
    """Every subset of the TTA axes (the identity first)."""
    if tta is False or tta is None:
        return [()]
    axes = (0, 1, 2) if tta is True else tta
    try:
        axes = tuple(int(a) for a in axes)
    except (TypeError, ValueError):
        raise InferenceError(f"tta: expected a bool or spatial axes from (0, 1, 2), got {tta!r}") from None
    if not axes or len(set(axes)) != len(axes) or any(a not in (0, 1, 2) for a in axes):
        raise InferenceError(f"tta: expected a bool or distinct spatial axes from (0, 1, 2), got {tta!r}")
    return [s for r in range(len(axes) + 1) for s in itertools.combinations(sorted(axes), r)]


def _segmentation(out, model) -> np.ndarray:
    """The "segmentation" output of a model call as float32 NumPy."""
    if isinstance(out, Mapping):
        if SEGMENTATION not in out:
            raise InferenceError(f"model: outputs {sorted(out)} include no {SEGMENTATION!r}")
        out = out[SEGMENTATION]
    elif isinstance(out, (list, tuple)):
        names = list(getattr(model, "output_names", None) or [])
        out = out[names.index(SEGMENTATION)] if SEGMENTATION in names else out[0]
    return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)


def _run(model, batch: np.ndarray, predict_fn=None) -> np.ndarray:
    raw = predict_fn(batch) if predict_fn is not None else model.predict_on_batch(batch)
    out = _segmentation(raw, model)
    if out.ndim != 5 or out.shape[:4] != batch.shape[:4]:
        raise InferenceError(
            f"model: expected probabilities [batch, D, H, W, K] for input {batch.shape}, got {out.shape}"
        )
    return out


def _pass_window(shape, window, fixed, divisor) -> tuple:
    """The window one pass uses: the model's fixed size, or never larger than the
    (16-padded) volume (same result, less work)."""
    if fixed:
        return tuple(window)
    return tuple(min(w, round_up(s, divisor)) for w, s in zip(window, shape))


def _predict_once(model, image, window, fixed, overlap, gaussian_sigma, window_batch, divisor,
                  predict_fn=None):
    """One pass without TTA on the host: pad, predict (one call or blended windows), crop."""
    shape = image.shape[:3]
    win = _pass_window(shape, window, fixed, divisor)
    padded = tuple(max(s, w) for s, w in zip(shape, win))
    if padded != shape:
        # The volume's background (its minimum; after z-scoring 0 is the mean tissue
        # value), at the end of each axis, cropped below.
        image = pad_end(image, padded)
    crop = tuple(slice(0, s) for s in shape)
    corners = _corners(padded, win, overlap)
    if len(corners) == 1:
        return _run(model, image[np.newaxis], predict_fn)[0][crop]

    g = gaussian_importance_map(win, gaussian_sigma)
    acc = None
    weights = np.zeros(padded, np.float32)
    for i in range(0, len(corners), window_batch):
        chunk = corners[i:i + window_batch]
        slices = [tuple(slice(c, c + w) for c, w in zip(corner, win)) for corner in chunk]
        batch = np.stack([image[s] for s in slices])
        if len(chunk) < window_batch and i > 0:
            # Keep the batch shape constant (one trace / one XLA program); extra rows are ignored.
            batch = np.concatenate([batch, np.zeros((window_batch - len(chunk),) + batch.shape[1:],
                                                    batch.dtype)])
        out = _run(model, batch, predict_fn)
        if acc is None:
            acc = np.zeros(padded + (out.shape[-1],), np.float32)
        for k, s in enumerate(slices):
            acc[s] += out[k] * g[..., np.newaxis]
            weights[s] += g
    acc /= weights[..., np.newaxis]
    return acc[crop]


def predict_volume(
    model: keras.Model,
    image: np.ndarray,
    *,
    window: Union[None, int, Sequence[int]] = None,
    overlap: float = 0.5,
    gaussian_sigma: float = 0.125,
    tta: Union[bool, Sequence[int]] = False,
    window_batch: int = 1,
    divisor: Optional[int] = None,
    predict_fn=None,
    blend: Optional[str] = None,
    output: str = "probabilities",
    accumulate: str = "float32",
) -> Any:
    """Class probabilities (or labels) of a whole preprocessed volume of any size.

    Without ``window`` (or when the volume fits in one window) the image is padded with its
    background (its minimum per channel) at the end of each axis to a multiple of
    ``divisor``, predicted in one call and cropped back.
    Otherwise windows of size ``window`` overlapping by ``overlap`` are blended with a Gaussian
    importance map (see the module docstring); axes shorter than the window use a window of
    the padded axis length. A model with fixed spatial input dims always gets windows of
    exactly that size.

    Args:
        model: a Keras model with one input ``[batch, D, H, W, C]`` whose output (or whose
            ``"segmentation"`` output, when it returns a dict) is softmax probabilities.
        image: normalised image ``[D, H, W, C]``.
        window: window size (int or 3 ints, multiples of ``divisor``) or None.
        overlap: overlap fraction of neighbouring windows, in ``[0, 1)``.
        gaussian_sigma: Gaussian std as a fraction of the window size (nnU-Net's 1/8).
        tta: False, True (average over the 8 flips of the 3 spatial axes) or a sequence of
            spatial axes whose flip combinations to average over (``(0, 1)``: 4 passes).
        window_batch: windows per model call.
        divisor: spatial sizes the model accepts are multiples of this (default: from the
            model's pooling layers, `tf_explog.geometry.spatial_divisor`).
        predict_fn: how to run a batch (default ``model.predict_on_batch``; e.g.
            ``lambda x: model(x, training=False)`` inside a custom distributed loop); implies
            ``blend="host"``.
        blend: "device" (default without ``predict_fn``): every TTA pass, window and the
            Gaussian blending in one compiled program of the backend, one transfer of the
            result (see ``docs/performance.md``); "host": each window's output copied to
            NumPy and blended there (the reference implementation).
        output: "probabilities" (NumPy float32 ``[D, H, W, K]``), "labels" (NumPy int32
            ``[D, H, W]``, the argmax, taken on the device with ``blend="device"``: a K times
            smaller transfer) or "tensor" (the probabilities as a backend tensor left on the
            device; ``blend="device"`` only).
        accumulate: the dtype of the device's largest buffer, ``D·H·W·K`` (see
            ``docs/performance.md``): "float32" (default), or half the memory for volumes
            that do not fit otherwise: "int16" (fixed point, probabilities × 30000; measured
            within ~2e-4 of float32 without TTA, ~1.3e-3 with 8 flips) or "float16" (within
            ~3e-3 / ~1.4e-2: small late contributions are lost against a sum near 1).
            Labels then differ only where two classes are about that close.

    Returns:
        See ``output``.

    Raises:
        InferenceError (a ValueError): wrong image rank or channel count, bad option values,
            a model whose input or output is not 3D channels-last.
    """
    fixed_dims, channels = model_input(model)
    image = np.asarray(image)
    if image.ndim != 4:
        raise InferenceError(
            f"image: expected [D, H, W, C] (channels last, no batch axis), got shape {image.shape}"
        )
    if channels is not None and image.shape[3] != channels:
        raise InferenceError(
            f"image: has {image.shape[3]} channel(s), the model expects {channels} "
            f"(input shape {model.input_shape})"
        )
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise InferenceError(f"image: expected real numbers, got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise InferenceError("image: contains NaN or Inf values")
    if isinstance(window_batch, bool) or not isinstance(window_batch, (int, np.integer)) or window_batch < 1:
        raise InferenceError(f"window_batch: expected a positive integer, got {window_batch!r}")
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise InferenceError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
    if not (isinstance(gaussian_sigma, (int, float)) and gaussian_sigma > 0):
        raise InferenceError(f"gaussian_sigma: expected a positive number, got {gaussian_sigma!r}")
    flips = _flip_sets(tta)

    if divisor is None:
        divisor = spatial_divisor(model)
    fixed = all(d is not None for d in fixed_dims)
    if any(d is not None for d in fixed_dims) and not fixed:
        raise InferenceError(
            f"model: spatial input dims {fixed_dims} mix fixed and None; expected all fixed or all None"
        )
    if window is not None:
        window = _triple_int(window, "window")
    if fixed:
        if window is not None and window != tuple(fixed_dims):
            raise InferenceError(
                f"window: {window} differs from the model's fixed input size {tuple(fixed_dims)}"
            )
        window = tuple(int(d) for d in fixed_dims)
    elif window is None:
        window = tuple(round_up(s, divisor) for s in image.shape[:3])
    if any(w % divisor for w in window):
        raise InferenceError(f"window: {window} must be multiples of {divisor} (the network's pooling)")

    if blend is None:
        blend = "host" if predict_fn is not None else "device"
    if blend not in ("device", "host"):
        raise InferenceError(f"blend: expected 'device' or 'host', got {blend!r}")
    if output not in ("probabilities", "labels", "tensor"):
        raise InferenceError(f"output: expected 'probabilities', 'labels' or 'tensor', got "
                             f"{output!r}")
    if accumulate not in ("float32", "float16", "int16"):
        raise InferenceError(f"accumulate: expected 'float32', 'float16' or 'int16', got "
                             f"{accumulate!r}")
    if blend == "host" and (output == "tensor" or accumulate != "float32"):
        raise InferenceError(f"blend: 'host' gives NumPy float32 only (output={output!r}, "
                             f"accumulate={accumulate!r} need blend='device')")
    if blend == "device" and predict_fn is not None:
        raise InferenceError("predict_fn: a custom batch function runs on the host; use "
                             "blend='host' with it (or leave predict_fn out)")
    if blend == "device":
        _check_accumulation(image.shape[:3], window, fixed, overlap, flips, divisor, accumulate)
        result = _device_predict(model, image, window, fixed, overlap, gaussian_sigma, flips,
                                 int(window_batch), divisor,
                                 "labels" if output == "labels" else "probabilities", accumulate)
        if output == "tensor":
            return result
        return np.asarray(ops.convert_to_numpy(result),
                          np.int32 if output == "labels" else np.float32)

    total = None
    for axes in flips:
        x = np.flip(image, axes) if axes else image
        p = _predict_once(model, x, window, fixed, overlap, gaussian_sigma, int(window_batch),
                          divisor, predict_fn)
        p = np.flip(p, axes) if axes else p
        # float64 sum: the mean does not depend on the order of the flips (exact TTA symmetry).
        total = p.astype(np.float64) if total is None else total + p
    probs = (total / len(flips)).astype(np.float32)
    return np.argmax(probs, axis=-1).astype(np.int32) if output == "labels" else probs


# --------------------------------------------------------------------------------------------
# Sliding windows blended on the device
# --------------------------------------------------------------------------------------------
#
# The host path above copies every window's K-class output to NumPy and accumulates on the
# CPU; here the whole pass (every flip of the TTA, every window, the Gaussian weighting, the
# crop, the argmax when only labels are wanted) is one compiled function of the backend, and
# only its result crosses to the host.
#
# Frames. TTA pass S predicts ``flip_S(x)`` padded at the end of each axis to the padded
# shape P (the host path's geometry), windows at corners c of that frame. Back in the
# original frame, a flipped axis's padding lies *before* the volume, so the device keeps one
# extended image E covering x ∈ [-o, P) per axis (o = P - s on axes some flip set flips, else
# 0; background value outside the volume). A window at corner c of pass S reads E at
#     r = c + o            (axis not flipped by S)
#     r = P - c - w        (axis flipped by S),
# flipped along S, and its output, flipped back, lands at the same r of the accumulator.
# Each pass's normaliser W = Σ_w g (same padded shape and corners for every pass) is known in
# advance, so each window adds p · g / W[c : c + w]: the sum over windows is that pass's
# blended probabilities, and the sum over passes divided by their number is the TTA mean,
# without a per-pass buffer.


def _backend_compile(fn, generic_shapes: bool = False):
    """One compiled program on the backend: ``tf.function`` / ``jax.jit`` (eager otherwise).

    XLA is not forced on TensorFlow (on the CPU it measured ~10x slower there); the only
    backend-specific lines of the device path. ``generic_shapes`` (TensorFlow): after a
    second input shape, trace once with unknown dimensions for all later ones.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import functools

        import tensorflow as tf  # only reached on the TensorFlow backend

        # One tf.function per plan. Wrapped in a partial because TensorFlow counts
        # retracings per code object and would warn about the plans' shared closure.
        return tf.function(functools.partial(fn), reduce_retracing=generic_shapes)
    if backend == "jax":
        import jax  # only reached on the JAX backend

        return jax.jit(fn)
    return fn


def _select_segmentation(out, model):
    """The "segmentation" output of a (possibly multi-output) model call, as a tensor."""
    if isinstance(out, Mapping):
        if SEGMENTATION not in out:
            raise InferenceError(f"model: outputs {sorted(out)} include no {SEGMENTATION!r}")
        return out[SEGMENTATION]
    if isinstance(out, (list, tuple)):
        names = list(getattr(model, "output_names", None) or [])
        return out[names.index(SEGMENTATION)] if SEGMENTATION in names else out[0]
    return out


def _num_classes(model, batch_shape: tuple) -> int:
    """K of the segmentation output for an input of ``batch_shape``, traced symbolically
    (once per shape: cached on the model)."""
    cache = model.__dict__.setdefault("_tf_explog_num_classes", {})
    if batch_shape not in cache:
        cache[batch_shape] = _trace_num_classes(model, batch_shape)
    return cache[batch_shape]


def _trace_num_classes(model, batch_shape: tuple) -> int:
    spec = _select_segmentation(model.compute_output_spec(
        keras.KerasTensor(batch_shape, dtype="float32")), model)
    shape = tuple(spec.shape)
    if len(shape) != 5 or tuple(shape[:4]) != tuple(batch_shape[:4]) or shape[4] is None:
        raise InferenceError(
            f"model: expected probabilities [batch, D, H, W, K] for input {batch_shape}, "
            f"got {shape}")
    return int(shape[4])


def _flip_where(x, flags, axes):
    """``x`` flipped along each of ``axes`` whose flag (a traced int) is non-zero."""
    for a in axes:
        x = ops.where(flags[a] > 0, ops.flip(x, axis=a), x)
    return x


@dataclass(frozen=True)
class _Plan:
    """The static geometry of one device pass (one compiled program per plan).

    ``shape``, ``padded`` and ``offset`` are None on TensorFlow, whose program takes them as
    tensors and so serves volumes of every shape (JAX compiles per shape anyway).
    """

    shape: Optional[tuple]  # volume (s)
    window: tuple  # w
    padded: Optional[tuple]  # P
    offset: Optional[tuple]  # o (E frame)
    flip_axes: tuple  # axes some TTA pass flips
    window_batch: int
    gaussian_sigma: float
    channels: int
    classes: int
    output: str  # "probabilities" | "labels"
    accumulate: str  # "float32" | "float16" | "int16"


def _device_items(plan: _Plan, padded: tuple, offset: tuple, corners: list,
                  flips: list) -> tuple:
    """Per-window arrays ``[steps, window_batch, ...]``: E read starts, corners in the padded
    frame, flip flags and validity (0 for the rows that pad the last batch)."""
    reads, cs, fl, valid = [], [], [], []
    for axes in flips:
        flag = [1 if a in axes else 0 for a in range(3)]
        for c in corners:
            reads.append([p - ci - w if f else ci + o for ci, w, p, o, f in
                          zip(c, plan.window, padded, offset, flag)])
            cs.append(list(c))
            fl.append(flag)
            valid.append(1.0)
    b = plan.window_batch
    extra = -len(reads) % b
    # Padding rows repeat the first window with weight 0: static shapes, no effect.
    reads += [reads[0]] * extra
    cs += [cs[0]] * extra
    fl += [fl[0]] * extra
    valid += [0.0] * extra
    steps = len(reads) // b
    return (np.asarray(reads, np.int32).reshape(steps, b, 3),
            np.asarray(cs, np.int32).reshape(steps, b, 3),
            np.asarray(fl, np.int32).reshape(steps, b, 3),
            np.asarray(valid, np.float32).reshape(steps, b))


def _device_program(model, plan: _Plan):
    """The compiled ``(weights, E, W, items) -> result`` of ``plan``, cached on the model."""
    cache = model.__dict__.setdefault("_tf_explog_sliding_window", {})
    if plan in cache:
        return cache[plan]
    g = gaussian_importance_map(plan.window, plan.gaussian_sigma)
    win, b, k = plan.window, plan.window_batch, plan.classes
    acc_dtype = plan.accumulate
    passes = float(2 ** len(plan.flip_axes))  # every subset of the flipped axes

    def run(trainable, non_trainable, extended, weights, reads, corners, flags, valid, crop):
        zero = ops.zeros((1,), "int32")
        size = ops.shape(extended)  # static on JAX, partly dynamic on TensorFlow
        acc = ops.zeros((size[0], size[1], size[2], k), acc_dtype)
        gauss = ops.convert_to_tensor(g)

        def body(i, acc):
            windows = []
            for j in range(b):
                start = ops.concatenate([reads[i, j], zero])
                x = ops.slice(extended, start, win + (plan.channels,))
                windows.append(_flip_where(x, flags[i, j], plan.flip_axes))
            out, _ = model.stateless_call(trainable, non_trainable, ops.stack(windows),
                                          training=False)
            out = ops.cast(_select_segmentation(out, model), "float32")
            for j in range(b):
                # Divided by the passes here, not at the end: the sum stays in [0, 1], the
                # range the half-memory accumulators (int16 fixed point, float16) are sized for.
                norm = gauss / ops.slice(weights, corners[i, j], win) * (valid[i, j] / passes)
                part = _flip_where(out[j] * norm[..., None], flags[i, j], plan.flip_axes)
                start = ops.concatenate([reads[i, j], zero])
                current = ops.slice(acc, start, win + (k,))
                if acc_dtype == "int16":
                    part = ops.round(part * FIXED_POINT_SCALE)
                acc = ops.slice_update(acc, start, current + ops.cast(part, acc_dtype))
            return acc

        acc = ops.fori_loop(0, ops.shape(reads)[0], body, acc)
        if plan.shape is not None:  # static crop (JAX)
            cropped = acc[tuple(slice(o, o + s) for o, s in zip(plan.offset, plan.shape))]
        else:  # crop = [offset (3), volume shape (3)] as a tensor
            cropped = ops.slice(acc, ops.concatenate([crop[:3], zero]),
                                ops.concatenate([crop[3:], ops.convert_to_tensor([k])]))
        probs = ops.cast(cropped, "float32")
        if acc_dtype == "int16":
            probs = probs / FIXED_POINT_SCALE
        if plan.output == "labels":
            return ops.cast(ops.argmax(probs, axis=-1), "int32")
        return probs

    cache[plan] = _backend_compile(run, generic_shapes=plan.shape is None)
    return cache[plan]


def _check_accumulation(shape, window, fixed, overlap, flips, divisor, accumulate) -> None:
    """Refuses "int16" where a voxel could receive so many window contributions that their
    rounding could overflow the fixed point (more than ~5000: extreme overlaps with TTA)."""
    if accumulate != "int16":
        return
    win = _pass_window(shape, window, fixed, divisor)
    coverage = len(flips)
    for s, w in zip(shape, win):
        size = max(s, w)
        counts = np.zeros(size, np.int64)
        for start in window_starts(size, w, overlap):
            counts[start:start + w] += 1
        coverage *= int(counts.max())
    limit = int(2 * (32767 - FIXED_POINT_SCALE))
    if coverage > limit:
        raise InferenceError(
            f"accumulate: 'int16' cannot sum the {coverage} window contributions a voxel "
            f"receives here (overlap {overlap}, {len(flips)} TTA passes; at most {limit}); "
            "use a lower overlap, 'float16' or 'float32'")


def _device_predict(model, image: np.ndarray, window, fixed, overlap, gaussian_sigma, flips,
                    window_batch, divisor, output, accumulate):
    """Every TTA pass and window of ``image`` in one compiled call; a backend tensor."""
    shape = tuple(image.shape[:3])
    win = _pass_window(shape, window, fixed, divisor)
    padded = tuple(max(s, w) for s, w in zip(shape, win))
    flip_axes = tuple(sorted({a for axes in flips for a in axes}))
    offset = tuple(p - s if a in flip_axes else 0 for a, (p, s) in enumerate(zip(padded, shape)))
    channels = int(image.shape[3])
    classes = _num_classes(model, (int(window_batch),) + win + (channels,))
    # TensorFlow: one program for every volume shape (geometry as tensors); a new volume
    # shape would otherwise cost a new trace (~9 s for the paper network on the CPU).
    static = keras.backend.backend() != "tensorflow"
    plan = _Plan(shape if static else None, win, padded if static else None,
                 offset if static else None, flip_axes, int(window_batch),
                 float(gaussian_sigma), channels, classes, output, accumulate)
    corners = _corners(padded, win, overlap)
    if len(corners) * len(flips) < plan.window_batch:
        # Fewer windows than a batch: a smaller batch, not rows of zeros.
        plan = dataclasses.replace(plan, window_batch=len(corners) * len(flips))
    reads, cs, fl, valid = _device_items(plan, padded, offset, corners, flips)
    extended_shape = tuple(p + o for p, o in zip(padded, offset))
    extended = np.empty(extended_shape + (channels,), np.float32)
    extended[...] = background_value(image)
    extended[tuple(slice(o, o + s) for o, s in zip(offset, shape))] = image
    weights = sliding_window_weights(padded, win, overlap, gaussian_sigma)
    program = _device_program(model, plan)
    return program([ops.convert_to_tensor(v.value) for v in model.trainable_variables],
                   [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables],
                   extended, weights, reads, cs, fl, valid,
                   np.asarray(offset + shape, np.int32))
