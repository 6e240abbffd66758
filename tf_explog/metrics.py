"""In-graph per-label Dice for Keras training and evaluation.

``PerLabelDice`` accumulates, over every batch of an epoch, the per-label counts of the
argmax prediction: true positives ``TP_i``, predicted voxels ``P_i`` and true voxels ``T_i``,
and reports the epoch's Dice ``2·ΣTP_i / (ΣP_i + ΣT_i)`` per label and their mean. It uses
``keras.ops`` only (TensorFlow and JAX backends).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import keras
from keras import ops
from tf_explog.errors import InputError

__all__ = ["PerLabelDice"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def log_key(name: str) -> str:
    """Make a label name safe as a logs key (TensorBoard treats ``/`` as a folder)."""
    return _UNSAFE.sub("_", str(name).strip())


@keras.saving.register_keras_serializable(package="tf_explog")
class PerLabelDice(keras.metrics.Metric):
    """Hard (argmax) Dice per label, accumulated over all voxels seen since the last reset.

    ``Dice_i = 2·ΣTP_i / (ΣP_i + ΣT_i)`` where the sums run over every voxel of every batch
    of the epoch (not a mean of per-batch or per-volume Dice).

    Rules that keep the result NaN-free:

    - a label absent from both prediction and ground truth (``ΣP_i + ΣT_i = 0``) reports a
      Dice of 1.0 (nothing to find, nothing falsely found) and is left out of the mean;
    - the mean ``"<name>"`` runs over the reported labels present in prediction or ground
      truth; if there is none it is 1.0;
    - background (label 0) is reported and averaged only with ``include_background=True``.

    ``result()`` returns a dict ``{"<name>": mean, "<name>_<label>": Dice, ...}``. Keras
    (checked with 3.15, ``pythonify_logs``) flattens it into separate ``fit``/``evaluate``
    logs entries (``val_`` prefixed for validation) *without* the output-name prefix, so in
    a multi-output model give each output's metric its own ``name``.

    Args:
        num_classes: number of labels ``C`` (background included), ≥ 2.
        label_names: ``C`` names used in the logs keys (characters other than letters,
            digits, ``_ . -`` become ``_``); default: the label ids.
        include_background: report and average label 0 too.
        from_logits: accepted for symmetry with the losses; the argmax of logits and of
            probabilities is the same, so it changes nothing.
        name: metric name and logs-key prefix.
        dtype: accumulator dtype (float32: exact counts up to 2**24 per update; epoch sums
            beyond that carry relative rounding below 1e-7).

    ``update_state(y_true, y_pred, sample_weight=None)``: ``y_pred`` is ``[B, ..., C]``;
    ``y_true`` sparse ids ``[B, ...]`` or ``[B, ..., 1]`` or one-hot ``[B, ..., C]``; voxels
    with an id outside ``0..C-1`` (e.g. an "unlabelled" 255) or an all-zero one-hot row are
    ignored entirely (counted in neither ΣT, ΣP nor TP);
    ``sample_weight`` broadcastable to ``[B, ...]`` weights voxels.
    """

    def __init__(
        self,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        include_background: bool = False,
        from_logits: bool = False,
        name: str = "dice",
        dtype: Any = "float32",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise InputError(
                f"PerLabelDice: num_classes must be an integer >= 2, got {num_classes!r}"
            )
        self.num_classes = int(num_classes)
        if label_names is None:
            self.label_names = None
            keys = [str(i) for i in range(self.num_classes)]
        else:
            if isinstance(label_names, str) or len(label_names) != self.num_classes:
                raise InputError(
                    f"PerLabelDice: label_names must be a sequence of num_classes="
                    f"{self.num_classes} names (background first), got {label_names!r}"
                )
            self.label_names = [str(n) for n in label_names]
            keys = [log_key(n) for n in self.label_names]
            if any(not k for k in keys) or len(set(keys)) != len(keys):
                raise InputError(
                    f"PerLabelDice: label_names must be non-empty and unique after replacing "
                    f"characters outside [A-Za-z0-9_.-] by '_', got {keys!r}"
                )
        self.include_background = bool(include_background)
        self.from_logits = bool(from_logits)
        self._first = 0 if self.include_background else 1
        self._result_keys = [f"{self.name}_{k}" for k in keys[self._first:]]
        shape = (self.num_classes,)
        self.true_positives = self.add_variable(shape, "zeros", dtype=self.dtype, name="tp")
        self.pred_sums = self.add_variable(shape, "zeros", dtype=self.dtype, name="pred_sum")
        self.true_sums = self.add_variable(shape, "zeros", dtype=self.dtype, name="true_sum")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Add the batch's per-label TP, predicted and true voxel counts."""
        y_pred = ops.convert_to_tensor(y_pred)
        rank = len(y_pred.shape)
        if rank < 2 or y_pred.shape[-1] != self.num_classes:
            raise InputError(
                f"PerLabelDice {self.name!r}: y_pred must be [B, ..., {self.num_classes}], "
                f"got shape {tuple(y_pred.shape)}"
            )
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == rank and y_true.shape[-1] == self.num_classes:
            true_1h = ops.cast(y_true, self.dtype)
        else:
            if len(y_true.shape) == rank and y_true.shape[-1] == 1:
                y_true = ops.squeeze(y_true, axis=-1)
            if len(y_true.shape) != rank - 1:
                raise InputError(
                    f"PerLabelDice {self.name!r}: y_true must be sparse [B, ...] or "
                    f"[B, ..., 1], or one-hot [B, ..., {self.num_classes}] matching y_pred "
                    f"{tuple(y_pred.shape)}; got shape {tuple(y_true.shape)}"
                )
            # one_hot maps ids outside 0..C-1 to all-zero rows, i.e. unlabelled voxels.
            true_1h = ops.one_hot(ops.cast(y_true, "int32"), self.num_classes, dtype=self.dtype)
        pred_1h = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes, dtype=self.dtype)
        # Unlabelled voxels (no true label) must not count as predicted either.
        labelled = ops.cast(ops.sum(true_1h, axis=-1, keepdims=True) > 0, self.dtype)
        pred_1h = pred_1h * labelled
        hits = true_1h * pred_1h
        if sample_weight is not None:
            weight = ops.cast(ops.convert_to_tensor(sample_weight), self.dtype)
            while len(weight.shape) < rank - 1:
                weight = ops.expand_dims(weight, -1)
            weight = ops.expand_dims(weight, -1)
            hits, pred_1h, true_1h = hits * weight, pred_1h * weight, true_1h * weight

        def per_label(counts):
            return ops.sum(ops.reshape(counts, (-1, self.num_classes)), axis=0)

        self.true_positives.assign_add(per_label(hits))
        self.pred_sums.assign_add(per_label(pred_1h))
        self.true_sums.assign_add(per_label(true_1h))

    def result(self) -> dict:
        """``{"<name>": mean Dice, "<name>_<label>": Dice per label}`` (see class docstring)."""
        tp = self.true_positives[self._first:]
        denom = self.pred_sums[self._first:] + self.true_sums[self._first:]
        present = denom > 0
        dice = ops.where(present, 2.0 * tp / ops.where(present, denom, 1.0), 1.0)
        n_present = ops.sum(ops.cast(present, self.dtype))
        mean = ops.where(
            n_present > 0,
            ops.sum(ops.where(present, dice, 0.0)) / ops.maximum(n_present, 1.0),
            1.0,
        )
        out = {self.name: mean}
        for i, key in enumerate(self._result_keys):
            out[key] = dice[i]
        return out

    def get_config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "label_names": self.label_names,
            "include_background": self.include_background,
            "from_logits": self.from_logits,
            "name": self.name,
            "dtype": self.dtype,
        }
