"""Per-structure segmentation metrics of 3D label maps — Dice, HD95 and ASSD in mm, volumes —
and their aggregation over subjects and size groups.

Pure NumPy/SciPy (no TensorFlow, no files): :func:`structure_metrics` scores one pair of
label volumes, :func:`aggregate` summarises the rows. Reading the volumes is
:mod:`tf_explog.evaluation`'s, writing the report :mod:`tf_explog.evaluation_report`'s.

Definitions (for one structure with masks ``T`` = truth, ``P`` = prediction):

- Dice = 2 |T ∩ P| / (|T| + |P|).
- Surface of a mask ``M``: ``M`` minus its binary erosion by the structuring element
  ``scipy.ndimage.generate_binary_structure(3, connectivity)``, with voxels outside the image
  counted as background (so a structure touching the image border has a surface there).
  The default ``connectivity=1`` (6 face neighbours) makes a voxel a surface voxel when at least
  one of its 6 face neighbours is outside the mask (as MedPy does); 2 and 3 give thicker surfaces.
- Surface distances, in mm: for every surface voxel of ``T`` the Euclidean distance to the
  nearest surface voxel of ``P``, and vice versa, from
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` so anisotropic spacing is
  respected. The two directed sets are pooled into one set of symmetric surface distances.
- HD95 = ``numpy.percentile(pooled, 95)`` (linear interpolation); ASSD = mean of the pooled
  distances, i.e. (Σ d(T→P) + Σ d(P→T)) / (|∂T| + |∂P|) (Heimann et al., IEEE TMI 2009).
- Volumes in mm³ = voxel count × product of the spacing; relative volume difference
  RVD = (V_pred − V_truth) / V_truth.

Rules for absent structures (``status`` column):

- ``both_present``: everything as above.
- ``both_absent`` (in neither volume): the prediction is exactly right, so Dice = 1,
  HD95 = ASSD = 0 and RVD = 0; these count in every mean.
- ``missing_in_pred`` (in the truth only) or ``missing_in_truth`` (in the prediction only):
  Dice = 0 (counted in the Dice means); HD95 and ASSD are undefined (NaN), **excluded** from
  the distance means/medians and counted in ``n_distance_undefined``; RVD = −1 when missing
  in the prediction, NaN (undefined, excluded) when missing in the truth.

Aggregation: per structure, mean ± SD (sample SD, ddof = 1; NaN with fewer than two values) and
median over subjects; size groups are terciles of the structures' mean ground-truth volume
(sorted ascending, ties by label id; the structure of rank r of n goes to group ⌊3r/n⌋ =
small / medium / large); group and overall statistics pool every (subject, structure) case of
their structures, so the overall mean Dice is the mean over subjects and structures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from tf_explog.errors import EvaluationError

__all__ = ["EvaluationResult", "METRIC_COLUMNS", "SUMMARY_COLUMNS", "SIZE_GROUPS",
           "structure_metrics", "size_groups", "aggregate"]

SIZE_GROUPS = ("small", "medium", "large")

#: Columns of ``metrics.csv`` (one row per subject × structure), in order.
METRIC_COLUMNS = (
    "subject",
    "label",
    "name",
    "status",
    "dice",
    "hd95_mm",
    "assd_mm",
    "volume_truth_mm3",
    "volume_pred_mm3",
    "relative_volume_difference",
    "voxels_truth",
    "voxels_pred",
    "truth_fraction",
)

#: Columns of ``summary.csv`` (one row per structure, per size group, and one overall row).
SUMMARY_COLUMNS = (
    "level",
    "label",
    "name",
    "size_group",
    "n_structures",
    "n_cases",
    "voxel_fraction_mean",
    "volume_truth_mm3_mean",
    "dice_mean",
    "dice_sd",
    "dice_median",
    "hd95_mm_mean",
    "hd95_mm_sd",
    "hd95_mm_median",
    "assd_mm_mean",
    "assd_mm_sd",
    "assd_mm_median",
    "rvd_mean",
    "rvd_sd",
    "n_distance_undefined",
)

#: Files written by :func:`evaluate_dirs` (key → file name).


@dataclass
class EvaluationResult:
    """What an evaluation produced, as plain lists of dicts (no pandas needed).

    Attributes:
        rows: one dict per subject × structure with the keys of ``METRIC_COLUMNS``.
        structures: one summary dict per structure (keys of ``SUMMARY_COLUMNS``), sorted by
            mean ground-truth volume, smallest first.
        groups: one summary dict per size group (small, medium, large; empty groups omitted).
        overall: the summary dict pooled over all subjects and structures.
        outputs: written files (key of ``OUTPUT_FILES`` → path); empty when nothing was written.
    """

    rows: list[dict[str, Any]]
    structures: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    overall: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)

    def summary_rows(self) -> list[dict[str, Any]]:
        """Return the rows of ``summary.csv``: structures, then size groups, then overall."""
        return [*self.structures, *self.groups, self.overall]


# --------------------------------------------------------------------------------------------
# Metrics of one volume pair
# --------------------------------------------------------------------------------------------


def _check_spacing(spacing: Sequence[float], where: str = "spacing") -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise EvaluationError(f"{where}: expected 3 positive voxel sizes in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise EvaluationError(f"{where}: expected 3 positive finite voxel sizes in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _as_label_volume(volume: Any, what: str) -> np.ndarray:
    """Return ``volume`` as a 3D non-negative int64 array, or raise naming ``what``."""
    arr = np.asarray(volume)
    # NIfTI label maps are sometimes saved with a trailing singleton (time/channel) axis.
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise EvaluationError(f"{what}: expected a 3D label volume [D, H, W], got shape {np.shape(volume)}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise EvaluationError(f"{what}: expected integer label ids, found non-integer values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise EvaluationError(f"{what}: expected integer label ids, got dtype {arr.dtype}")
    else:
        arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise EvaluationError(f"{what}: expected non-negative label ids, found {int(arr.min())}")
    return arr


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    # border_value=0: outside the image is background, so border voxels are surface voxels.
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(
    truth_mask: np.ndarray, pred_mask: np.ndarray, spacing: tuple[float, float, float], structure: np.ndarray
) -> np.ndarray:
    """Return the pooled symmetric surface distances (mm) of two non-empty masks."""
    s_truth = _surface(truth_mask, structure)
    s_pred = _surface(pred_mask, structure)
    # EDT of the complement of a surface = distance from each voxel to that surface's nearest voxel.
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)[s_truth]
    to_truth = ndimage.distance_transform_edt(~s_truth, sampling=spacing)[s_pred]
    return np.concatenate([to_pred, to_truth]).astype(np.float64)


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    boxes = [box for box in (a, b) if box is not None]
    return tuple(
        slice(min(box[i].start for box in boxes), max(box[i].stop for box in boxes)) for i in range(3)
    )


def structure_metrics(
    pred: Any,
    truth: Any,
    labels: Iterable[int],
    spacing: Sequence[float],
    connectivity: int = 1,
) -> list[dict[str, Any]]:
    """Compute Dice, HD95, ASSD (mm) and volumes for each structure id of one volume pair.

    See the module docstring for the definitions and the rules for absent structures.

    Args:
        pred: predicted label map, integer ids ``[D, H, W]``.
        truth: ground-truth label map, same shape.
        labels: structure ids to evaluate (e.g. ``range(1, C)``; include 0 only if you want the
            background scored too). A mapping's keys are used.
        spacing: voxel size in mm along the three array axes.
        connectivity: 1, 2 or 3, the neighbourhood of the erosion that defines surfaces.

    Returns:
        One dict per id, in the order given, with keys ``label``, ``status``, ``dice``,
        ``hd95_mm``, ``assd_mm``, ``volume_truth_mm3``, ``volume_pred_mm3``,
        ``relative_volume_difference``, ``voxels_truth``, ``voxels_pred``, ``truth_fraction``
        (truth voxels / all voxels).

    Raises:
        EvaluationError: shapes differ, a volume is not 3D integer labels, bad spacing,
            connectivity or label id.
    """
    spacing_t = _check_spacing(spacing)
    if connectivity not in (1, 2, 3):
        raise EvaluationError(f"connectivity: expected 1, 2 or 3, got {connectivity!r}")
    pred_a = _as_label_volume(pred, "pred")
    truth_a = _as_label_volume(truth, "truth")
    if pred_a.shape != truth_a.shape:
        raise EvaluationError(f"pred and truth: shapes differ, {pred_a.shape} vs {truth_a.shape}")
    ids = []
    for label in labels:
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or label < 0:
            raise EvaluationError(f"labels: expected non-negative integer ids, got {label!r}")
        ids.append(int(label))

    structure = ndimage.generate_binary_structure(3, connectivity)
    voxel_mm3 = float(np.prod(spacing_t))
    n_voxels = truth_a.size
    top = max(ids, default=0)
    # One pass each for bounding boxes; each structure's work is then cropped to its box, which
    # is exact: outside the union box both masks are empty, like the zero border of the erosion.
    boxes_truth = ndimage.find_objects(truth_a, max_label=top) if top > 0 else []
    boxes_pred = ndimage.find_objects(pred_a, max_label=top) if top > 0 else []

    results = []
    for label in ids:
        if label == 0:
            box: tuple[slice, ...] = tuple(slice(0, n) for n in truth_a.shape)
            present_t, present_p = bool((truth_a == 0).any()), bool((pred_a == 0).any())
        else:
            bt, bp = boxes_truth[label - 1], boxes_pred[label - 1]
            present_t, present_p = bt is not None, bp is not None
            box = _union_box(bt, bp) if (present_t or present_p) else ()
        if present_t or present_p:
            t = truth_a[box] == label
            p = pred_a[box] == label
            n_t, n_p = int(t.sum()), int(p.sum())
            n_both = int(np.count_nonzero(t & p))
        else:
            n_t = n_p = n_both = 0

        if n_t and n_p:
            status = "both_present"
            dice = 2.0 * n_both / (n_t + n_p)
            dists = _surface_distances(t, p, spacing_t, structure)
            hd95, assd = float(np.percentile(dists, 95)), float(dists.mean())
            rvd = (n_p - n_t) / n_t
        elif not n_t and not n_p:
            status, dice, hd95, assd, rvd = "both_absent", 1.0, 0.0, 0.0, 0.0
        elif n_t:
            status, dice, hd95, assd, rvd = "missing_in_pred", 0.0, math.nan, math.nan, -1.0
        else:
            status, dice, hd95, assd, rvd = "missing_in_truth", 0.0, math.nan, math.nan, math.nan

        results.append(
            {
                "label": label,
                "status": status,
                "dice": float(dice),
                "hd95_mm": hd95,
                "assd_mm": assd,
                "volume_truth_mm3": n_t * voxel_mm3,
                "volume_pred_mm3": n_p * voxel_mm3,
                "relative_volume_difference": float(rvd),
                "voxels_truth": n_t,
                "voxels_pred": n_p,
                "truth_fraction": n_t / n_voxels,
            }
        )
    return results


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def size_groups(mean_volumes: Mapping[int, float]) -> dict[int, str]:
    """Assign structures to terciles of their mean ground-truth volume.

    Structures are sorted by volume ascending (ties by id); rank ``r`` of ``n`` goes to group
    ``⌊3 r / n⌋`` → ``"small"``, ``"medium"``, ``"large"`` (19 structures → 7 / 6 / 6).

    Args:
        mean_volumes: structure id → mean ground-truth volume (any unit).

    Returns:
        Structure id → group name.
    """
    order = sorted(mean_volumes, key=lambda label: (mean_volumes[label], label))
    n = len(order)
    return {label: SIZE_GROUPS[3 * rank // n] for rank, label in enumerate(order)}


def _stats(values: Iterable[float]) -> tuple[float, float, float]:
    """Return mean, sample SD (ddof=1) and median of the finite values (NaN when undefined)."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    sd = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return float(arr.mean()), sd, float(np.median(arr))


def _summarise(cases: list[dict[str, Any]], **identity: Any) -> dict[str, Any]:
    out = {column: "" for column in SUMMARY_COLUMNS}
    out.update(identity)
    out["n_cases"] = len(cases)
    out["n_structures"] = len({case["label"] for case in cases})
    for key, column in (("truth_fraction", "voxel_fraction_mean"), ("volume_truth_mm3", "volume_truth_mm3_mean")):
        out[column] = float(np.mean([c[key] for c in cases])) if cases else math.nan
    for key, prefix in (("dice", "dice"), ("hd95_mm", "hd95_mm"), ("assd_mm", "assd_mm")):
        mean, sd, median = _stats(c[key] for c in cases)
        out[f"{prefix}_mean"], out[f"{prefix}_sd"], out[f"{prefix}_median"] = mean, sd, median
    rvd_mean, rvd_sd, _ = _stats(c["relative_volume_difference"] for c in cases)
    out["rvd_mean"], out["rvd_sd"] = rvd_mean, rvd_sd
    out["n_distance_undefined"] = sum(1 for c in cases if not math.isfinite(c["hd95_mm"]))
    return out


def aggregate(rows: Sequence[Mapping[str, Any]]) -> EvaluationResult:
    """Summarise per-subject per-structure rows by structure, by size group and overall.

    Args:
        rows: dicts with at least ``label``, ``name``, ``dice``, ``hd95_mm``, ``assd_mm``,
            ``volume_truth_mm3``, ``truth_fraction``, ``relative_volume_difference``
            (e.g. the rows of :func:`evaluate_pairs`, or :func:`structure_metrics` dicts with a
            ``name`` and ``subject`` added).

    Returns:
        An :class:`EvaluationResult` (``outputs`` empty). Structure rows are sorted by mean
        ground-truth volume, smallest first.
    """
    rows = [dict(row) for row in rows]
    by_label: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(int(row["label"]), []).append(row)
    volumes = {
        label: float(np.mean([c["volume_truth_mm3"] for c in cases])) for label, cases in by_label.items()
    }
    groups_of = size_groups(volumes) if volumes else {}

    structures = [
        _summarise(
            by_label[label],
            level="structure",
            label=label,
            name=by_label[label][0].get("name", str(label)),
            size_group=groups_of[label],
        )
        for label in sorted(by_label, key=lambda label: (volumes[label], label))
    ]
    groups = []
    for group in SIZE_GROUPS:
        cases = [row for row in rows if groups_of[int(row["label"])] == group]
        if cases:
            groups.append(_summarise(cases, level="size_group", name=group, size_group=group))
    overall = _summarise(rows, level="overall", name="overall")
    return EvaluationResult(rows=rows, structures=structures, groups=groups, overall=overall)
