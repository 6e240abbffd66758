"""Labels: output names, label maps (original ids → classes) and their files.

Every stage that speaks about labels uses this module:

- the names of the model's outputs (``"segmentation"``, ``"aux_1"``, ...) and of the label
  dicts the data pipelines yield for them;
- :class:`LabelMap`: contiguous class indices made of original label ids, e.g.
  FreeSurfer's left and right white matter (2, 41) merged into class 1. The map is applied
  when labels are read (:func:`apply_label_map`) and, for writing predictions back, inverted
  (:func:`invert_label_map`: each class to the first original id it lists);
- :func:`load_label_map`: the map from a JSON file ``{"class index": [original ids], ...}``,
  with errors that name the file and the id.

NumPy only (no TensorFlow, no Keras).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from tf_explog.errors import InputError

__all__ = [
    "SEGMENTATION",
    "aux_name",
    "output_names",
    "labels_by_output",
    "LabelError",
    "LabelMap",
    "load_label_map",
    "apply_label_map",
    "invert_label_map",
    "UNKNOWN_LABELS",
]

PathLike = Union[str, os.PathLike]

#: Name of the full-resolution output (and of its labels).
SEGMENTATION = "segmentation"
#: What to do with label values a label map does not list.
UNKNOWN_LABELS = ("raise", "background")


class LabelError(InputError):
    """A label map or label values are unusable; the message names the file and the id."""


def aux_name(level: int) -> str:
    """Name of the auxiliary output at ``1 / 2**level`` resolution (``"aux_1"``, ...)."""
    return f"aux_{int(level)}"


def output_names(aux_outputs: int) -> list:
    """``["segmentation", "aux_1", ..., "aux_<n>"]`` for a model with ``n`` auxiliary heads."""
    return [SEGMENTATION] + [aux_name(k) for k in range(1, int(aux_outputs) + 1)]


def labels_by_output(labels, aux_outputs: int):
    """The labels as a model with ``aux_outputs`` heads is fitted on: the tensor itself, or
    ``{output name: labels}`` with the same full-resolution labels under every name (the
    auxiliary losses average them down to their resolution, see ``downsample_labels`` in
    :mod:`tf_explog.losses`)."""
    if not aux_outputs:
        return labels
    return {name: labels for name in output_names(aux_outputs)}


# --------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class LabelMap:
    """Map from contiguous class indices to the original label ids they merge.

    ``LabelMap({1: [2, 41], 2: [3, 42]})`` makes class 1 of FreeSurfer's left and right
    cerebral white matter (2, 41) and class 2 of the cortex (3, 42). Class 0 is background:
    original id 0 maps to 0 unless listed elsewhere.

    Attributes:
        mapping: ``{class: (original ids, ...)}`` with classes ``>= 0``.
        source: where the map came from (named in error messages).
    """

    mapping: Mapping
    source: str = "label_map"

    def __post_init__(self) -> None:
        where = self.source
        clean, seen = {}, {}
        if not isinstance(self.mapping, Mapping):
            raise LabelError(f"{where}: expected an object {{class index: [original ids]}}, "
                             f"got {type(self.mapping).__name__}")
        for key, values in self.mapping.items():
            # JSON turns integer keys into strings, so "1" is accepted like 1.
            if _is_int(key):
                new_id = int(key)
            elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
                new_id = int(key)
            else:
                raise LabelError(f"{where}: key {key!r} is not an integer class index")
            if new_id < 0:
                raise LabelError(f"{where}: class {key!r} must be a non-negative integer")
            if _is_int(values):
                values = [values]
            if not isinstance(values, Iterable) or isinstance(values, (str, bytes)):
                raise LabelError(f"{where}: class {new_id} must list integer original ids")
            ids = []
            for v in values:
                if not _is_int(v):
                    raise LabelError(f"{where}: id {v!r} of class {new_id} is not an integer")
                v = int(v)
                if v in seen and seen[v] != new_id:
                    raise LabelError(f"{where}: original id {v} is listed under both class "
                                     f"{seen[v]} and {new_id}")
                if v in ids:
                    raise LabelError(f"{where}: original id {v} is listed twice in class "
                                     f"{new_id}")
                seen[v] = new_id
                ids.append(v)
            if not ids:
                raise LabelError(f"{where}: class {new_id} lists no original ids")
            if new_id in clean:
                raise LabelError(f"{where}: class {new_id} appears twice")
            clean[new_id] = tuple(ids)
        object.__setattr__(self, "mapping", dict(sorted(clean.items())))

    def __eq__(self, other) -> bool:  # the source is not part of the map's identity
        return isinstance(other, LabelMap) and self.mapping == other.mapping

    def __hash__(self) -> int:
        return hash(tuple(self.mapping.items()))

    @classmethod
    def coerce(cls, label_map: "LabelMap | Mapping", source: str = "label_map") -> "LabelMap":
        """``label_map`` as a LabelMap (JSON dicts with string keys are accepted)."""
        return label_map if isinstance(label_map, LabelMap) else cls(label_map, source)

    @property
    def num_classes(self) -> int:
        """Number of classes including background 0: ``max class + 1``."""
        return max(self.mapping, default=0) + 1

    @property
    def original_ids(self) -> set:
        """Every original id the map lists."""
        return {v for ids in self.mapping.values() for v in ids}

    def forward_table(self) -> dict:
        """``{original id: class}`` (0 -> 0 unless 0 is listed)."""
        table = {0: 0}
        for new_id, values in self.mapping.items():
            for v in values:
                table[v] = new_id
        return table

    def check_classes(self, class_ids: Iterable[int]) -> None:
        """Raises :class:`LabelError` when the map names a class outside ``class_ids``."""
        allowed = set(int(c) for c in class_ids)
        extra = sorted(set(self.mapping) - allowed)
        if extra:
            raise LabelError(f"{self.source}: class(es) {extra} are not in the data set's "
                             f"labels {sorted(allowed)}")

    def to_dict(self) -> dict:
        """JSON-able form: ``{"1": [2, 41], ...}``."""
        return {str(k): list(v) for k, v in self.mapping.items()}


def load_label_map(path: PathLike) -> LabelMap:
    """Read a label map file: JSON ``{"class index": [original ids, ...], ...}``.

    Raises:
        LabelError: missing or unreadable file, invalid JSON, a class given twice, an
            original id listed twice, non-integer keys or ids (each naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: label map file not found")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise LabelError(f"{path}: class {', '.join(twice)} appears twice")
        return dict(pairs)

    try:
        raw = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelError(f"{path}: not a readable JSON label map ({err})") from None
    except RecursionError:
        raise LabelError(f"{path}: not a readable JSON label map (nested too deeply)") from None
    return LabelMap(raw, source=str(path))


def apply_label_map(
    labels: np.ndarray,
    label_map: "LabelMap | Mapping",
    unknown: str = "background",
    *,
    source: PathLike = "",
) -> np.ndarray:
    """Turn original label ids into class indices.

    Args:
        labels: integer array of original ids.
        label_map: ``{class: [original ids]}`` or a :class:`LabelMap`.
        unknown: ids that are neither 0 nor listed: "background" maps them to 0, "raise"
            raises a :class:`LabelError` listing them.
        source: file name used in error messages.

    Returns:
        int32 array of class indices, same shape.
    """
    if unknown not in UNKNOWN_LABELS:
        raise LabelError(f"unknown_labels must be one of {UNKNOWN_LABELS}, got {unknown!r}")
    lm = LabelMap.coerce(label_map)
    labels = np.asarray(labels)
    name = os.fspath(source) or "labels"
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelError(f"{name}: labels must be integers, got {labels.dtype}")
    table = lm.forward_table()
    values, inverse = np.unique(labels, return_inverse=True)
    missing = [int(v) for v in values if int(v) not in table]
    if missing and unknown == "raise":
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise LabelError(f"{name}: label values not in the label map: {shown} "
                         f"(map lists {sorted(table)}; data.unknown_labels: background maps "
                         "them to 0)")
    new_values = np.array([table.get(int(v), 0) for v in values], dtype=np.int32)
    return new_values[inverse].reshape(labels.shape)


def invert_label_map(labels: np.ndarray, label_map: "LabelMap | Mapping") -> np.ndarray:
    """Map class indices back to original ids, each class to the *first* id it lists.

    A class that merges several ids (left and right, say) cannot be split again: it is
    written with its first id (``{1: [2, 41]}`` writes 2).

    Raises:
        LabelError: a class is not in the map.
    """
    lm = LabelMap.coerce(label_map)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelError(f"labels: expected integer class indices, got {labels.dtype}")
    table = {0: 0}
    table.update({k: v[0] for k, v in lm.mapping.items()})
    values, inverse = np.unique(labels, return_inverse=True)
    bad = [int(v) for v in values if int(v) not in table]
    if bad:
        raise LabelError(f"labels: classes {bad} are not in the label map "
                         f"(classes {sorted(table)})")
    out = np.array([table[int(v)] for v in values], dtype=np.int32)
    return out[inverse].reshape(labels.shape)


def label_names_or_ids(label_names: Optional[Sequence[str]], num_classes: int) -> list:
    """The given names, or ``["0", "1", ...]``."""
    return list(label_names) if label_names is not None else [str(i) for i in range(num_classes)]
