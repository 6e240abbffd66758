"""The paper's loss comparison (``tf-explog reproduce``) and the one-command demo.

``reproduce`` trains the same network on the same data, seeds and budget once per loss
("arm"), segments the held-out test set with each, evaluates every structure, and writes a
report directory shaped like the paper's comparison:

    report.md               structures (sorted by size) x losses, Dice mean ± SD, best in bold;
                            mean Dice, smallest-third mean, Wilcoxon p-values vs the reference
                            arm, HD95, seconds per epoch and per 128³-equivalent inference
    per_subject.csv         one row per arm x subject x structure
    convergence.png         validation mean Dice per epoch, one line per loss
    dice_by_structure.png   mean Dice per structure and loss
    runs/<arm>/             each arm's run directory (resumable)

Finished arms are detected (``runs/<arm>/DONE.json``) and skipped; an unfinished one resumes
from its last epoch; an arm that fails is reported in ``report.md`` and the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from tf_explog.config import ConfigError, _build, load_config

DONE_FILE = "DONE.json"


@dataclass
class SyntheticData:
    """Generate the synthetic benchmark into ``out`` when its dataset.json is missing."""

    out: str = "../data/synthetic"
    subjects: int = 12
    test_subjects: int = 4
    shape: int = 64
    seed: int = 0


@dataclass
class Arm:
    loss: str = "exp_log"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReproduceConfig:
    name: str = "reproduce"
    train_config: str = "demo.yaml"  # base training config, relative to this file
    set: list[str] = field(default_factory=list)  # overrides applied to every arm
    synthetic: Optional[SyntheticData] = None
    out_dir: str = "../reports/reproduce"
    reference_arm: str = "exp_log_g0.3"
    arms: dict[str, Arm] = field(default_factory=dict)


def paper_arms() -> dict[str, Arm]:
    """The losses compared in the paper, plus the generalized Dice loss."""
    return {
        "linear_dice": Arm("linear_dice"),
        "log_dice_g1": Arm("log_dice", {"gamma": 1.0}),
        "wce_g1": Arm("weighted_cross_entropy", {"gamma": 1.0}),
        "exp_log_g1": Arm("exp_log", {"gamma_dice": 1.0, "gamma_cross": 1.0}),
        "exp_log_g2": Arm("exp_log", {"gamma_dice": 2.0, "gamma_cross": 2.0}),
        "exp_log_g0.3": Arm("exp_log", {"gamma_dice": 0.3, "gamma_cross": 0.3}),
        "generalized_dice": Arm("generalized_dice"),
    }


def load_reproduce_config(path: str | Path) -> tuple[ReproduceConfig, Path]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found.")
    raw = yaml.safe_load(path.read_text()) or {}
    arms = raw.pop("arms", None)
    try:
        config = _build(ReproduceConfig, raw, "")
        if arms is None:
            config.arms = paper_arms()
        else:
            if not isinstance(arms, dict) or not arms:
                raise ConfigError("arms must be a mapping of arm name -> {loss, params}.")
            config.arms = {str(k): _build(Arm, v, f"arms.{k}") for k, v in arms.items()}
        if config.reference_arm not in config.arms:
            raise ConfigError(f"reference_arm {config.reference_arm!r} is not one of the arms "
                              f"{sorted(config.arms)}.")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config, path.resolve().parent


# --------------------------------------------------------------------------------------
# Running the arms
# --------------------------------------------------------------------------------------


def _arm_train_config(rc: ReproduceConfig, base_dir: Path, arm_name: str, arm: Arm,
                      overrides=()):
    from tf_explog.losses import LOSSES

    if arm.loss not in LOSSES:
        raise ConfigError(f"arms.{arm_name}.loss must be one of {sorted(LOSSES)}; "
                          f"got {arm.loss!r}.")
    config = load_config(base_dir / rc.train_config, [*rc.set, *overrides])
    config.name = f"{rc.name}-{arm_name}"
    config.loss.name = arm.loss
    config.loss.params = dict(arm.params)
    config.loss.class_weights = "auto" if arm.loss in ("exp_log", "weighted_cross_entropy") \
        else None
    return config.validate()


def arm_train_config(reproduce_config: str | Path, arm: str, overrides=()):
    """The training `Config` of one arm of a reproduce config (e.g. for bench/train_jax.py)."""
    rc, base_dir = load_reproduce_config(reproduce_config)
    if arm not in rc.arms:
        raise ConfigError(f"{reproduce_config}: no arm {arm!r}; arms: {sorted(rc.arms)}.")
    _ensure_synthetic(rc, base_dir)
    return _arm_train_config(rc, base_dir, arm, rc.arms[arm], overrides)


def _ensure_synthetic(rc: ReproduceConfig, base_dir: Path) -> None:
    if rc.synthetic is None:
        return
    from tf_explog.data.synthetic import generate_dataset

    s = rc.synthetic
    out = (base_dir / s.out).resolve()
    if (out / "dataset.json").is_file():
        return
    print(f"[reproduce] generating the synthetic data set in {out}", flush=True)
    generate_dataset(out, subjects=s.subjects, test_subjects=s.test_subjects,
                     shape=s.shape, seed=s.seed, verbose=True)


def segment_and_evaluate(run_dir: Path, entries, label_names, progress: bool = True):
    """Segments the entries' images with a run's best model and evaluates them per structure.

    Returns:
        (EvaluationResult, seconds spent predicting, voxels predicted).
    """
    import nibabel as nib

    from tf_explog.evaluation import evaluate_pairs
    from tf_explog.inference import predict_files

    # One call over a folder of links, so the model is loaded once.
    links = Path(tempfile.mkdtemp(prefix="tf_explog_inputs_"))
    try:
        for entry in entries:
            os.symlink(Path(entry.image).resolve(), links / Path(entry.image).name)
        pred_dir = Path(run_dir) / "test_predictions"
        start = time.perf_counter()
        predict_files(run_dir, links, pred_dir, overwrite=True, progress=progress)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(links)
    voxels = sum(int(np.prod(nib.load(str(e.image)).shape[:3])) for e in entries)
    pairs = [(Path(e.image).name.split(".nii")[0], pred_dir / Path(e.image).name,
              Path(e.label)) for e in entries]
    return evaluate_pairs(pairs, list(label_names)), seconds, voxels


def run_arm(config, run_dir: Path, test_entries, label_names) -> dict:
    """Trains (or resumes, or skips) one arm, then segments and evaluates the test set."""
    from tf_explog.training import train

    done = run_dir / DONE_FILE
    if done.is_file():
        print(f"[reproduce] {run_dir.name}: finished earlier, skipped", flush=True)
        return json.loads(done.read_text())
    start = time.perf_counter()
    if (run_dir / "run.json").is_file():
        print(f"[reproduce] {run_dir.name}: resuming", flush=True)
        result = train(None, resume=run_dir)
    else:
        if run_dir.exists():  # created but never started: nothing to keep
            shutil.rmtree(run_dir)
        result = train(config, run_dir=run_dir)
    train_seconds = time.perf_counter() - start

    evaluation, predict_seconds, voxels = segment_and_evaluate(
        run_dir, test_entries, label_names, progress=False)
    summary = {
        "rows": evaluation.rows,
        "history": {k: [float(x) for x in v] for k, v in result.history.items()},
        "train_seconds": train_seconds,
        "epoch_seconds": float(np.median(result.history.get("epoch_seconds", [math.nan]))),
        "inference_seconds_per_128cube": predict_seconds * 128**3 / max(voxels, 1),
    }
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(summary, default=_json_default))
    os.replace(tmp, done)
    return summary


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


def reproduce(config_path: str | Path, overrides=(), out_dir: str | Path | None = None,
              arms: list[str] | None = None) -> Path:
    """Runs every arm of a reproduce config and writes the report; returns report.md's path."""
    from tf_explog.training import load_manifest

    rc, base_dir = load_reproduce_config(config_path)
    out = Path(out_dir) if out_dir else (base_dir / rc.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _ensure_synthetic(rc, base_dir)
    selected = arms or list(rc.arms)
    configs = {name: _arm_train_config(rc, base_dir, name, rc.arms[name], overrides)
               for name in selected}
    any_config = next(iter(configs.values()))
    manifest = load_manifest(any_config)
    test_entries = manifest.entries("test")
    if not test_entries:
        raise ValueError(f"{any_config.data.dataset}: the data set has no labelled test "
                         "entries to evaluate on.")
    label_names = manifest.label_names

    results, failures = {}, {}
    for name, config in configs.items():
        print(f"[reproduce] arm {name}: loss={config.loss.name} {config.loss.params}",
              flush=True)
        try:
            results[name] = run_arm(config, out / "runs" / name, test_entries, label_names)
        except Exception as err:  # one failed arm is reported, not fatal
            failures[name] = f"{type(err).__name__}: {err}"
            print(f"[reproduce] arm {name} FAILED: {failures[name]}", flush=True)
            (out / "runs").mkdir(exist_ok=True)
            (out / "runs" / f"{name}.error.txt").write_text(traceback.format_exc())
    return write_report(out, rc, results, failures, label_names)


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _mean_sd(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def write_report(out: Path, rc: ReproduceConfig, results: dict, failures: dict,
                 label_names) -> Path:
    """Writes report.md, per_subject.csv, convergence.png and dice_by_structure.png."""
    from scipy.stats import wilcoxon

    arms = [a for a in rc.arms if a in results]
    # per arm: {(subject, label): row}
    rows = {a: {(r["subject"], int(r["label"])): r for r in results[a]["rows"]} for a in arms}

    # structures sorted by size: mean ground-truth voxel fraction over the test subjects
    size = {}
    for arm in arms:
        for (subject, label), r in rows[arm].items():
            size.setdefault(label, []).append(float(r.get("truth_fraction", math.nan)))
        break
    structures = sorted(size, key=lambda k: -np.nanmean(size[k]))
    smallest = structures[-max(1, len(structures) // 3):] if structures else []

    def dice_of(arm, label):
        return [r["dice"] for (s, l), r in sorted(rows[arm].items()) if l == label]

    lines = [f"# Loss comparison: {rc.name}", ""]
    lines.append("Dice (mean ± SD over test subjects) per structure; rows sorted by size "
                 "(mean voxel fraction of the test volumes), best per row in **bold**.")
    lines.append("")
    header = "| structure | fraction | " + " | ".join(arms) + " |"
    lines += [header, "|" + "---|" * (len(arms) + 2)]
    for label in structures:
        stats = {a: _mean_sd(dice_of(a, label)) for a in arms}
        best = max((m for m, _ in stats.values() if not math.isnan(m)), default=math.nan)
        cells = []
        for a in arms:
            m, sd = stats[a]
            text = "n/a" if math.isnan(m) else f"{m:.3f} ± {0 if math.isnan(sd) else sd:.3f}"
            cells.append(f"**{text}**" if not math.isnan(m) and m == best else text)
        name = label_names[label] if label < len(label_names) else str(label)
        lines.append(f"| {name} | {np.nanmean(size[label]) * 100:.3f}% | " + " | ".join(cells)
                     + " |")

    def all_dice(arm, labels):
        return [r["dice"] for (s, l), r in sorted(rows[arm].items()) if l in labels]

    lines += ["", "## Summary per loss", "",
              "| loss | mean Dice | smallest third | mean HD95 (mm) | p vs "
              f"{rc.reference_arm} | s / epoch | s / 128³ inference |",
              "|---|---|---|---|---|---|---|"]
    ref = rc.reference_arm
    for a in arms:
        mean_all = _mean_sd(all_dice(a, structures))[0]
        mean_small = _mean_sd(all_dice(a, smallest))[0]
        hd = _mean_sd([r.get("hd95_mm", math.nan) for r in rows[a].values()])[0]
        if a != ref and ref in rows:
            x = np.array(all_dice(ref, structures), float)
            y = np.array(all_dice(a, structures), float)
            ok = ~(np.isnan(x) | np.isnan(y))
            try:
                p = wilcoxon(x[ok], y[ok]).pvalue if ok.sum() and np.any(x[ok] != y[ok]) \
                    else math.nan
            except ValueError:
                p = math.nan
            p_text = "n/a" if math.isnan(p) else f"{p:.2g}"
        else:
            p_text = "—"
        lines.append(f"| {a} | {mean_all:.3f} | {mean_small:.3f} | {hd:.2f} | {p_text} | "
                     f"{results[a]['epoch_seconds']:.1f} | "
                     f"{results[a]['inference_seconds_per_128cube']:.2f} |")
    lines += ["", "p: two-sided Wilcoxon signed-rank test over paired (subject, structure) "
              "Dice values against the reference arm. Smallest third: the third of the "
              f"structures with the smallest mean voxel fraction ({len(smallest)} structures).",
              ""]
    if failures:
        lines += ["## Failed arms", ""]
        lines += [f"- {a}: {msg}" for a, msg in failures.items()]
        lines.append("")
    _atomic_bytes(out / "report.md", "\n".join(lines).encode())

    buf = io.StringIO()
    columns = ["arm", "subject", "label", "structure", "dice", "hd95_mm", "assd_mm",
               "truth_fraction"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for a in arms:
        for (subject, label), r in sorted(rows[a].items()):
            writer.writerow({**r, "arm": a, "subject": subject, "label": label,
                             "structure": label_names[label] if label < len(label_names)
                             else str(label)})
    _atomic_bytes(out / "per_subject.csv", buf.getvalue().encode())
    _plots(out, arms, results, rows, structures, label_names, dice_of)
    return out / "report.md"


def _plots(out, arms, results, rows, structures, label_names, dice_of):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in arms:
        curve = results[a]["history"].get("val_dice")
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=a)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation mean Dice")
    _finish_figure(plt, fig, ax, out / "convergence.png")

    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(structures) + 2), 4.5))
    x = np.arange(len(structures))
    for a in arms:
        ax.plot(x, [_mean_sd(dice_of(a, s))[0] for s in structures], marker="o", label=a)
    ax.set_xticks(x)
    ax.set_xticklabels([label_names[s] if s < len(label_names) else str(s)
                        for s in structures], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean Dice (test)")
    ax.set_xlabel("structure (largest to smallest)")
    _finish_figure(plt, fig, ax, out / "dice_by_structure.png")


def _finish_figure(plt, fig, ax, path: Path) -> None:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------
# make demo
# --------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def demo(tiny: bool = False, root: str | Path | None = None) -> dict:
    """The main job on an embedded default: synthesise, train, evaluate, export.

    Uses ``train_configs/demo.yaml`` (the paper's network, ExpLogLoss gamma = 0.3, on CPU-sized
    synthetic volumes). ``tiny`` shrinks everything to seconds (the test suite runs it).
    Outputs go under ``root`` (default: the repository): ``data/demo*``, ``runs/``,
    ``reports/``, ``saved_models/``.
    """
    from tf_explog.data.synthetic import generate_dataset
    from tf_explog.evaluation import format_report
    from tf_explog.export import export_saved_model
    from tf_explog.training import train

    root = Path(root) if root else REPO_ROOT
    t0 = time.perf_counter()
    config_path = REPO_ROOT / "train_configs" / "demo.yaml"
    if tiny:
        data = dict(subjects=4, test_subjects=1, shape=32, name="demo_tiny")
        overrides = ["train.epochs=1", "model.filters=[4,4,4,4,4]",
                     "model.encoder_depths=[1,1,1,1,1]", "model.decoder_depths=[1,1,1,1]",
                     "data.preprocess.target_shape=32", "train.image_summary_every=1"]
    else:
        data = dict(subjects=12, test_subjects=3, shape=48, name="demo")
        overrides = []
    data_dir = root / "data" / data["name"]
    overrides += [f"data.dataset={data_dir / 'dataset.json'}", f"runs_dir={root / 'runs'}",
                  f"data.cache_dir={data_dir / '.cache'}"]
    if tiny:
        overrides.append("name=demo_tiny")

    print(f"[demo] 1/4 synthetic data set: {data_dir}", flush=True)
    if not (data_dir / "dataset.json").is_file():
        generate_dataset(data_dir, subjects=data["subjects"],
                         test_subjects=data["test_subjects"], shape=data["shape"], seed=0)
    else:
        print("[demo]     (cached: reusing it)", flush=True)

    print(f"[demo] 2/4 training with {config_path.relative_to(REPO_ROOT)}", flush=True)
    config = load_config(config_path, overrides)
    result = train(config)

    print("[demo] 3/4 segmenting and evaluating the test subjects", flush=True)
    from tf_explog.builders import load_manifest

    manifest = load_manifest(config)
    evaluation, _, _ = segment_and_evaluate(result.run_dir, manifest.entries("test"),
                                            manifest.label_names, progress=True)
    report_dir = root / "reports" / result.run_dir.parent.name / result.run_dir.name
    report_dir.mkdir(parents=True, exist_ok=True)
    report = report_dir / "report.md"
    _atomic_bytes(report, format_report(evaluation, title=f"Demo: {config.name}").encode())

    print("[demo] 4/4 exporting a SavedModel for TF Serving", flush=True)
    exported = export_saved_model(result.run_dir, root / "saved_models", config.name)

    elapsed = time.perf_counter() - t0
    overall = evaluation.overall
    print("\n[demo] done in {:.0f} s".format(elapsed))
    print(f"  mean test Dice:  {overall.get('dice_mean', float('nan')):.3f}")
    print(f"  run directory:   {result.run_dir}")
    print(f"  TensorBoard:     tensorboard --logdir {result.run_dir / 'tensorboard'}")
    print(f"  evaluation:      {report}")
    print(f"  SavedModel:      {exported}")
    print(f"  segment scans:   tf-explog predict --model {result.run_dir} --input FILE_OR_DIR "
          "--output DIR")
    return {"run_dir": result.run_dir, "report": report, "saved_model": exported,
            "evaluation": evaluation, "seconds": elapsed}
