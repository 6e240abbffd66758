"""Building blocks of the paper's network (Wong et al., MICCAI 2018, Fig. 1).

``Block(n, k)``: k × [Conv3D 3×3×3 → BatchNorm → ReLU] on the main path, added to a
[Conv3D 1×1×1 → BatchNorm → ReLU] shortcut taken from the block input. Written with
``keras.ops`` only, so it runs (and ``import tf_explog.layers`` works) without TensorFlow.

``RandomAffine3D`` is re-exported lazily from :mod:`tf_explog.augmentation` when that module
exists, so importing this module never pulls it (or TensorFlow) in.
"""

from __future__ import annotations

import importlib
from numbers import Integral
from typing import Any

import keras
from keras import layers, ops
from tf_explog.errors import InputError
from tf_explog.geometry import DIVISOR

__all__ = ["Block", "SpatialSizeCheck"]


def _positive_int(value: Any, what: str) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"Block: {what} must be a positive integer, got {value!r}")
    return int(value)


@keras.saving.register_keras_serializable(package="tf_explog")
class Block(layers.Layer):
    """Residual convolution block ``Block(n, k)`` of Wong et al. (2018), Fig. 1.

    ``out = main(x) + shortcut(x)`` with
    ``main = k × [Conv3D(n, 3³, "same") → BN → ReLU]`` and
    ``shortcut = Conv3D(n, 1³) → BN → ReLU``. There is no activation after the sum
    (as drawn in the figure). Parameters for ``c`` input channels, biases on:
    ``(c + 1)·n + 4n`` (shortcut) ``+ (27c + 1)·n + 4n + (k − 1)·((27n + 1)·n + 4n)``
    (BatchNorm holds 4 values per channel: γ, β, moving mean, moving variance).

    Args:
        filters: number of output channels ``n``.
        depth: number of 3×3×3 conv-BN-ReLU layers ``k`` on the main path.
        kernel_size: main-path kernel size (the paper uses 3).
        use_bias: conv biases (on in the paper's parameter count, although BN makes them
            redundant).
        kernel_initializer: initializer of every conv kernel (not given by the paper).
        bn_momentum: BatchNormalization moving-average momentum (not given by the paper).
        bn_epsilon: BatchNormalization epsilon.
        folded: inference form without BatchNorm layers: every ``Conv3D → BN`` pair is one
            ``Conv3D`` with bias whose kernel and bias absorb the BN's population statistics
            (:func:`tf_explog.folding.fold_batchnorm` builds it from a trained model; the
            same outputs in inference mode, fewer operations). Not the paper's trainable
            network.
        **kwargs: standard Layer arguments (``name``, ``dtype``, ...).

    Input: ``[B, D, H, W, C]``. Output: ``[B, D, H, W, filters]``.
    """

    def __init__(
        self,
        filters: int,
        depth: int,
        kernel_size: int = 3,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        folded: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = _positive_int(filters, "filters")
        self.depth = _positive_int(depth, "depth")
        self.kernel_size = _positive_int(kernel_size, "kernel_size")
        if not 0.0 <= float(bn_momentum) < 1.0:
            raise InputError(f"Block: bn_momentum must be in [0, 1), got {bn_momentum!r}")
        if not float(bn_epsilon) > 0.0:
            raise InputError(f"Block: bn_epsilon must be > 0, got {bn_epsilon!r}")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.folded = bool(folded)

        # Sublayers take the block's dtype policy, so an explicit dtype= reaches them too.
        common = dict(dtype=self.dtype_policy)
        conv = dict(
            padding="same",
            use_bias=self.use_bias or self.folded,  # a folded BN's shift becomes the bias
            kernel_initializer=self.kernel_initializer,
            **common,
        )
        norm = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon, **common)
        self.convs = [
            layers.Conv3D(self.filters, self.kernel_size, name=f"conv_{i + 1}", **conv)
            for i in range(self.depth)
        ]
        self.norms = [
            None if self.folded else layers.BatchNormalization(name=f"bn_{i + 1}", **norm)
            for i in range(self.depth)
        ]
        self.shortcut_conv = layers.Conv3D(self.filters, 1, name="shortcut_conv", **conv)
        self.shortcut_norm = (None if self.folded
                              else layers.BatchNormalization(name="shortcut_bn", **norm))

    def build(self, input_shape: tuple) -> None:
        """Create the sublayers' weights for an input of shape ``[B, D, H, W, C]``."""
        if len(input_shape) != 5 or input_shape[-1] is None:
            raise InputError(
                f"Block {self.name!r}: expected input shape [B, D, H, W, C] with a known "
                f"channel count, got {tuple(input_shape)!r}"
            )
        shape = tuple(input_shape)
        for conv, norm in zip(self.convs, self.norms):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            if norm is not None:
                norm.build(shape)
        self.shortcut_conv.build(tuple(input_shape))
        if self.shortcut_norm is not None:
            self.shortcut_norm.build(
                self.shortcut_conv.compute_output_shape(tuple(input_shape)))

    def call(self, inputs, training=None):
        x = inputs
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = ops.relu(x if norm is None else norm(x, training=training))
        shortcut = self.shortcut_conv(inputs)
        if self.shortcut_norm is not None:
            shortcut = self.shortcut_norm(shortcut, training=training)
        return ops.add(x, ops.relu(shortcut))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*tuple(input_shape)[:-1], self.filters)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            depth=self.depth,
            kernel_size=self.kernel_size,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        if self.folded:  # absent from unfolded configs: models saved before still load
            config["folded"] = True
        return config


def __getattr__(name: str):
    # Lazy: the augmentation module is written separately and may import TensorFlow-free
    # code that is heavier than this module needs; only load it when asked for.
    if name == "RandomAffine3D":
        try:
            module = importlib.import_module("tf_explog.augmentation")
        except ModuleNotFoundError as err:
            if err.name != "tf_explog.augmentation":
                raise
            raise AttributeError(
                "tf_explog.layers.RandomAffine3D needs tf_explog/augmentation.py, "
                "which is not present in this installation"
            ) from err
        return module.RandomAffine3D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@keras.saving.register_keras_serializable(package="tf_explog")
class SpatialSizeCheck(layers.Layer):
    """Identity that refuses spatial sizes the network cannot take, with a clear message.

    The paper's network halves the resolution 4 times, so each spatial size must be a
    multiple of 16; otherwise a concatenation deep inside fails with a shape error that
    names no input. Checked on the static shape (known in eager calls, ``predict`` on arrays
    and under ``jax.jit``; a symbolic ``None`` passes). ``tf_explog.inference.predict_volume``
    and the exported SavedModel pad for you.

    Args:
        divisor: the multiple each spatial size must be.
    """

    def __init__(self, divisor: int = DIVISOR, **kwargs) -> None:
        super().__init__(**kwargs)
        self.divisor = _positive_int(divisor, "divisor")

    def call(self, inputs):
        shape = tuple(inputs.shape)
        bad = [f"{s} (axis {axis})" for axis, s in enumerate(shape[1:-1], start=1)
               if s is not None and int(s) % self.divisor]
        if bad:
            raise InputError(
                f"{self.name}: input spatial size(s) {', '.join(bad)} of shape {shape} are "
                f"not multiples of {self.divisor}; pad the volume (e.g. "
                "tf_explog.geometry.pad_to_multiple, or predict with "
                "tf_explog.inference.predict_volume, which pads and crops back)")
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "divisor": self.divisor}



def _upsample_linear_3d(x, factor: int):
    """``[B, D, H, W, C]`` upsampled ``factor`` times by linear interpolation between voxel
    centres, as two 2-D bilinear resizes (H, W, then D) — one fused kernel each, about 8×
    faster on a CPU than slicing and interleaving the axes one by one.

    Output voxel ``j`` samples the input at ``(j + 1/2) / factor − 1/2`` (half-pixel centres,
    both grids covering the same extent, as in `tf_explog.data.preprocess`), with the edge
    voxel repeated beyond the ends; for factor 2, ``out[2i] = 3/4 x[i] + 1/4 x[i−1]``.
    """
    shape = ops.shape(x)
    b, d, h, w, c = (shape[i] for i in range(5))
    y = ops.reshape(x, (b * d, h, w, c))
    y = ops.image.resize(y, (h * factor, w * factor), interpolation="bilinear",
                         antialias=False, data_format="channels_last")
    y = ops.reshape(y, (b, d, h * factor * w * factor, c))
    y = ops.image.resize(y, (d * factor, h * factor * w * factor), interpolation="bilinear",
                         antialias=False, data_format="channels_last")
    return ops.reshape(y, (b, d * factor, h * factor, w * factor, c))


@keras.saving.register_keras_serializable(package="tf_explog")
class LinearUpsampling3D(layers.Layer):
    """Trilinear upsampling of ``[B, D, H, W, C]`` by a power of 2 (Keras' ``UpSampling3D``
    only repeats voxels).

    Voxel-centre aligned (see `_upsample_linear_3d`): the inverse of
    ``AveragePooling3D(factor)`` for smooth inputs, which is how a network working at a
    coarser grid (`tf_explog.models.build_model`'s ``input_downsample``) returns logits on
    the input's grid, with partial-volume boundaries instead of blocks.

    Args:
        factor: 2, 4, 8, ….
    """

    def __init__(self, factor: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        factor = _positive_int(factor, "factor")
        if factor & (factor - 1):
            raise InputError(f"LinearUpsampling3D: factor must be a power of 2, got {factor}")
        self.factor = factor

    def call(self, inputs):
        return _upsample_linear_3d(inputs, self.factor)

    def compute_output_shape(self, input_shape):
        return tuple([input_shape[0]]
                     + [None if s is None else s * self.factor for s in input_shape[1:4]]
                     + [input_shape[4]])

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor}
