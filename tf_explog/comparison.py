"""The loss-comparison report: structures × arms, summaries over splits, figures.

Input: for every arm and split the summary `tf_explog.experiments.run_arm` stores
(per-subject, per-structure evaluation rows, training history, timings). Output, in the
report directory:

    report.md              Dice per structure (mean ± SD over every test case of every split;
                           rows by size, best in bold); per arm: mean Dice over the structures
                           and with background (mean ± SD over splits), the smallest third,
                           Dice by size group, HD95, Wilcoxon p against the reference arm,
                           seconds per epoch, end-to-end and forward-only inference times
    per_subject.csv        one row per arm × split × subject × structure
    convergence.png        validation mean Dice per epoch, mean over splits (band: min-max)
    dice_by_structure.png  mean Dice per structure and arm

NumPy, SciPy and matplotlib only.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional

import numpy as np

from tf_explog.files import atomic_write

__all__ = ["write_report", "mean_sd"]

SIZE_GROUPS = ("small", "medium", "large")


def mean_sd(values) -> tuple:
    """``(mean, sample SD)`` of the finite values (NaN when there are none / fewer than 2)."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(mean, sd, digits=3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {0.0 if not math.isfinite(sd) else sd:.{digits}f}"


class _Results:
    """Rows indexed as ``(split, subject, label)`` per arm, and derived statistics."""

    def __init__(self, results: dict, arms: list) -> None:
        self.arms = arms
        self.results = results
        self.rows = {a: {(s, r["subject"], int(r["label"])): r
                         for s, summary in results[a].items() for r in summary["rows"]}
                     for a in arms}
        first = self.rows[arms[0]] if arms else {}
        size: dict = {}
        for (_, _, label), r in first.items():
            size.setdefault(label, []).append(float(r.get("truth_fraction", math.nan)))
        self.size = {k: float(np.nanmean(v)) for k, v in size.items()}
        self.structures = sorted(self.size, key=lambda k: -self.size[k])  # largest first
        n = len(self.structures)
        # terciles of the mean size: rank r of n (ascending) goes to group floor(3r/n)
        ascending = list(reversed(self.structures))
        self.group = {label: SIZE_GROUPS[min(2, 3 * r // max(n, 1))]
                      for r, label in enumerate(ascending)}
        self.smallest = ascending[:max(1, n // 3)] if n else []

    def dice(self, arm, labels=None, split=None) -> list:
        return [r["dice"] for (s, _, l), r in sorted(self.rows[arm].items())
                if (labels is None or l in labels) and (split is None or s == split)]

    def key_order(self, arm, labels) -> list:
        return [k for k in sorted(self.rows[arm]) if k[2] in labels]

    def per_split(self, arm, key: str) -> list:
        return [self.results[arm][s]["evaluation"][key] for s in sorted(self.results[arm])]


def _epochs(summaries) -> str:
    """Epochs trained, one number or min-max over splits."""
    counts = [int(s.get("epochs", len(s.get("history", {}).get("epoch", []))))
              for s in summaries]
    low, high = min(counts, default=0), max(counts, default=0)
    return str(low) if low == high else f"{low}–{high}"


def write_report(out: Path, rc, results: dict, failures: dict, label_names,
                 splits: list, forward_seconds: Optional[float] = None,
                 machine: str = "") -> Path:
    """Writes report.md, per_subject.csv, convergence.png and dice_by_structure.png.

    Args:
        out: the report directory.
        rc: the ReproduceConfig (name, arms, reference arm).
        results: ``{arm: {split: summary}}`` (see `tf_explog.experiments.run_arm`).
        failures: ``{(arm, split): message}``.
        label_names: class names, background first.
        splits: one dict per split: ``{"training": n, "test": n, "subjects": [...]}``.
        forward_seconds: one 128³ forward pass of the network (compiled, warm).
        machine: one line describing where it ran.

    Returns:
        The path of report.md.
    """
    from scipy.stats import wilcoxon

    arms = [a for a in rc.arms if results.get(a)]
    res = _Results(results, arms)

    def name_of(label):
        return label_names[label] if label < len(label_names) else str(label)

    k = len(splits)
    lines = [f"# Loss comparison: {rc.name}", ""]
    if splits:
        lines += [f"{k} split(s) of the data set into {splits[0]['training']} training "
                  f"(validation included) and {splits[0]['test']} test subjects; split 0 is "
                  "the data set's own, the others are seeded random re-partitions. Every arm "
                  "trains once per split with the same data, seed and budget and is judged "
                  "on that split's test subjects (inference mode, best-validation "
                  "checkpoint).", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    lines += ["## Dice per structure", "",
              f"Mean ± SD over every test case (split × subject, {k} split(s)); rows sorted "
              "by size (mean voxel fraction of the test volumes), best per row in **bold**.",
              "", "| structure | fraction | group | " + " | ".join(arms) + " |",
              "|" + "---|" * (len(arms) + 3)]
    for label in res.structures:
        stats = {a: mean_sd(res.dice(a, {label})) for a in arms}
        best = max((m for m, _ in stats.values() if math.isfinite(m)), default=math.nan)
        cells = []
        for a in arms:
            m, sd = stats[a]
            text = _pm(m, sd)
            cells.append(f"**{text}**" if math.isfinite(m) and m == best else text)
        lines.append(f"| {name_of(label)} | {100 * res.size[label]:.3f}% | "
                     f"{res.group[label]} | " + " | ".join(cells) + " |")

    ref = rc.reference_arm
    lines += ["", "## Summary per arm", "",
              f"Mean Dice over the {len(res.structures)} structures and with the background "
              f"({len(res.structures) + 1} labels, the paper's convention): mean ± SD over "
              "the splits' means. Size groups are terciles of the structures' mean size.", "",
              "| arm | mean Dice | with background | smallest third | small / medium / large "
              f"| HD95 (mm) | p vs {ref} | epochs | s / epoch | s / 128³ end-to-end |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        dice_splits = res.per_split(a, "dice_mean")
        bg_splits = res.per_split(a, "dice_mean_with_background")
        small = mean_sd(res.dice(a, set(res.smallest)))[0]
        groups = " / ".join(
            _fmt(mean_sd(res.dice(a, {l for l, g in res.group.items() if g == grp}))[0])
            for grp in SIZE_GROUPS)
        hd = mean_sd([r.get("hd95_mm", math.nan) for r in res.rows[a].values()])[0]
        p_text = "—"
        if a != ref and ref in res.rows:
            keys = sorted(set(res.rows[ref]) & set(res.rows[a]))
            x = np.array([res.rows[ref][key]["dice"] for key in keys], float)
            y = np.array([res.rows[a][key]["dice"] for key in keys], float)
            ok = ~(np.isnan(x) | np.isnan(y))
            try:
                p = wilcoxon(x[ok], y[ok]).pvalue if ok.sum() and np.any(x[ok] != y[ok]) \
                    else math.nan
            except ValueError:
                p = math.nan
            p_text = "n/a" if math.isnan(p) else f"{p:.2g}"
        epoch = float(np.median([s["epoch_seconds"] for s in results[a].values()]))
        e2e = float(np.median([s["inference_seconds_per_128cube"] for s in results[a].values()]))
        lines.append(f"| {a} | {_pm(*mean_sd(dice_splits))} | {_pm(*mean_sd(bg_splits))} | "
                     f"{_fmt(small)} | {groups} | {_fmt(hd, 2)} | {p_text} | "
                     f"{_epochs(results[a].values())} | {epoch:.1f} | {e2e:.2f} |")
    lines += ["", "p: two-sided Wilcoxon signed-rank test over paired (split, subject, "
              "structure) Dice values against the reference arm. Smallest third: the "
              f"{len(res.smallest)} structures with the smallest mean voxel fraction. "
              "*epochs*: epochs trained per split (fewer than configured when "
              "`train.time_budget_s` stopped the arm); *s / epoch*: training steps only "
              "(median); *s / 128³ end-to-end*: "
              "`tf-explog predict` on the test files (reading, preprocessing, the network, "
              "writing) per 128³ voxels."]
    if forward_seconds is not None:
        lines += ["", f"Forward pass alone (the network, one 128³ volume, batch 1, compiled "
                  f"and warm; what the paper's ≈ 0.4 s on a 2018 GPU measures): "
                  f"{forward_seconds:.2f} s."]
    lines.append("")
    if failures:
        lines += ["## Failed runs", ""]
        lines += [f"- {a}, split {s}: {msg}" for (a, s), msg in sorted(failures.items())]
        lines.append("")
    atomic_write(out / "report.md", "\n".join(lines))

    buf = io.StringIO()
    columns = ["arm", "split", "subject", "label", "structure", "dice", "hd95_mm", "assd_mm",
               "truth_fraction"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for a in arms:
        for (s, subject, label), r in sorted(res.rows[a].items()):
            writer.writerow({**r, "arm": a, "split": s, "subject": subject, "label": label,
                             "structure": name_of(label)})
    atomic_write(out / "per_subject.csv", buf.getvalue())
    _plots(out, res, name_of)
    return out / "report.md"


def _plots(out: Path, res: _Results, name_of) -> None:
    from tf_explog.plots import arm_dice_png, convergence_png

    curves = {}
    for a in res.arms:
        split_curves = [s["history"].get("val_dice") for s in res.results[a].values()]
        split_curves = [c for c in split_curves if c]
        if not split_curves:
            continue
        n = min(len(c) for c in split_curves)
        every = res.results[a][min(res.results[a])].get("validation_every", 1)
        curves[a] = (np.arange(1, n + 1) * every, [c[:n] for c in split_curves])
    atomic_write(out / "convergence.png", convergence_png(curves))
    atomic_write(out / "dice_by_structure.png", arm_dice_png(
        [name_of(s) for s in res.structures],
        {a: [mean_sd(res.dice(a, {s}))[0] for s in res.structures] for a in res.arms}))
