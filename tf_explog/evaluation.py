"""Per-structure evaluation of predicted label maps against the truth, from files.

:func:`evaluate_pairs` reads (prediction, truth) NIfTI pairs, maps original label ids to
classes and scores them with :func:`tf_explog.evaluation_metrics.structure_metrics`;
:func:`evaluate_dirs` matches a folder of predictions to a truth folder or an MSD
``dataset.json`` and writes the report (:mod:`tf_explog.evaluation_report`). The metrics'
definitions and the rules for absent structures are in :mod:`tf_explog.evaluation_metrics`.

Pure NumPy/SciPy/nibabel/matplotlib (no TensorFlow), so reports can be made anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tf_explog.data.manifest import ManifestError, parse_labels, read_dataset_json
from tf_explog.data.nifti import list_nifti_files, nifti_stem, voxel_spacing
from tf_explog.errors import EvaluationError
from tf_explog.evaluation_metrics import (  # re-exported: the evaluation API in one place
    METRIC_COLUMNS,
    SIZE_GROUPS,
    SUMMARY_COLUMNS,
    EvaluationResult,
    _as_label_volume,
    aggregate,
    size_groups,
    structure_metrics,
)
from tf_explog.evaluation_report import OUTPUT_FILES, format_report, write_evaluation

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


def _truth_from_dataset_json(path: Path) -> tuple[list, dict[int, str], Any]:
    """Return [(subject, truth_path, candidate prediction stems)], label names and the
    ``label_map`` entry (or None) from ``path``."""
    # The data set's own rules (tf_explog.data.manifest), as an EvaluationError.
    try:
        spec = read_dataset_json(path)
    except ManifestError as err:
        raise EvaluationError(err.problems[0]) from None
    problems: list = []
    labels = parse_labels(spec.get("labels"), problems)
    if problems:
        raise EvaluationError(f"{path}: {'; '.join(problems)}")
    names = _normalise_label_names(labels, f"{path}: 'labels'")
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
