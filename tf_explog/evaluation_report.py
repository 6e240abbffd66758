"""The evaluation report: ``metrics.csv`` (one row per subject × structure), ``summary.csv``
(per structure, size group and overall), ``report.md`` (one markdown table) and
``dice_boxplot.png``, each written atomically.

Formats an :class:`~tf_explog.evaluation_metrics.EvaluationResult`; computes nothing.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tf_explog.evaluation_metrics import METRIC_COLUMNS, SUMMARY_COLUMNS, EvaluationResult
from tf_explog.files import atomic_write
from tf_explog.plots import dice_boxplot_png

__all__ = ["OUTPUT_FILES", "format_report", "write_evaluation"]

OUTPUT_FILES = {
    "metrics": "metrics.csv",
    "summary": "summary.csv",
    "report": "report.md",
    "boxplot": "dice_boxplot.png",
}


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
        "boxplot": dice_boxplot_png(result.structures, result.rows),
    }
    for key, data in contents.items():
        atomic_write(targets[key], data)
    result.outputs = {key: str(path) for key, path in targets.items()}
    return result
