"""The paper's 3D segmentation network (Wong et al., MICCAI 2018, Fig. 1).

A U-Net of residual ``Block`` s (see :mod:`tf_explog.layers`) with a fused deep-supervision
head, plus optional auxiliary supervised outputs at coarser resolutions. Keras functional
API and ``keras.ops`` only: importing this module does not import TensorFlow.

With the defaults (1 input channel, 20 labels) the network has 4,994,036 parameters,
BatchNorm moving statistics included.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Sequence

import keras
import numpy as np
from keras import layers

from tf_explog.errors import InputError
from tf_explog.geometry import network_divisor, spatial_divisor
from tf_explog.labels import SEGMENTATION, aux_name
from tf_explog.layers import Block, LinearUpsampling3D, SpatialSizeCheck

__all__ = ["MODELS", "build_model", "aux_loss_weights", "output_names", "spatial_divisor",
           "non_finite_weights", "SEGMENTATION", "aux_name"]


def _int_tuple(value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    """Validate a sequence of positive ints (optionally of a given length)."""
    try:
        items = tuple(value)
    except TypeError:
        raise InputError(f"build_model: {what} must be a sequence of positive integers, "
                         f"got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in items):
        raise InputError(f"build_model: {what} must contain positive integers, got {value!r}")
    if length is not None and len(items) != length:
        raise InputError(f"build_model: {what} must have {length} entries, got {value!r}")
    return tuple(int(v) for v in items)


def _check_input_shape(input_shape: Any, divisor: int) -> tuple:
    """Validate ``(D, H, W, C)``: known C, spatial sizes None or multiples of ``divisor``."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 4:
        raise InputError(
            f"build_model: input_shape={input_shape!r} must be (D, H, W, C) "
            "(channels last, no batch axis)"
        )
    channels = shape[-1]
    if isinstance(channels, bool) or not isinstance(channels, Integral) or channels < 1:
        raise InputError(
            f"build_model: input_shape={input_shape!r}: the channel count (last entry) must "
            "be a positive integer"
        )
    for axis, size in enumerate(shape[:3]):
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, Integral) or size < 1:
            raise InputError(
                f"build_model: input_shape={input_shape!r}: spatial size on axis {axis} must "
                f"be a positive integer or None, got {size!r}"
            )
        if size % divisor:
            raise InputError(
                f"build_model: input_shape={input_shape!r}: spatial size {size} on axis "
                f"{axis} is not divisible by {divisor} (the network halves the resolution "
                f"{divisor.bit_length() - 1} times); pad or crop to a multiple of {divisor}"
            )
    return tuple(None if v is None else int(v) for v in shape)


def _n_aux(aux_outputs: Any, max_aux: int) -> int:
    """Number of auxiliary heads requested by ``aux_outputs`` (False/True/int)."""
    if isinstance(aux_outputs, bool):
        return max_aux if aux_outputs else 0
    if isinstance(aux_outputs, int) and 0 <= aux_outputs <= max_aux:
        return int(aux_outputs)
    raise InputError(
        f"build_model: aux_outputs must be False, True or an int in [0, {max_aux}] "
        f"(one head per decoder level coarser than full resolution), got {aux_outputs!r}"
    )


def build_model(
    input_shape: Sequence[int | None] = (None, None, None, 1),
    num_classes: int = 20,
    filters: Sequence[int] = (12, 24, 48, 96, 192),
    encoder_depths: Sequence[int] = (1, 2, 3, 3, 3),
    decoder_depths: Sequence[int] = (3, 3, 2, 1),
    noise_std: float = 1.0,
    dropout: float = 0.5,
    aux_outputs: bool | int = False,
    name: str = "explog_unet",
    seed: int | None = None,
    bn_momentum: float = 0.99,
    input_downsample: int = 1,
) -> keras.Model:
    """Build the network of Wong et al. (2018), Fig. 1.

    Encoder: ``GaussianNoise(noise_std)`` → Block(12,1) → MaxPool → Block(24,2) → MaxPool →
    Block(48,3) → MaxPool → Block(96,3) → MaxPool → ``Dropout(dropout)`` → Block(192,3).
    Decoder, at each level: UpSampling 2³ → concatenate with the same-level encoder output →
    Block(96,3), Block(48,3), Block(24,2), Block(12,1). Deep supervision: the decoder outputs
    (96, 48, 24, 12 channels) are progressively upsampled and concatenated (180 channels at
    full resolution) → Conv3D 1³ → softmax, the output ``"segmentation"``.

    Auxiliary heads (Conv3D 1³ → softmax) on the decoder outputs at 1/2, 1/4, 1/8 resolution
    are the outputs ``"aux_1"``, ``"aux_2"``, ``"aux_3"``; their losses compare them with the
    full-resolution labels averaged over 2³, 4³, 8³ blocks (soft targets that keep each
    structure's volume, ``tf_explog.losses.deep_supervision_losses``). All softmax outputs are
    float32 whatever the dtype policy; the pre-softmax convs are named ``"<output>_logits"``.
    A first layer refuses spatial sizes that are not multiples of 16 with a clear message.

    With ``input_downsample = f > 1`` (beyond the paper) the network works at ``1/f`` of the
    input's resolution: the image is average-pooled by ``f`` first, and the fused logits are
    brought back to the input's grid by trilinear upsampling (`LinearUpsampling3D`) before
    the softmax. The loss then sees the labels at their own resolution, so a structure a few
    coarse voxels thick is learnt with partial-volume boundaries (a 1 mm optic chiasm of
    ~200 voxels from a 2 mm network) at the compute of the coarse grid; ``aux_k`` is then at
    ``1 / (f · 2**k)`` of the input. Spatial sizes must be multiples of ``16 f``.

    Args:
        input_shape: ``(D, H, W, C)``; spatial sizes None or multiples of
            ``2 ** (len(filters) - 1)`` (16 by default); any channel count.
        num_classes: number of labels, background included (≥ 2).
        filters: channels per level, finest first; the last is the bottleneck.
        encoder_depths: conv layers per encoder Block, finest first.
        decoder_depths: conv layers per decoder Block, coarsest first (as the decoder runs).
        noise_std: std of the input GaussianNoise (training only); 0 disables it.
        dropout: dropout rate before the bottleneck Block (training only); 0 disables it.
        aux_outputs: False (paper-exact: the fused head only), True (all
            ``len(filters) - 2`` auxiliary heads) or their number (finest first).
        name: model name.
        seed: seed of the noise and dropout layers (None: Keras' global seeding).
        bn_momentum: BatchNormalization moving-average momentum (not given by the paper;
            Keras' 0.99 by default, lower settles faster when epochs have few steps).
        input_downsample: 1 (the paper), 2 or 4: the factor the network's grid is coarser
            than the input's (see above).

    Returns:
        A functional ``keras.Model``. Without auxiliary heads its single output is named
        ``"segmentation"``; with them it returns a dict ``{"segmentation": ..., "aux_1": ...}``.

    Raises:
        ValueError: on a malformed argument, naming it and what is expected.
    """
    filters = _int_tuple(filters, "filters")
    levels = len(filters)
    if levels < 2:
        raise InputError(f"build_model: filters needs at least 2 levels, got {filters!r}")
    encoder_depths = _int_tuple(encoder_depths, "encoder_depths", levels)
    decoder_depths = _int_tuple(decoder_depths, "decoder_depths", levels - 1)
    if input_downsample not in (1, 2, 4) or isinstance(input_downsample, bool):
        raise InputError(f"build_model: input_downsample must be 1, 2 or 4, got "
                         f"{input_downsample!r}")
    divisor = network_divisor(input_downsample, poolings=levels - 1)
    input_shape = _check_input_shape(input_shape, divisor)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"build_model: num_classes must be an integer >= 2, got {num_classes!r}")
    if not float(noise_std) >= 0.0:
        raise InputError(f"build_model: noise_std must be >= 0, got {noise_std!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise InputError(f"build_model: dropout must be in [0, 1), got {dropout!r}")
    n_aux = _n_aux(aux_outputs, levels - 2)

    inputs = keras.Input(shape=input_shape, name="image")
    x = SpatialSizeCheck(divisor, name="size_check")(inputs)
    if input_downsample > 1:
        x = layers.AveragePooling3D(input_downsample, name="input_downsample")(x)
    if noise_std > 0:
        x = layers.GaussianNoise(float(noise_std), seed=seed, name="input_noise")(x)

    # Encoder. Level l (1-based) works at 1 / 2**(l-1) resolution.
    skips = []
    for level in range(1, levels + 1):
        if level > 1:
            x = layers.MaxPooling3D(2, name=f"pool_{level - 1}")(x)
        if level == levels and dropout > 0:
            x = layers.Dropout(float(dropout), seed=seed, name="bottleneck_dropout")(x)
        x = Block(filters[level - 1], encoder_depths[level - 1], bn_momentum=bn_momentum,
                  name=f"enc_block_{level}")(x)
        skips.append(x)

    # Decoder, coarsest first; keep each level's output for the supervision heads.
    decoder_outputs = {}
    for i, level in enumerate(range(levels - 1, 0, -1)):
        x = layers.UpSampling3D(2, name=f"up_{level}")(x)
        # Figure 1 draws the copied encoder features first, then the upsampled ones.
        x = layers.Concatenate(axis=-1, name=f"concat_{level}")([skips[level - 1], x])
        x = Block(filters[level - 1], decoder_depths[i], bn_momentum=bn_momentum,
                  name=f"dec_block_{level}")(x)
        decoder_outputs[level] = x

    # Fused deep supervision: upsample the coarser stack and concatenate, level by level.
    fused = decoder_outputs[levels - 1]
    for level in range(levels - 2, 0, -1):
        fused = layers.UpSampling3D(2, name=f"ds_up_{level}")(fused)
        fused = layers.Concatenate(axis=-1, name=f"ds_concat_{level}")(
            [decoder_outputs[level], fused]
        )
    outputs = {SEGMENTATION: _head(fused, num_classes, SEGMENTATION, input_downsample)}

    # Auxiliary heads: aux_k sits on the decoder output at level k + 1 (1 / 2**k resolution).
    for k in range(1, n_aux + 1):
        outputs[aux_name(k)] = _head(decoder_outputs[k + 1], num_classes, aux_name(k))

    if n_aux == 0:
        return keras.Model(inputs, outputs[SEGMENTATION], name=name)
    return keras.Model(inputs, outputs, name=name)


def _head(x, num_classes: int, name: str, upsample: int = 1):
    """Conv3D 1³ to ``num_classes`` logits (trilinearly upsampled by ``upsample``), then a
    float32 softmax named ``name``."""
    logits = layers.Conv3D(num_classes, 1, name=f"{name}_logits")(x)
    if upsample > 1:
        logits = LinearUpsampling3D(upsample, name=f"{name}_upsample")(logits)
    # float32 softmax: under mixed precision the loss needs full-precision probabilities.
    return layers.Activation("softmax", dtype="float32", name=name)(logits)


def aux_loss_weights(n_aux: int, decay: float = 0.5) -> dict[str, float]:
    """Loss weights for ``"segmentation"`` and ``n_aux`` auxiliary outputs.

    Weight ``decay**k`` for ``aux_k`` (1 for the full-resolution output), normalised to sum
    to 1: ``aux_loss_weights(3) == {"segmentation": 8/15, "aux_1": 4/15, "aux_2": 2/15,
    "aux_3": 1/15}``.

    Args:
        n_aux: number of auxiliary outputs (0..3 for the default network).
        decay: factor per coarser level, in (0, 1].

    Returns:
        ``{output name: weight}`` for ``model.compile(loss_weights=...)``.
    """
    if isinstance(n_aux, bool) or not isinstance(n_aux, int) or n_aux < 0:
        raise InputError(f"aux_loss_weights: n_aux must be an integer >= 0, got {n_aux!r}")
    if not 0.0 < float(decay) <= 1.0:
        raise InputError(f"aux_loss_weights: decay must be in (0, 1], got {decay!r}")
    raw = {SEGMENTATION: 1.0}
    raw.update({aux_name(k): float(decay) ** k for k in range(1, n_aux + 1)})
    total = sum(raw.values())
    return {key: value / total for key, value in raw.items()}


def non_finite_weights(model: keras.Model) -> list:
    """Paths of the model's variables holding NaN or Inf (empty when all are finite)."""
    bad = []
    for variable in model.weights:
        value = np.asarray(keras.ops.convert_to_numpy(variable.value))
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            bad.append(variable.path)
    return bad


def output_names(model: keras.Model) -> list[str]:
    """Names of ``model``'s outputs in order: ``["segmentation", "aux_1", ...]``.

    Works for single-output and dict-output functional models; the names are the keys to
    use for dict losses, loss weights, metrics and labels.
    """
    if isinstance(model.output, dict):
        return list(model.output.keys())
    return list(model.output_names)


#: The networks ``model.name`` can choose, by name. A builder takes ``input_shape``,
#: ``num_classes`` and ``seed``, and whichever ``model`` settings it needs (see
#: `tf_explog.builders.build_from_config`); its spatial divisor is read back from its
#: layers (`tf_explog.geometry.spatial_divisor`), so inference and export need nothing more.
MODELS = {"wong2018": build_model}
