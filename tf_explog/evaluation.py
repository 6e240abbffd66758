"""Per-structure evaluation of 3D label maps: Dice, HD95 and ASSD in mm, volumes, reports.

Pure NumPy/SciPy/nibabel/matplotlib (no TensorFlow), so reports can be made anywhere.

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

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from tf_explog.data.nifti import list_nifti_files, nifti_stem, voxel_spacing
from tf_explog.errors import InputError
from tf_explog.files import atomic_write

__all__ = [
    "EvaluationError",
    "EvaluationResult",
    "METRIC_COLUMNS",
    "SUMMARY_COLUMNS",
    "OUTPUT_FILES",
    "SIZE_GROUPS",
    "structure_metrics",
    "size_groups",
    "aggregate",
    "evaluate_pairs",
    "evaluate_dirs",
    "format_report",
    "write_evaluation",
]

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
OUTPUT_FILES = {
    "metrics": "metrics.csv",
    "summary": "summary.csv",
    "report": "report.md",
    "boxplot": "dice_boxplot.png",
}



class EvaluationError(InputError):
    """Bad evaluation input: mismatched grids, unmatched files, invalid label volumes."""


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


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _normalise_label_names(label_names: Mapping[int, str] | Sequence[str], where: str) -> dict[int, str]:
    """Return structure id → name without the background (id 0)."""
    if isinstance(label_names, Mapping):
        items = list(label_names.items())
    elif isinstance(label_names, Sequence) and not isinstance(label_names, (str, bytes)):
        items = list(enumerate(label_names))
    else:
        raise EvaluationError(f"{where}: expected a mapping id → name or a list of names, got {label_names!r}")
    out: dict[int, str] = {}
    for label, name in items:
        try:
            label_id = int(label)
        except (TypeError, ValueError):
            raise EvaluationError(f"{where}: label id {label!r} is not an integer") from None
        if label_id < 0 or str(label_id) != str(label).strip():
            raise EvaluationError(f"{where}: label id {label!r} is not a non-negative integer")
        if not isinstance(name, str) or not name:
            raise EvaluationError(f"{where}: name of label {label_id} must be a non-empty string, got {name!r}")
        if label_id != 0:
            out[label_id] = name
    if not out:
        raise EvaluationError(f"{where}: no structure ids besides the background (0)")
    return dict(sorted(out.items()))


def _load_labels(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI label map as stored; return (int64 [D, H, W] ids, 4×4 affine)."""
    from tf_explog.data.nifti import read_array

    data, affine = read_array(path)
    return _as_label_volume(data, str(path)), affine


def evaluate_pairs(
    pairs: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]],
    label_names: Mapping[int, str] | Sequence[str] | None,
    connectivity: int = 1,
    affine_atol: float = 1e-3,
    *,
    label_map=None,
    unknown_labels: str = "raise",
    pred_ids: str = "original",
) -> EvaluationResult:
    """Evaluate NIfTI prediction/truth pairs per subject and structure, then aggregate.

    With a label map the comparison is made in class space whatever ids the files hold: the
    truth's original ids are mapped to classes (ids the map does not list: an error, or
    background with ``unknown_labels="background"``), and so are the predictions' unless
    they already hold class indices (``pred_ids="class"``, as ``tf-explog predict --ids
    class`` writes them). ``overall["dice_mean_with_background"]`` is the mean Dice over all
    labels, background included (the paper's mean over 20 labels); ``overall["dice_mean"]``
    leaves the background out.

    Args:
        pairs: ``(subject, pred_path, truth_path)`` triples; subject names must be unique.
        label_names: id → name mapping, or a list of names indexed by id (index 0 =
            background), in class space when there is a label map. Id 0 is never scored as
            a structure. ``None``: every non-zero id found in any truth or prediction, named
            ``label_<id>``.
        connectivity: erosion neighbourhood for surfaces (see :func:`structure_metrics`).
        affine_atol: largest allowed absolute difference (mm) between the two affines.
        label_map: a :class:`~tf_explog.labels.LabelMap`, its dict, or None.
        unknown_labels: "raise" or "background", for truth ids outside the label map.
        pred_ids: "original" (predictions hold original ids) or "class".

    Returns:
        An :class:`EvaluationResult`; ``rows`` ordered by subject (as given) then label id.

    Raises:
        EvaluationError: grids differ (names both files), ids outside ``label_names``, bad
            or duplicated subjects, unreadable files.
        FileNotFoundError: a file does not exist.
    """
    if not pairs:
        raise EvaluationError("pairs: expected at least one (subject, pred_path, truth_path)")
    seen: set[str] = set()
    for i, pair in enumerate(pairs):
        if len(pair) != 3:
            raise EvaluationError(f"pairs[{i}]: expected (subject, pred_path, truth_path), got {pair!r}")
        if pair[0] in seen:
            raise EvaluationError(f"pairs[{i}]: subject {pair[0]!r} appears more than once")
        seen.add(pair[0])

    if label_names is None:
        found: set[int] = set()
        for _, pred_path, truth_path in pairs:
            for path in (truth_path, pred_path):
                found.update(int(v) for v in np.unique(_load_labels(path)[0]))
        found.discard(0)
        if not found:
            raise EvaluationError("no structure ids besides the background (0) in any file")
        names = {label: f"label_{label}" for label in sorted(found)}
    else:
        names = _normalise_label_names(label_names, "label_names")
    allowed = set(names) | {0}
    if pred_ids not in ("original", "class"):
        raise EvaluationError(f"pred_ids: expected 'original' or 'class', got {pred_ids!r}")
    if label_map is not None:
        from tf_explog.labels import LabelMap, apply_label_map

        label_map = LabelMap.coerce(label_map)

    rows: list[dict[str, Any]] = []
    background: list[float] = []
    for subject, pred_path, truth_path in pairs:
        truth, truth_affine = _load_labels(truth_path)
        pred, pred_affine = _load_labels(pred_path)
        if label_map is not None:
            truth = apply_label_map(truth, label_map, unknown_labels, source=truth_path)
            if pred_ids == "original":
                pred = apply_label_map(pred, label_map, "raise", source=pred_path)
        if pred.shape != truth.shape:
            raise EvaluationError(
                f"grids differ: prediction {pred_path} has shape {pred.shape}, "
                f"truth {truth_path} has {truth.shape}"
            )
        if not np.allclose(pred_affine, truth_affine, rtol=0.0, atol=affine_atol):
            raise EvaluationError(
                f"grids differ: affines of prediction {pred_path} and truth {truth_path} differ by up to "
                f"{np.abs(pred_affine - truth_affine).max():.4g} mm (tolerance {affine_atol} mm)\n"
                f"prediction:\n{pred_affine}\ntruth:\n{truth_affine}"
            )
        for volume, path in ((truth, truth_path), (pred, pred_path)):
            extra = sorted(set(np.unique(volume).tolist()) - allowed)
            if extra:
                hint = ("" if label_map is not None else
                        "; pass the data set's label map (--label-map FILE) when the files "
                        "hold original ids")
                raise EvaluationError(
                    f"{path}: label ids {extra} are not in the label names {sorted(allowed)}"
                    f"{hint}"
                )
        spacing = voxel_spacing(truth_affine)
        subject_rows = structure_metrics(pred, truth, names, spacing, connectivity=connectivity)
        for metrics in subject_rows:
            rows.append({"subject": subject, "name": names[metrics["label"]], **metrics})
        t0, p0 = truth == 0, pred == 0
        denominator = int(t0.sum()) + int(p0.sum())
        dice0 = 1.0 if denominator == 0 else 2.0 * int((t0 & p0).sum()) / denominator
        background.append((dice0 + sum(r["dice"] for r in subject_rows)) / (1 + len(subject_rows)))
    result = aggregate(rows)
    result.overall["dice_mean_with_background"] = float(np.mean(background))
    return result


def _nifti_files(directory: Path, what: str) -> dict[str, Path]:
    """Return stem → path of the NIfTI files directly in ``directory``."""
    files: dict[str, Path] = {}
    for path in list_nifti_files(directory, what):
        stem = nifti_stem(path.name)
        if stem in files:
            raise EvaluationError(f"{directory}: both {files[stem].name} and {path.name} name "
                                  f"subject {stem!r}")
        files[stem] = path
    return files


def _labels_from_dataset_json(labels: Any, where: str) -> dict[int, str]:
    if not isinstance(labels, Mapping) or not labels:
        raise EvaluationError(f"{where}: 'labels' must be a non-empty object mapping ids to names")
    # MSD writes {"0": "background", ...}; nnU-Net v2 writes {"background": 0, ...}.
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        return _normalise_label_names({v: k for k, v in labels.items()}, f"{where}: 'labels'")
    return _normalise_label_names(labels, f"{where}: 'labels'")


def _truth_from_dataset_json(path: Path) -> tuple[list, dict[int, str], Any]:
    """Return [(subject, truth_path, candidate prediction stems)], label names and the
    ``label_map`` entry (or None) from ``path``."""
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise EvaluationError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(spec, Mapping):
        raise EvaluationError(f"{path}: expected a JSON object with 'labels' and 'test'")
    names = _labels_from_dataset_json(spec.get("labels"), str(path))
    tests = spec.get("test")
    if not isinstance(tests, list) or not tests:
        raise EvaluationError(f"{path}: 'test' must be a non-empty list of {{\"image\": ..., \"label\": ...}} entries")
    cases = []
    for i, entry in enumerate(tests):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("label"), str):
            raise EvaluationError(
                f"{path}: 'test' entry {i} ({entry!r}) has no 'label'; evaluation needs test entries of the "
                'form {"image": ..., "label": ...}'
            )
        truth_path = (path.parent / entry["label"]).resolve()
        if not truth_path.is_file():
            raise FileNotFoundError(f"{path}: 'test' entry {i}: label file {truth_path} not found")
        stems = [nifti_stem(truth_path.name) or truth_path.name]
        # Predictions are usually named after the input image, which may differ from the label.
        if isinstance(entry.get("image"), str):
            image_stem = nifti_stem(Path(entry["image"]).name)
            if image_stem and image_stem not in stems:
                stems.append(image_stem)
        cases.append((stems[0], truth_path, stems))
    return cases, names, spec.get("label_map")


def _match_predictions(
    cases: list[tuple[str, Path, list[str]]], pred_dir: Path, truth_desc: str
) -> list[tuple[str, Path, Path]]:
    preds = _nifti_files(pred_dir, "prediction")
    subjects = [case[0] for case in cases]
    duplicated = sorted({s for s in subjects if subjects.count(s) > 1})
    if duplicated:
        raise EvaluationError(f"{truth_desc}: subjects {duplicated} appear more than once")
    pairs, used, missing = [], set(), []
    for subject, truth_path, stems in cases:
        stem = next((s for s in stems if s in preds), None)
        if stem is None:
            missing.append(str(truth_path))
            continue
        used.add(stem)
        pairs.append((subject, preds[stem], truth_path))
    problems = []
    if missing:
        problems.append(f"no prediction in {pred_dir} for truth file(s): {', '.join(missing)}")
    unmatched = [str(preds[s]) for s in preds if s not in used]
    if unmatched:
        problems.append(f"prediction file(s) with no truth in {truth_desc}: {', '.join(unmatched)}")
    if problems:
        raise EvaluationError("; ".join(problems))
    return pairs


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # NaN (undefined distance/RVD) is written as an empty cell, which CSV readers take as missing.
        writer.writerow({c: "" if _is_nan(row.get(c)) else row.get(c, "") for c in columns})
    return buffer.getvalue()


def _fmt(value: Any, digits: int) -> str:
    return "–" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_pm(mean: Any, sd: Any, digits: int) -> str:
    if not isinstance(mean, (int, float)) or not math.isfinite(mean):
        return "–"
    return _fmt(mean, digits) + (f" ± {_fmt(sd, digits)}" if isinstance(sd, float) and math.isfinite(sd) else "")


def format_report(result: EvaluationResult, title: str = "Per-structure evaluation",
                  source: Optional[str] = None) -> str:
    """Render the markdown report: one table, structures by size, size groups, overall.

    Args:
        result: an :class:`EvaluationResult`.
        title: first heading of the report.
        source: what was evaluated (e.g. the checkpoint that made the predictions), shown
            under the title.

    Returns:
        Markdown text.
    """
    n_subjects = len({row["subject"] for row in result.rows}) if result.rows else 0
    lines = [f"# {title}", ""]
    if source:
        lines += [source, ""]
    lines += [
        f"{n_subjects} subject(s), {len(result.structures)} structure(s). Dice in mean ± SD "
        "(sample SD) over subjects; HD95 and ASSD in mm; structures sorted by size "
        "(voxel fraction = mean share of the volume's voxels in the ground truth). Per-case "
        "rows (with volumes and the relative volume difference) are in metrics.csv, "
        "per-structure statistics in summary.csv, the Dice spread in dice_boxplot.png.",
        "",
        "| Structure | Id | Size group | Voxel fraction (%) | Dice mean ± SD | Dice median "
        "| HD95 mm mean ± SD | ASSD mm mean ± SD | Dist. undefined |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def line(row: Mapping[str, Any], name: str, label: str) -> str:
        return (
            f"| {name} | {label} | {row['size_group']} | {_fmt(100 * row['voxel_fraction_mean'], 3)} "
            f"| {_fmt_pm(row['dice_mean'], row['dice_sd'], 3)} | {_fmt(row['dice_median'], 3)} "
            f"| {_fmt_pm(row['hd95_mm_mean'], row['hd95_mm_sd'], 2)} "
            f"| {_fmt_pm(row['assd_mm_mean'], row['assd_mm_sd'], 2)} "
            f"| {row['n_distance_undefined']}/{row['n_cases']} |"
        )

    for row in result.structures:
        lines.append(line(row, str(row["name"]).replace("|", "/"), str(row["label"])))
    for row in result.groups:
        lines.append(line(row, f"**{row['name']} ({row['n_structures']} structures)**", ""))
    lines.append(line({**result.overall, "size_group": ""}, "**overall**", ""))
    with_background = result.overall.get("dice_mean_with_background")
    if with_background is not None:
        lines += ["", f"Mean Dice over the {len(result.structures)} structures: "
                  f"{_fmt(result.overall['dice_mean'], 3)}; over all "
                  f"{len(result.structures) + 1} labels, background included (the paper's "
                  f"convention): {_fmt(with_background, 3)}."]
    lines += [
        "",
        "Size groups are terciles of the structures' mean ground-truth volume; group and overall rows "
        "pool every subject × structure case. A structure absent from both volumes scores Dice 1 and "
        "distance 0; absent from exactly one, Dice 0 and undefined distances, which are left out of "
        "the distance statistics and counted in *Dist. undefined*.",
        "",
    ]
    return "\n".join(lines)


def _boxplot_png(result: EvaluationResult) -> bytes:
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [str(row["name"]) for row in result.structures]
    values = [[r["dice"] for r in result.rows if r["label"] == row["label"]] for row in result.structures]
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.boxplot(values)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Dice per structure (sorted by size, smallest first)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def evaluate_dirs(
    pred_dir: str | os.PathLike,
    truth: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_names: Mapping[int, str] | Sequence[str] | None = None,
    overwrite: bool = False,
    connectivity: int = 1,
    *,
    label_map=None,
    unknown_labels: str = "raise",
    pred_ids: str = "original",
) -> EvaluationResult:
    """Evaluate a directory of predicted label maps and write the report files.

    Args:
        pred_dir: directory of predicted NIfTI label maps (``.nii``/``.nii.gz``), named like
            the truth files (for a ``dataset.json``, like the label or the image file).
        truth: a directory of ground-truth NIfTI label maps matched by file name, or an MSD
            ``dataset.json`` whose ``test`` entries are ``{"image": ..., "label": ...}``
            (paths relative to the json) and whose ``labels`` give the names.
        out_dir: where ``metrics.csv``, ``summary.csv``, ``report.md`` and
            ``dice_boxplot.png`` are written (created when missing).
        label_names: id → name (or list indexed by id); overrides the json's ``labels``.
            ``None`` with a truth directory: every non-zero id found, named ``label_<id>``.
        overwrite: replace existing output files; otherwise they make this raise.
        connectivity: erosion neighbourhood for surfaces (see :func:`structure_metrics`).
        label_map: a :class:`~tf_explog.labels.LabelMap`, its dict, or a JSON file path;
            default: the dataset.json's ``label_map`` when the truth is a dataset.json.
        unknown_labels, pred_ids: see :func:`evaluate_pairs`.

    Returns:
        The :class:`EvaluationResult`, with ``outputs`` naming the written files.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false (checked before any work).
        FileNotFoundError: a directory or file does not exist.
        EvaluationError: a truth file has no prediction, a prediction has no truth, grids
            differ, or the dataset.json is invalid.
    """
    pred_dir, truth, out_dir = Path(pred_dir), Path(truth), Path(out_dir)
    targets = {key: out_dir / name for key, name in OUTPUT_FILES.items()}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"outputs exist (pass --overwrite, or overwrite=True, to replace "
                              f"them): {', '.join(existing)}")

    if truth.is_dir():
        cases = [(stem, path, [stem]) for stem, path in _nifti_files(truth, "truth").items()]
        names = label_names
    elif truth.is_file():
        cases, json_names, json_map = _truth_from_dataset_json(truth)
        names = label_names if label_names is not None else json_names
        if label_map is None and json_map is not None:
            from tf_explog.labels import LabelMap

            label_map = LabelMap(json_map, source=f"{truth}: label_map")
    else:
        raise FileNotFoundError(f"{truth}: truth directory or dataset.json not found")
    if isinstance(label_map, (str, os.PathLike)):
        from tf_explog.labels import load_label_map

        label_map = load_label_map(label_map)
    pairs = _match_predictions(cases, pred_dir, str(truth))
    result = evaluate_pairs(pairs, names, connectivity=connectivity, label_map=label_map,
                            unknown_labels=unknown_labels, pred_ids=pred_ids)

    return write_evaluation(result, out_dir, overwrite=True)


def write_evaluation(result: EvaluationResult, out_dir: str | os.PathLike, *,
                     title: str = "Per-structure evaluation", source: Optional[str] = None,
                     overwrite: bool = False) -> EvaluationResult:
    """Writes ``metrics.csv``, ``summary.csv``, ``report.md`` and ``dice_boxplot.png`` (each
    atomically) into ``out_dir``; sets and returns ``result.outputs``.

    Args:
        result: an :class:`EvaluationResult` (e.g. from :func:`evaluate_pairs`).
        out_dir: the report folder (created when missing).
        title, source: see :func:`format_report`.
        overwrite: replace existing files; otherwise an existing one raises (before any
            file is written).

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    targets = {key: out_dir / name for key, name in OUTPUT_FILES.items()}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"outputs exist (pass --overwrite, or overwrite=True, to replace "
                              f"them): {', '.join(existing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "metrics": _csv_text(result.rows, METRIC_COLUMNS).encode(),
        "summary": _csv_text(result.summary_rows(), SUMMARY_COLUMNS).encode(),
        "report": format_report(result, title=title, source=source).encode(),
        "boxplot": _boxplot_png(result),
    }
    for key, data in contents.items():
        atomic_write(targets[key], data)
    result.outputs = {key: str(path) for key, path in targets.items()}
    return result
