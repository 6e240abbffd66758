"""The exponential logarithmic loss family for multi-label 3D segmentation.

Reference: K. C. L. Wong, M. Moradi, H. Tang, T. Syeda-Mahmood, "3D Segmentation with
Exponential Logarithmic Loss for Highly Unbalanced Object Sizes", MICCAI 2018
(arXiv:1809.00076).

    L_exp   = w_dice * L_dice + w_cross * L_cross
    L_dice  = mean_i ( -ln Dice_i ) ** gamma_dice
    Dice_i  = ( 2 * sum_x delta_il(x) p_i(x) + smooth ) / ( sum_x (delta_il(x) + p_i(x)) + smooth )
    L_cross = mean_x  w_l(x) * ( -ln p_l(x) ) ** gamma_cross

Dice is computed per sample over the spatial axes, the label mean runs over all labels
(background included, as in the paper), and the per-sample values are averaged over the
batch by the ``Loss`` reduction. The same code path gives the paper's comparison losses
(linear Dice, L_dice alone, L_cross alone) and the generalized Dice loss of Sudre et al.

Everything here uses ``keras.ops`` only (it runs on TensorFlow and JAX) and computes in
float32 whatever the dtype policy: under float16, sums over 64^3 voxels overflow.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
from keras import ops
from tf_explog.errors import InputError

__all__ = [
    "class_weights_from_frequencies",
    "exp_log_loss",
    "linear_dice_loss",
    "log_dice_loss",
    "weighted_cross_entropy",
    "generalized_dice_loss",
    "dice_ce_loss",
    "dice_focal_loss",
    "soft_dice_per_label",
    "ExpLogLoss",
    "LinearDiceLoss",
    "LogDiceLoss",
    "WeightedCrossEntropy",
    "GeneralizedDiceLoss",
    "DiceCELoss",
    "DiceFocalLoss",
    "downsample_targets",
    "deep_supervision_losses",
]

# Probabilities (not logits) are clipped below before the log so that -ln p stays finite
# where a softmax underflowed to 0; 1e-7 matches keras.backend.epsilon().
_PROB_EPSILON = 1e-7


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_non_negative(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be a number >= 0; got {value!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"`{name}` must be a finite number >= 0; got {value!r}.")
    return value


def _check_positive(name: str, value: float) -> float:
    value = _check_non_negative(name, value)
    if value == 0:
        raise InputError(
            f"`{name}` must be > 0: it keeps Dice defined (0/0) for labels absent from "
            f"both prediction and labels; got {value!r}."
        )
    return value


def _check_factor(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"`downsample_labels` must be an integer >= 1; got {value!r}.")
    return int(value)


def _check_class_weights(class_weights) -> list[float] | None:
    if class_weights is None:
        return None
    weights = np.asarray(class_weights, dtype="float64")
    if weights.ndim != 1 or weights.size == 0:
        raise InputError(
            "`class_weights` must be a 1-D sequence with one weight per label; "
            f"got shape {weights.shape}."
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise InputError(
            f"`class_weights` must be finite and >= 0; got {weights.tolist()}."
        )
    return [float(w) for w in weights]


def class_weights_from_frequencies(frequencies: Sequence[float]) -> list[float]:
    """Label weights of the paper's weighted cross-entropy from label frequencies.

    ``w_k = ((sum_j f_j) / f_k) ** 0.5``  (Wong et al. 2018, Eq. 4).

    Frequencies may be voxel counts or fractions (the weights are scale-invariant); count
    them once over the training set, not per batch, where absent labels would get infinite
    weights.

    Rule for labels of frequency 0: they get the largest weight among the present labels.
    Such a label never appears as a true label in the data that was counted, so its weight
    has no effect there; where it does appear later it is treated as the rarest label seen.

    Args:
        frequencies: one non-negative number per label (background included).

    Returns:
        A list of floats, one weight per label.

    Raises:
        ValueError: negative, non-finite or all-zero frequencies.
    """
    freqs = np.asarray(frequencies, dtype="float64")
    if freqs.ndim != 1 or freqs.size == 0:
        raise InputError(
            f"`frequencies` must be a 1-D sequence, one per label; got shape {freqs.shape}."
        )
    if not np.all(np.isfinite(freqs)) or np.any(freqs < 0):
        raise InputError(
            f"`frequencies` must be finite and >= 0; got {freqs.tolist()}."
        )
    total = freqs.sum()
    if total <= 0:
        raise InputError("`frequencies` are all zero: no label was counted.")
    present = freqs > 0
    weights = np.zeros_like(freqs)
    weights[present] = np.sqrt(total / freqs[present])
    weights[~present] = weights[present].max()
    return [float(w) for w in weights]


# --------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------


def _prepare(y_true, y_pred, from_logits: bool, downsample_labels: int = 1):
    """Returns (targets, probabilities, -ln p, classes, dense) in float32, shapes checked.

    Labels may be sparse ``[B, *spatial]`` / ``[B, *spatial, 1]`` integers or one-hot (or
    soft) ``[B, *spatial, C]``; ``y_pred`` is ``[B, *spatial, C]``. With
    ``downsample_labels = f > 1`` the labels are at ``f`` times ``y_pred``'s resolution and
    become soft targets (see :func:`downsample_targets`). ``dense`` says the targets did not
    come as sparse ids (they may be soft).
    """
    y_pred = ops.cast(y_pred, "float32")
    if downsample_labels != 1:
        y_true = downsample_targets(y_true, y_pred.shape[-1], downsample_labels)
    pred_shape = tuple(y_pred.shape)
    true_shape = tuple(y_true.shape)
    if len(pred_shape) < 3:
        raise InputError(
            "`y_pred` must be [batch, *spatial, classes] with at least one spatial axis; "
            f"got shape {pred_shape}."
        )
    num_classes = pred_shape[-1]
    if num_classes is None or num_classes < 2:
        raise InputError(
            "`y_pred` needs a known class axis of size >= 2 (softmax over labels); "
            f"got shape {pred_shape}."
        )

    def _compatible(a, b):
        return len(a) == len(b) and all(
            x is None or y is None or x == y for x, y in zip(a, b)
        )

    if _compatible(true_shape, pred_shape[:-1]):
        sparse = True
    elif _compatible(true_shape, pred_shape[:-1] + (1,)):
        sparse = True
        y_true = ops.squeeze(y_true, axis=-1)
    elif _compatible(true_shape, pred_shape):
        sparse = False
    else:
        raise InputError(
            "`y_true` and `y_pred` shapes do not match: labels must be sparse "
            f"{pred_shape[:-1]} (or with a trailing 1) or one-hot {pred_shape}; "
            f"got y_true {true_shape} and y_pred {pred_shape}."
        )
    if sparse:
        one_hot = ops.one_hot(ops.cast(y_true, "int32"), num_classes, dtype="float32")
    else:
        one_hot = ops.cast(y_true, "float32")

    if from_logits:
        # -ln p from log-softmax: exact where a float32 softmax would round p to 1 or 0.
        log_p = ops.log_softmax(y_pred, axis=-1)
        probs = ops.exp(log_p)
    else:
        probs = y_pred
        log_p = ops.log(ops.clip(y_pred, _PROB_EPSILON, 1.0))
        # clip may turn NaN into a bound on some backends; keep it NaN.
        log_p = ops.where(ops.isnan(y_pred), y_pred, log_p)
    return one_hot, probs, -log_p, num_classes, not sparse


def downsample_targets(y_true, num_classes: int, factor: int):
    """Soft targets at ``1 / factor`` resolution: the mean one-hot label of each
    ``factor³`` block (average pooling), as the auxiliary heads at 1/2, 1/4, 1/8 need.

    Unlike taking every ``factor``-th voxel, this keeps every structure's volume exactly
    (the soft targets of a class sum to its voxel count / factor³), so structures a few
    voxels wide neither vanish nor alias at coarse levels. Spatial sizes must be multiples
    of ``factor``.

    Args:
        y_true: sparse ids ``[B, *spatial]`` (or ``[..., 1]``) or one-hot ``[B, *spatial, C]``.
        num_classes: C.
        factor: the downsampling factor (a power of 2 for the paper network's heads).

    Returns:
        float32 ``[B, *spatial / factor, C]``.
    """
    y_true = ops.convert_to_tensor(y_true)
    rank = len(y_true.shape)
    if y_true.shape[-1] == num_classes and rank >= 3:
        dense = ops.cast(y_true, "float32")
    else:
        if y_true.shape[-1] == 1:
            y_true = ops.squeeze(y_true, axis=-1)
        dense = ops.one_hot(ops.cast(y_true, "int32"), num_classes, dtype="float32")
    spatial = len(dense.shape) - 2
    return ops.average_pool(dense, pool_size=(factor,) * spatial, strides=(factor,) * spatial,
                            padding="valid", data_format="channels_last")


def _safe_pow(x, gamma: float):
    """``x ** gamma`` for x >= 0 with a finite gradient everywhere.

    d(x^g)/dx = g x^(g-1) is infinite at x = 0 for g < 1, and autodiff then produces
    inf * 0 = NaN. Both branches of the ``where`` are kept finite (x is replaced by 1 where
    it is not positive), so the value is exactly 0 there with no floor added elsewhere.
    Values below 0 (from rounding, e.g. -ln of a Dice of 1 + 1 ulp) count as 0; NaN stays
    NaN.
    """
    positive = x > 0.0
    # NaN is neither > 0 nor <= 0: it must stay NaN, or a broken prediction would score as
    # a perfect one (loss 0) and training would go on silently.
    rest = ops.where(ops.isnan(x), x, ops.zeros_like(x))
    if gamma == 1.0:
        return ops.where(positive, x, rest)
    safe_x = ops.where(positive, x, ops.ones_like(x))
    return ops.where(positive, ops.power(safe_x, gamma), rest)


def _spatial_axes(rank: int) -> tuple[int, ...]:
    return tuple(range(1, rank - 1))


def soft_dice_per_label(y_true, y_pred, smooth: float = 1.0, from_logits: bool = False):
    """Soft Dice of every label, per sample: ``[batch, classes]`` float32.

    ``Dice_i = (2 sum_x delta_il p_i + smooth) / (sum_x (delta_il + p_i) + smooth)``
    (linear denominator, as in the paper; not V-Net's squares).
    """
    one_hot, probs, _, _, _ = _prepare(y_true, y_pred, from_logits)
    return _dice(one_hot, probs, smooth)


def _overlap(one_hot, probs):
    """Per-label ``(Σ δ p, Σ [δ (1 − p) + (1 − δ) p])`` over the spatial axes.

    The second sum ("mismatch") is ``Σ δ + Σ p − 2 Σ δ p`` written so that float32 keeps it:
    for p near 1, ``1 − p`` is exact while ``Σ δ + Σ p`` rounds to a multiple of the ulp of
    the volume, and ``(−ln Dice)^γ`` with γ < 1 magnifies that rounding (a 1-ulp softmax
    error at a perfect prediction cost 0.003-0.005 of loss with the direct form).
    """
    axes = _spatial_axes(len(probs.shape))
    intersection = ops.sum(one_hot * probs, axis=axes)
    mismatch = ops.sum(one_hot * (1.0 - probs) + (1.0 - one_hot) * probs, axis=axes)
    return intersection, mismatch


def _dice(one_hot, probs, smooth):
    """``Dice_i = (2 Σ δ p + smooth) / (Σ (δ + p) + smooth)``, per sample and label."""
    intersection, mismatch = _overlap(one_hot, probs)
    numerator = 2.0 * intersection + smooth
    return numerator / (numerator + mismatch)


def _neg_log_dice(one_hot, probs, smooth):
    """``−ln Dice_i = ln(1 + mismatch / (2 Σ δ p + smooth))``, accurate near Dice = 1."""
    intersection, mismatch = _overlap(one_hot, probs)
    return ops.log1p(mismatch / (2.0 * intersection + smooth))


def _one_minus_dice(one_hot, probs, smooth):
    intersection, mismatch = _overlap(one_hot, probs)
    return mismatch / (2.0 * intersection + smooth + mismatch)


def _label_mean(per_label, include_background: bool):
    if not include_background:
        per_label = per_label[:, 1:]
    return ops.mean(per_label, axis=-1)


def _log_dice_term(one_hot, probs, gamma, smooth, include_background):
    # gamma is applied per label before averaging: (-ln mean Dice)^gamma is another loss.
    return _label_mean(_safe_pow(_neg_log_dice(one_hot, probs, smooth), gamma),
                       include_background)


def _cross_term(targets, neg_log_p, num_classes, gamma, class_weights, dense=False):
    """``mean_x Σ_c t_c(x) w_c (−ln p_c(x))^γ``: for one-hot targets the paper's
    ``mean_x w_l (−ln p_l)^γ``; for soft targets its expectation over the target
    distribution of each voxel (γ applied per class, before the mixture)."""
    if class_weights is not None and len(class_weights) != num_classes:
        raise InputError(
            f"`class_weights` has {len(class_weights)} entries but y_pred has "
            f"{num_classes} classes; give one weight per label."
        )
    weights = (None if class_weights is None
               else ops.convert_to_tensor(np.asarray(class_weights, "float32")))
    if dense:
        per_class = _safe_pow(neg_log_p, gamma)
        if weights is not None:
            per_class = per_class * weights
        per_voxel = ops.sum(targets * per_class, axis=-1)
    else:
        # Sparse ids: one class per voxel, so the power is taken once per voxel.
        per_voxel = _safe_pow(ops.sum(targets * neg_log_p, axis=-1), gamma)
        if weights is not None:
            per_voxel = per_voxel * ops.sum(targets * weights, axis=-1)
    return ops.mean(per_voxel, axis=tuple(range(1, len(per_voxel.shape))))


# --------------------------------------------------------------------------------------
# Loss functions: (y_true, y_pred) -> per-sample loss [batch]
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="tf_explog")
def exp_log_loss(
    y_true,
    y_pred,
    gamma_dice: float = 0.3,
    gamma_cross: float = 0.3,
    w_dice: float = 0.8,
    w_cross: float = 0.2,
    smooth: float = 1.0,
    class_weights: Sequence[float] | None = None,
    from_logits: bool = False,
    include_background: bool = True,
    downsample_labels: int = 1,
):
    """Exponential logarithmic loss per sample (Wong et al. 2018, Eqs. 1-4).

    ``L = w_dice * mean_i (-ln Dice_i)^gamma_dice + w_cross * mean_x w_l (-ln p_l)^gamma_cross``

    With soft targets ``t`` (one-hot rows averaged, see ``downsample_labels``) the same
    formulas hold with ``δ_il`` replaced by ``t_i`` in Dice and the cross term taken as
    ``mean_x Σ_c t_c w_c (-ln p_c)^gamma_cross``.

    Returns:
        float32 tensor ``[batch]``. A perfect one-hot prediction gives exactly 0.0.
    """
    one_hot, probs, neg_log_p, num_classes, dense = _prepare(y_true, y_pred, from_logits,
                                                             downsample_labels)
    loss = 0.0
    if w_dice:
        loss = loss + w_dice * _log_dice_term(
            one_hot, probs, gamma_dice, smooth, include_background
        )
    if w_cross:
        loss = loss + w_cross * _cross_term(
            one_hot, neg_log_p, num_classes, gamma_cross, class_weights, dense
        )
    if isinstance(loss, float):  # both weights zero
        loss = ops.zeros((ops.shape(probs)[0],), dtype="float32")
    return loss


@keras.saving.register_keras_serializable(package="tf_explog")
def log_dice_loss(y_true, y_pred, gamma=1.0, smooth=1.0, from_logits=False,
                  include_background=True, downsample_labels=1):
    """``L_dice = mean_i (-ln Dice_i)^gamma`` per sample (the paper's L_dice)."""
    return exp_log_loss(y_true, y_pred, gamma_dice=gamma, w_dice=1.0, w_cross=0.0,
                        smooth=smooth, from_logits=from_logits,
                        include_background=include_background,
                        downsample_labels=downsample_labels)


@keras.saving.register_keras_serializable(package="tf_explog")
def weighted_cross_entropy(y_true, y_pred, gamma=1.0, class_weights=None,
                           from_logits=False, downsample_labels=1):
    """``L_cross = mean_x w_l (-ln p_l)^gamma`` per sample (the paper's L_cross)."""
    return exp_log_loss(y_true, y_pred, gamma_cross=gamma, w_dice=0.0, w_cross=1.0,
                        class_weights=class_weights, from_logits=from_logits,
                        downsample_labels=downsample_labels)


@keras.saving.register_keras_serializable(package="tf_explog")
def linear_dice_loss(y_true, y_pred, smooth=1.0, from_logits=False,
                     include_background=True, downsample_labels=1):
    """Linear Dice loss ``mean_i (1 - Dice_i)`` per sample, the paper's weakest baseline."""
    one_hot, probs, _, _, _ = _prepare(y_true, y_pred, from_logits, downsample_labels)
    return _label_mean(_one_minus_dice(one_hot, probs, smooth), include_background)


@keras.saving.register_keras_serializable(package="tf_explog")
def generalized_dice_loss(y_true, y_pred, weight_type="square", smooth=1e-5,
                          from_logits=False, include_background=True, downsample_labels=1):
    """Generalized Dice loss (Sudre et al., DLMIA 2017) per sample.

    ``GDL = 1 - 2 sum_i w_i sum_x r_i p_i / sum_i w_i sum_x (r_i + p_i)``, with
    ``w_i = 1 / (sum_x r_i)^2`` ("square"), ``1 / sum_x r_i`` ("simple") or 1 ("uniform").
    A label absent from the sample would get an infinite weight; it gets the largest
    finite weight of that sample instead. ``smooth`` is added to numerator and denominator.
    """
    one_hot, probs, _, _, _ = _prepare(y_true, y_pred, from_logits, downsample_labels)
    if not include_background:
        one_hot, probs = one_hot[..., 1:], probs[..., 1:]
    axes = _spatial_axes(len(probs.shape))
    ref_volume = ops.sum(one_hot, axis=axes)
    if weight_type == "square":
        raw = ref_volume * ref_volume
    elif weight_type == "simple":
        raw = ref_volume
    else:
        raw = ops.ones_like(ref_volume)
    present = raw > 0.0
    weights = ops.where(present, 1.0 / ops.where(present, raw, ops.ones_like(raw)), 0.0)
    max_weight = ops.max(weights, axis=-1, keepdims=True)
    weights = ops.where(present, weights, max_weight)
    numerator = 2.0 * ops.sum(weights * ops.sum(one_hot * probs, axis=axes), axis=-1)
    denominator = ops.sum(weights * (ref_volume + ops.sum(probs, axis=axes)), axis=-1)
    return 1.0 - (numerator + smooth) / (denominator + smooth)


def _weighted_voxel_mean(per_class, targets, class_weights, num_classes):
    """``mean_x Σ_c t_c(x) w_c per_class_c(x)`` (w = 1 without class weights)."""
    if class_weights is not None and len(class_weights) != num_classes:
        raise InputError(
            f"`class_weights` has {len(class_weights)} entries but y_pred has "
            f"{num_classes} classes; give one weight per label."
        )
    if class_weights is not None:
        per_class = per_class * ops.convert_to_tensor(np.asarray(class_weights, "float32"))
    per_voxel = ops.sum(targets * per_class, axis=-1)
    return ops.mean(per_voxel, axis=tuple(range(1, len(per_voxel.shape))))


@keras.saving.register_keras_serializable(package="tf_explog")
def dice_ce_loss(y_true, y_pred, w_dice=1.0, w_ce=1.0, smooth=1e-5, class_weights=None,
                 from_logits=False, include_background=False, downsample_labels=1):
    """Soft Dice + cross-entropy, nnU-Net's default loss (Isensee et al. 2021), per sample.

    ``L = w_dice * mean_i (1 - Dice_i) + w_ce * mean_x Σ_c t_c w_c (-ln p_c)``

    with ``Dice_i = (2 Σ t_i p_i + smooth) / (Σ (t_i + p_i) + smooth)`` per sample, the label
    mean over the foreground labels (``include_background=False``, as nnU-Net) and unweighted
    cross-entropy by default. nnU-Net writes the Dice term as ``-Dice`` (the same gradient);
    ``1 - Dice`` keeps a perfect prediction at exactly 0.
    """
    one_hot, probs, neg_log_p, num_classes, _ = _prepare(y_true, y_pred, from_logits,
                                                         downsample_labels)
    dice_term = _label_mean(_one_minus_dice(one_hot, probs, smooth), include_background)
    ce_term = _weighted_voxel_mean(neg_log_p, one_hot, class_weights, num_classes)
    return w_dice * dice_term + w_ce * ce_term


@keras.saving.register_keras_serializable(package="tf_explog")
def dice_focal_loss(y_true, y_pred, w_dice=1.0, w_focal=1.0, gamma=2.0, smooth=1e-5,
                    class_weights=None, from_logits=False, include_background=False,
                    downsample_labels=1):
    """Soft Dice + focal loss (Lin et al., ICCV 2017), a compound loss, per sample.

    ``L = w_dice * mean_i (1 - Dice_i) + w_focal * mean_x Σ_c t_c w_c (1 - p_c)^gamma (-ln p_c)``

    Dice as in :func:`dice_ce_loss`; ``class_weights`` play the focal loss's ``α_c``
    (None: all 1). ``1 - p`` is computed as ``-expm1(ln p)`` so that it stays exact near
    p = 1, and the power is safe at 0 for any gamma ≥ 0.
    """
    one_hot, probs, neg_log_p, num_classes, _ = _prepare(y_true, y_pred, from_logits,
                                                         downsample_labels)
    dice_term = _label_mean(_one_minus_dice(one_hot, probs, smooth), include_background)
    one_minus_p = -ops.expm1(-neg_log_p)
    focal = _safe_pow(ops.maximum(one_minus_p, 0.0), gamma) * neg_log_p
    focal_term = _weighted_voxel_mean(focal, one_hot, class_weights, num_classes)
    return w_dice * dice_term + w_focal * focal_term


# --------------------------------------------------------------------------------------
# Loss classes
# --------------------------------------------------------------------------------------


class _SegmentationLoss(keras.losses.Loss):
    """Stores validated keyword arguments and calls ``fn(y_true, y_pred, **kwargs)``."""

    fn = None

    def __init__(self, name, reduction, dtype, **kwargs):
        # float32 by default whatever the global policy; see the module docstring.
        super().__init__(name=name, reduction=reduction, dtype=dtype or "float32")
        self._fn_kwargs = kwargs

    def call(self, y_true, y_pred):
        return type(self).fn(y_true, y_pred, **self._fn_kwargs)

    def get_config(self):
        config = super().get_config()
        config["dtype"] = self.dtype
        config.update(self._fn_kwargs)
        return config


@keras.saving.register_keras_serializable(package="tf_explog")
class ExpLogLoss(_SegmentationLoss):
    """Exponential logarithmic loss (Wong et al., MICCAI 2018).

    ``L_exp = w_dice * mean_i (-ln Dice_i)^gamma_dice + w_cross * mean_x w_l (-ln p_l)^gamma_cross``
    with ``Dice_i = (2 sum delta_il p_i + smooth) / (sum (delta_il + p_i) + smooth)`` per sample.

    Paper defaults: gamma = 0.3 for both terms, w_dice = 0.8, w_cross = 0.2, smooth = 1.
    A perfect one-hot prediction gives exactly 0.0 (no floor is added), and value and
    gradient stay finite for saturated logits, absent labels and all-background samples.

    Args:
        gamma_dice, gamma_cross: exponents (>= 0; < 1 emphasises hard and easy labels alike).
        w_dice, w_cross: weights of the two terms (>= 0).
        smooth: pseudocount added to the Dice numerator and denominator (>= 0).
        class_weights: one weight w_k per label for the cross-entropy term (None = all 1);
            see `class_weights_from_frequencies`.
        from_logits: whether ``y_pred`` are logits (then -ln p comes from log-softmax).
        include_background: average L_dice over label 0 too (paper: True).
        downsample_labels: the labels are at this many times the prediction's resolution
            (an auxiliary head at 1/2, 1/4, 1/8: 2, 4, 8) and are averaged over blocks into
            soft targets that keep every structure's volume (`downsample_targets`).
        reduction, name, dtype: as for `keras.losses.Loss`; computation is float32.
    """

    fn = staticmethod(exp_log_loss)

    def __init__(self, gamma_dice=0.3, gamma_cross=0.3, w_dice=0.8, w_cross=0.2,
                 smooth=1.0, class_weights=None, from_logits=False,
                 include_background=True, downsample_labels=1,
                 reduction="sum_over_batch_size", name="exp_log_loss", dtype=None):
        super().__init__(
            name, reduction, dtype,
            gamma_dice=_check_non_negative("gamma_dice", gamma_dice),
            gamma_cross=_check_non_negative("gamma_cross", gamma_cross),
            w_dice=_check_non_negative("w_dice", w_dice),
            w_cross=_check_non_negative("w_cross", w_cross),
            smooth=_check_positive("smooth", smooth),
            class_weights=_check_class_weights(class_weights),
            from_logits=bool(from_logits),
            include_background=bool(include_background),
            downsample_labels=_check_factor(downsample_labels),
        )


@keras.saving.register_keras_serializable(package="tf_explog")
class LogDiceLoss(_SegmentationLoss):
    """The paper's L_dice alone: ``mean_i (-ln Dice_i)^gamma`` (gamma = 1 in its comparison)."""

    fn = staticmethod(log_dice_loss)

    def __init__(self, gamma=1.0, smooth=1.0, from_logits=False, include_background=True,
                 downsample_labels=1, reduction="sum_over_batch_size", name="log_dice_loss",
                 dtype=None):
        super().__init__(
            name, reduction, dtype,
            gamma=_check_non_negative("gamma", gamma),
            smooth=_check_positive("smooth", smooth),
            from_logits=bool(from_logits),
            include_background=bool(include_background),
            downsample_labels=_check_factor(downsample_labels),
        )


@keras.saving.register_keras_serializable(package="tf_explog")
class WeightedCrossEntropy(_SegmentationLoss):
    """The paper's L_cross alone: ``mean_x w_l (-ln p_l)^gamma`` (gamma = 1 in its comparison)."""

    fn = staticmethod(weighted_cross_entropy)

    def __init__(self, gamma=1.0, class_weights=None, from_logits=False, downsample_labels=1,
                 reduction="sum_over_batch_size", name="weighted_cross_entropy",
                 dtype=None):
        super().__init__(
            name, reduction, dtype,
            gamma=_check_non_negative("gamma", gamma),
            class_weights=_check_class_weights(class_weights),
            from_logits=bool(from_logits),
            downsample_labels=_check_factor(downsample_labels),
        )


@keras.saving.register_keras_serializable(package="tf_explog")
class LinearDiceLoss(_SegmentationLoss):
    """Linear Dice loss ``mean_i (1 - Dice_i)``: large structures fine, small ones missed."""

    fn = staticmethod(linear_dice_loss)

    def __init__(self, smooth=1.0, from_logits=False, include_background=True,
                 downsample_labels=1, reduction="sum_over_batch_size",
                 name="linear_dice_loss", dtype=None):
        super().__init__(
            name, reduction, dtype,
            smooth=_check_positive("smooth", smooth),
            from_logits=bool(from_logits),
            include_background=bool(include_background),
            downsample_labels=_check_factor(downsample_labels),
        )


_GDL_WEIGHT_TYPES = ("square", "simple", "uniform")


@keras.saving.register_keras_serializable(package="tf_explog")
class GeneralizedDiceLoss(_SegmentationLoss):
    """Generalized Dice loss (Sudre et al. 2017), the alternative the paper argues against.

    ``GDL = 1 - 2 sum_i w_i sum_x r_i p_i / sum_i w_i sum_x (r_i + p_i)``,
    ``w_i = 1 / (sum_x r_i)^2`` by default.
    """

    fn = staticmethod(generalized_dice_loss)

    def __init__(self, weight_type="square", smooth=1e-5, from_logits=False,
                 include_background=True, downsample_labels=1,
                 reduction="sum_over_batch_size", name="generalized_dice_loss", dtype=None):
        if weight_type not in _GDL_WEIGHT_TYPES:
            raise InputError(
                f"`weight_type` must be one of {_GDL_WEIGHT_TYPES}; got {weight_type!r}."
            )
        super().__init__(
            name, reduction, dtype,
            weight_type=weight_type,
            smooth=_check_positive("smooth", smooth),
            from_logits=bool(from_logits),
            include_background=bool(include_background),
            downsample_labels=_check_factor(downsample_labels),
        )


@keras.saving.register_keras_serializable(package="tf_explog")
class DiceCELoss(_SegmentationLoss):
    """Soft Dice + cross-entropy (nnU-Net's default, 1 : 1); see :func:`dice_ce_loss`.

    ``L = w_dice * mean_i (1 - Dice_i) + w_ce * mean_x w_l (-ln p_l)``, foreground labels in
    the Dice mean, ``smooth = 1e-5`` and no class weights by default (as nnU-Net).
    Reference: Isensee et al., "nnU-Net", Nature Methods 18 (2021).
    """

    fn = staticmethod(dice_ce_loss)

    def __init__(self, w_dice=1.0, w_ce=1.0, smooth=1e-5, class_weights=None,
                 from_logits=False, include_background=False, downsample_labels=1,
                 reduction="sum_over_batch_size", name="dice_ce_loss", dtype=None):
        super().__init__(
            name, reduction, dtype,
            w_dice=_check_non_negative("w_dice", w_dice),
            w_ce=_check_non_negative("w_ce", w_ce),
            smooth=_check_positive("smooth", smooth),
            class_weights=_check_class_weights(class_weights),
            from_logits=bool(from_logits),
            include_background=bool(include_background),
            downsample_labels=_check_factor(downsample_labels),
        )


@keras.saving.register_keras_serializable(package="tf_explog")
class DiceFocalLoss(_SegmentationLoss):
    """Soft Dice + focal loss, a compound loss; see :func:`dice_focal_loss`.

    ``L = w_dice * mean_i (1 - Dice_i) + w_focal * mean_x w_l (1 - p_l)^gamma (-ln p_l)``,
    gamma = 2 by default. Reference: Lin et al., "Focal Loss for Dense Object Detection",
    ICCV 2017; compound Dice + focal losses: Ma et al., "Loss odyssey in medical image
    segmentation", Medical Image Analysis 71 (2021).
    """

    fn = staticmethod(dice_focal_loss)

    def __init__(self, w_dice=1.0, w_focal=1.0, gamma=2.0, smooth=1e-5, class_weights=None,
                 from_logits=False, include_background=False, downsample_labels=1,
                 reduction="sum_over_batch_size", name="dice_focal_loss", dtype=None):
        super().__init__(
            name, reduction, dtype,
            w_dice=_check_non_negative("w_dice", w_dice),
            w_focal=_check_non_negative("w_focal", w_focal),
            gamma=_check_non_negative("gamma", gamma),
            smooth=_check_positive("smooth", smooth),
            class_weights=_check_class_weights(class_weights),
            from_logits=bool(from_logits),
            include_background=bool(include_background),
            downsample_labels=_check_factor(downsample_labels),
        )


#: Names accepted by configs and the loss comparison, mapped to their classes.
LOSSES = {
    "exp_log": ExpLogLoss,
    "log_dice": LogDiceLoss,
    "weighted_cross_entropy": WeightedCrossEntropy,
    "linear_dice": LinearDiceLoss,
    "generalized_dice": GeneralizedDiceLoss,
    "dice_ce": DiceCELoss,
    "dice_focal": DiceFocalLoss,
}


def deep_supervision_losses(loss: keras.losses.Loss, aux_outputs: int,
                            input_downsample: int = 1) -> dict:
    """``{output name: loss}`` for a model with ``aux_outputs`` auxiliary heads.

    The full-resolution ``"segmentation"`` output gets ``loss``; ``"aux_k"`` (at 1/2**k
    of the network's grid, itself ``1 / input_downsample`` of the labels' grid) gets a copy
    with ``downsample_labels = input_downsample * 2**k``, so every output is trained on
    the same full-resolution labels, averaged down to soft targets that keep the volume of
    every structure (a structure a few voxels wide neither vanishes nor aliases at 1/8).
    """
    from tf_explog.labels import SEGMENTATION, aux_name

    config = loss.get_config()
    out = {SEGMENTATION: loss}
    for k in range(1, int(aux_outputs) + 1):
        out[aux_name(k)] = type(loss).from_config(
            {**config, "downsample_labels": int(input_downsample) * 2**k,
             "name": f"{config['name']}_{aux_name(k)}"})
    return out


def get(name: str, **kwargs) -> keras.losses.Loss:
    """Builds a loss of this module by its config name (see ``LOSSES``)."""
    if name not in LOSSES:
        raise InputError(f"Unknown loss {name!r}; expected one of {sorted(LOSSES)}.")
    return LOSSES[name](**kwargs)
