"""Volume geometry shared by the data path, the network, inference and export.

One home for the facts every stage needs about shapes:

- the size divisor: the paper network halves the resolution ``POOLINGS = 4`` times, so
  spatial sizes are multiples of ``DIVISOR = 16`` (``16 f`` when the network average-pools
  its input by ``f``: :func:`network_divisor`); a built model's divisor is read back from
  its layers by :func:`spatial_divisor`;
- padding at the end of each axis with the background intensity (:func:`pad_end`,
  :func:`pad_to_multiple`, :func:`background_value`), as inference pads a volume;
- the start offsets of overlapping sliding windows (:func:`window_starts`, nnU-Net's rule).

NumPy only (Keras is imported by :func:`spatial_divisor` alone, when it is called), so the
data layer can use it without importing a later stage.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tf_explog.errors import InputError

__all__ = ["POOLINGS", "DIVISOR", "network_divisor", "round_up", "spatial_divisor",
           "background_value", "pad_end", "pad_to_multiple", "window_starts"]

#: Poolings of the paper network (five resolution levels).
POOLINGS = 4
#: Spatial sizes the paper network accepts are multiples of this.
DIVISOR = 2 ** POOLINGS


def network_divisor(input_downsample: int = 1, poolings: int = POOLINGS) -> int:
    """The multiple a spatial input size must be: ``2 ** poolings × input_downsample``."""
    return (2 ** int(poolings)) * int(input_downsample)


def round_up(size: int, divisor: int) -> int:
    """The smallest multiple of ``divisor`` that is ``>= size``."""
    return -(-int(size) // int(divisor)) * int(divisor)


def spatial_divisor(model) -> int:
    """The multiple every spatial input size of ``model`` must be: the product of the
    strides of its pooling (and strided convolution) layers along the first axis — 16 for
    the paper's network, 32 with ``input_downsample=2``."""
    from keras import Model, layers

    factor = 1
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, Model):  # a nested model: look inside
            stack.extend(layer.layers)
        elif isinstance(layer, (layers.MaxPooling3D, layers.AveragePooling3D, layers.Conv3D)):
            factor *= int(layer.strides[0])
    return max(factor, 1)


def background_value(image: np.ndarray) -> np.ndarray:
    """The background intensity of a preprocessed ``[D, H, W, C]`` image: its minimum per
    channel (z-scoring maps the scan's background far below 0, the mean tissue value)."""
    return np.asarray(image).reshape(-1, image.shape[-1]).min(axis=0)


def pad_end(image: np.ndarray, shape: Sequence[int], value=None) -> np.ndarray:
    """Pads ``[D, H, W, C]`` at the end of each spatial axis up to ``shape`` with ``value``
    (default :func:`background_value`; one number, or one per channel)."""
    shape = tuple(int(s) for s in shape)
    if tuple(image.shape[:3]) == shape:
        return image
    out = np.empty(shape + image.shape[3:], image.dtype)
    out[...] = background_value(image) if value is None else np.asarray(value, image.dtype)
    out[tuple(slice(0, s) for s in image.shape[:3])] = image
    return out


def pad_to_multiple(image: np.ndarray, divisor: int = DIVISOR, value=None) -> np.ndarray:
    """Pads ``[D, H, W, C]`` at the end of each spatial axis to a multiple of ``divisor``
    with the background (what :func:`tf_explog.inference.predict_volume` does)."""
    return pad_end(image, [round_up(s, divisor) for s in image.shape[:3]], value)


def window_starts(size: int, window: int, overlap: float) -> list:
    """Start offsets of windows covering ``[0, size)`` along one axis, evenly spread.

    As in nnU-Net: ``n = ceil((size - window) / (window · (1 - overlap))) + 1`` windows, the
    first at 0, the last at ``size - window``, the others evenly spaced between (rounded).

    Args:
        size: axis length (≥ ``window``).
        window: window length along the axis.
        overlap: target overlap fraction between neighbours, in ``[0, 1)``.

    Returns:
        Sorted list of start offsets.
    """
    if window > size:
        raise InputError(f"window: {window} is larger than the axis size {size}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
    if size == window:
        return [0]
    step = window * (1.0 - overlap)
    n = int(math.ceil((size - window) / step)) + 1
    actual = (size - window) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]
