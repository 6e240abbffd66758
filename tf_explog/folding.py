"""BatchNorm folded into the convolutions before it, for inference and export.

In inference mode a BatchNormalization after a convolution is an affine map per output
channel, so the pair is one convolution (Ioffe & Szegedy 2015, Sec. 3.1; the standard
"fold"): with ``s = γ / sqrt(σ² + ε)``

    W' = W · s      (per output channel)
    b' = (b − μ) · s + β

where μ, σ² are the BN's moving (population) statistics. Every `tf_explog.layers.Block`
of the paper's network is ``Conv3D → BN → ReLU``, so folding removes all 30 BatchNorm
layers' work from a forward pass and gives the same outputs up to float rounding.
The folded model is for inference (``predict``, export): it has no BatchNorm to train or
recalibrate. ``keras.ops``/NumPy only.
"""

from __future__ import annotations

import keras
import numpy as np

from tf_explog.layers import Block

__all__ = ["fold_batchnorm", "folded_conv_weights", "is_folded"]


def folded_conv_weights(kernel, bias, gamma, beta, mean, variance, epsilon: float) -> tuple:
    """``(kernel', bias')`` of a Conv (kernel ``[..., in, out]``, bias ``[out]`` or None)
    followed by a BN in inference mode, computed in float64."""
    kernel = np.asarray(kernel, np.float64)
    out = kernel.shape[-1]
    bias = np.zeros(out) if bias is None else np.asarray(bias, np.float64)
    gamma = np.ones(out) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(out) if beta is None else np.asarray(beta, np.float64)
    scale = gamma / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    return kernel * scale, (bias - np.asarray(mean, np.float64)) * scale + beta


def _bn_parts(norm) -> tuple:
    return (None if norm.gamma is None else keras.ops.convert_to_numpy(norm.gamma),
            None if norm.beta is None else keras.ops.convert_to_numpy(norm.beta),
            keras.ops.convert_to_numpy(norm.moving_mean),
            keras.ops.convert_to_numpy(norm.moving_variance), float(norm.epsilon))


def _fold_pair(conv, norm, target) -> None:
    kernel = keras.ops.convert_to_numpy(conv.kernel)
    bias = keras.ops.convert_to_numpy(conv.bias) if conv.use_bias else None
    k, b = folded_conv_weights(kernel, bias, *_bn_parts(norm))
    target.kernel.assign(k.astype(kernel.dtype))
    target.bias.assign(b.astype(kernel.dtype))


def is_folded(model: keras.Model) -> bool:
    """Whether every `Block` of ``model`` is already folded (True when it has none)."""
    return all(layer.folded for layer in model.layers if isinstance(layer, Block))


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """A new functional model where every `Block`'s ``Conv3D → BN`` pairs are folded.

    Same inputs, outputs, names and dtype policies; inference-mode outputs equal the
    original's up to float rounding (``tests/test_folding.py``). Models without `Block`
    layers, or already folded, are returned as they are.

    Args:
        model: a functional model from `tf_explog.models.build_model` (trained or not).

    Returns:
        The folded model (the input model is left unchanged).
    """
    blocks = [layer for layer in model.layers if isinstance(layer, Block) and not layer.folded]
    if not blocks:
        return model
    config = model.get_config()
    names = {b.name for b in blocks}
    for layer_config in config["layers"]:
        if layer_config["config"].get("name") in names:
            layer_config["config"]["folded"] = True
    folded = model.__class__.from_config(config)
    for layer in model.layers:
        target = folded.get_layer(layer.name)
        if layer.name not in names:
            target.set_weights(layer.get_weights())
            continue
        for conv, norm, new in zip(layer.convs, layer.norms, target.convs):
            _fold_pair(conv, norm, new)
        _fold_pair(layer.shortcut_conv, layer.shortcut_norm, target.shortcut_conv)
    return folded
