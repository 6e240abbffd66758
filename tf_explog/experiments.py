"""The paper's loss comparison (``tf-explog reproduce``) and the one-command demo.

``reproduce`` trains the same network on the same data, seed and budget once per *arm* (a
loss, or a whole recipe given as config overrides) and per *split* of the data set, segments
each split's held-out test subjects with each arm's best-validation checkpoint, evaluates
every structure in class space, and writes the report (`tf_explog.comparison`) to the
report directory, with the runs under ``runs/split_<k>/<arm>/``.

Splits: split 0 is the data set's own training/test division; splits 1..K-1 re-partition
all labelled subjects at random (seeded by ``split_seed``) with the same number of test
subjects, written as ``splits/split_<k>/dataset.json`` (absolute paths, the same labels and
label map, the same volume cache).

Finished runs are detected (``DONE.json``) and skipped; an unfinished one resumes from its
last epoch; a run that fails is reported in ``report.md`` and the others go on.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import keras
import numpy as np

from tf_explog.config import ConfigError, dataclass_from_dict, load_config, packaged_config
from tf_explog.errors import RunsFailed
from tf_explog.files import atomic_write, write_json
from tf_explog.environment import environment_line
from tf_explog.runs import RUN_FILE, Run

@dataclass
class SyntheticData:
    """Generate the synthetic benchmark into ``out`` when its dataset.json is missing."""

    out: str = "../data/synthetic"
    subjects: int = 12
    test_subjects: int = 4
    shape: int = 64
    seed: int = 0


@dataclass
class LabelMapData:
    """Synthesise MR-like images from a folder of label maps into ``out`` when its
    dataset.json is missing (`tf_explog.data.label_synthesis`)."""

    maps: str = "../../shared/data/brain_label_maps"  # relative to the reproduce config
    out: str = "../data/brain"
    subjects: Optional[int] = None  # None: every map
    test_subjects: int = 3
    seed: int = 0
    contrast: str = "t1"


@dataclass
class Arm:
    """One arm: a loss (with its parameters) and/or config overrides (a recipe)."""

    loss: Optional[str] = None  # None: the training config's own loss
    params: dict[str, Any] = field(default_factory=dict)
    set: list[str] = field(default_factory=list)  # overrides for this arm only
    train_config: Optional[str] = None  # another base config, relative to this file


@dataclass
class ReproduceConfig:
    name: str = "reproduce"
    train_config: str = "demo.yaml"  # base training config, relative to this file
    set: list[str] = field(default_factory=list)  # overrides applied to every arm
    synthetic: Optional[SyntheticData] = None
    label_maps: Optional[LabelMapData] = None
    out_dir: str = "../reports/reproduce"
    reference_arm: str = "exp_log_g0.3"
    splits: int = 3  # random re-partitions of the data set (split 0: its own)
    split_seed: int = 0
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
    from tf_explog.config import read_yaml

    path = Path(path)
    raw = read_yaml(path)
    arms = raw.pop("arms", None)
    try:
        config = dataclass_from_dict(ReproduceConfig, raw, "")
        if arms is None:
            config.arms = paper_arms()
        else:
            if not isinstance(arms, dict) or not arms:
                raise ConfigError("arms must be a mapping of arm name -> {loss, params, set}.")
            config.arms = {str(k): dataclass_from_dict(Arm, v, f"arms.{k}") for k, v in arms.items()}
        if config.reference_arm not in config.arms:
            raise ConfigError(f"reference_arm {config.reference_arm!r} is not one of the arms "
                              f"{sorted(config.arms)}.")
        if not 1 <= config.splits <= 100:
            raise ConfigError(f"splits must be between 1 and 100; got {config.splits!r}.")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config, path.resolve().parent


# --------------------------------------------------------------------------------------
# Arms and splits
# --------------------------------------------------------------------------------------


def _arm_train_config(rc: ReproduceConfig, base_dir: Path, arm_name: str, arm: Arm,
                      overrides=()):
    from tf_explog.losses import LOSSES

    if arm.loss is not None and arm.loss not in LOSSES:
        raise ConfigError(f"arms.{arm_name}.loss must be one of {sorted(LOSSES)}; "
                          f"got {arm.loss!r}.")
    if arm.loss is None and arm.params:
        raise ConfigError(f"arms.{arm_name}.params needs arms.{arm_name}.loss.")
    base = base_dir / (arm.train_config or rc.train_config)
    config = load_config(base, [*rc.set, *arm.set, *overrides])
    config.name = f"{rc.name}-{arm_name}"
    if arm.loss is not None:
        config.loss.name = arm.loss
        config.loss.params = dict(arm.params)
        config.loss.class_weights = ("auto" if arm.loss in ("exp_log", "weighted_cross_entropy")
                                     else None)
    return config.validate()


def arm_train_config(reproduce_config: str | Path, arm: str, overrides=()):
    """The training `Config` of one arm (split 0) of a reproduce config (e.g. for JAX)."""
    rc, base_dir = load_reproduce_config(reproduce_config)
    if arm not in rc.arms:
        raise ConfigError(f"{reproduce_config}: no arm {arm!r}; arms: {sorted(rc.arms)}.")
    _ensure_synthetic(rc, base_dir)
    return _arm_train_config(rc, base_dir, arm, rc.arms[arm], overrides)


def _ensure_synthetic(rc: ReproduceConfig, base_dir: Path) -> None:
    if rc.label_maps is not None:
        _ensure_label_map_data(rc.label_maps, base_dir)
    if rc.synthetic is None:
        return
    from tf_explog.data.synthetic import generate_dataset

    s = rc.synthetic
    out = (base_dir / s.out).resolve()
    if (out / "dataset.json").is_file():
        return
    print(f"[reproduce] generating the synthetic data set in {out}", flush=True)
    # Processes share the work (same volumes whatever their number): 43 subjects at 128^3
    # take ~17 s on one core.
    generate_dataset(out, subjects=s.subjects, test_subjects=s.test_subjects,
                     shape=s.shape, seed=s.seed, verbose=True,
                     workers=max(1, min(8, os.cpu_count() or 1)))


def _ensure_label_map_data(lm: LabelMapData, base_dir: Path) -> None:
    from tf_explog.data.label_synthesis import synthesize_from_label_maps
    from tf_explog.errors import InputError

    out = (base_dir / lm.out).resolve()
    if (out / "dataset.json").is_file():
        return
    maps = (base_dir / lm.maps).resolve()
    if not maps.is_dir():
        raise InputError(f"label_maps.maps: {maps} is not a folder of label maps; set it to "
                         "your copy of the maps (e.g. SynthSeg's data/training_label_maps)")
    print(f"[reproduce] synthesising MR-like images from {maps} into {out}", flush=True)
    synthesize_from_label_maps(maps, out, subjects=lm.subjects, test_subjects=lm.test_subjects,
                               seed=lm.seed, contrast=lm.contrast, progress=True,
                               workers=max(1, min(8, os.cpu_count() or 1)))


def make_splits(manifest, count: int, seed: int = 0) -> list:
    """``[(training entries, test entries), ...]``: the data set's own split, then seeded
    random re-partitions of all labelled subjects with the same number of test subjects."""
    from tf_explog.errors import InputError

    test = [e for e in manifest.test if e.label is not None]
    if not test:
        raise InputError(f"{manifest.path}: the data set has no labelled test entries to "
                         "evaluate on")
    training = manifest.entries("all")
    pool = training + test
    splits = [(training, test)]
    for k in range(1, count):
        order = np.random.default_rng([int(seed), k]).permutation(len(pool))
        chosen = set(int(i) for i in order[:len(test)])
        splits.append(([e for i, e in enumerate(pool) if i not in chosen],
                       [e for i, e in enumerate(pool) if i in chosen]))
    return splits


def write_split_dataset(manifest, training, test, path: Path) -> Path:
    """A dataset.json for one split: the manifest's labels, modalities and label map, with
    absolute paths to its files."""
    raw = {
        "name": f"{manifest.name} ({path.parent.name})",
        "labels": {str(k): v for k, v in manifest.labels.items()},
        "modality": {str(k): v for k, v in manifest.modality.items()},
        "training": [{"image": str(e.image.resolve()), "label": str(e.label.resolve())}
                     for e in training],
        "test": [{"image": str(e.image.resolve()), "label": str(e.label.resolve())}
                 for e in test],
    }
    if manifest.label_map is not None:
        raw["label_map"] = manifest.label_map
    return write_json(path, raw, indent=1)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def segment_and_evaluate(run_dir: Path, entries, label_names, progress: bool = True,
                         label_map=None, unknown_labels: str = "raise"):
    """Segments the entries' images with a run's best model and evaluates them per structure
    (in class space, with the data set's label map when it has one).

    Returns:
        (EvaluationResult, seconds spent predicting, voxels predicted).
    """
    from tf_explog.data.nifti import read_header
    from tf_explog.evaluation import evaluate_pairs
    from tf_explog.inference import predict_files

    # One call over a folder of links, so the model is loaded once.
    links = Path(tempfile.mkdtemp(prefix="tf_explog_inputs_"))
    try:
        for entry in entries:
            os.symlink(Path(entry.image).resolve(), links / Path(entry.image).name)
        pred_dir = Run.open(run_dir).predictions_dir
        start = time.perf_counter()
        predict_files(run_dir, links, pred_dir, overwrite=True, progress=progress)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(links)
    voxels = sum(int(np.prod(read_header(e.image)[0][:3])) for e in entries)
    pairs = [(e.id, pred_dir / Path(e.image).name, Path(e.label)) for e in entries]
    return (evaluate_pairs(pairs, list(label_names), label_map=label_map,
                           unknown_labels=unknown_labels), seconds, voxels)


def run_arm(config, run_dir: Path, test_entries, label_names, label_map=None,
            unknown_labels: str = "raise") -> dict:
    """Trains (or resumes, or skips) one arm on one split, then evaluates its test subjects.

    Returns (and stores as ``DONE.json``): the evaluation rows and summary, the validation
    curve (``val_epochs``, ``val_dice``) and losses from ``metrics.csv``, and timings.
    """
    from tf_explog.runs import read_metrics_csv
    from tf_explog.training import train

    run = Run(Path(run_dir))
    done = run.read_done() if (run.path / RUN_FILE).is_file() else None
    if done is not None:
        print(f"[reproduce] {run_dir.parent.name}/{run_dir.name}: finished earlier, skipped",
              flush=True)
        return done
    start = time.perf_counter()
    if (run.path / RUN_FILE).is_file():
        print(f"[reproduce] {run_dir.parent.name}/{run_dir.name}: resuming", flush=True)
        train(None, resume=run_dir)
    else:
        if run_dir.exists():  # created but never started: nothing to keep
            shutil.rmtree(run_dir)
        train(config, run_dir=run_dir)
    train_seconds = time.perf_counter() - start

    evaluation, predict_seconds, voxels = segment_and_evaluate(
        run_dir, test_entries, label_names, progress=False, label_map=label_map,
        unknown_labels=unknown_labels)
    rows = read_metrics_csv(run.metrics_csv)
    validated = [r for r in rows if "val_dice" in r]
    summary = {
        "rows": evaluation.rows,
        "evaluation": {k: evaluation.overall[k] for k in ("dice_mean",
                                                          "dice_mean_with_background")},
        "history": {"epoch": [r["epoch"] for r in rows],
                    "loss": [r.get("loss", math.nan) for r in rows],
                    "val_epochs": [r["epoch"] for r in validated],  # numbered from 1
                    "val_dice": [r["val_dice"] for r in validated]},
        "train_seconds": train_seconds,
        "epochs": len(rows),  # fewer than train.epochs when train.time_budget_s stopped it
        "epoch_seconds": float(np.median([r.get("epoch_seconds", math.nan) for r in rows])),
        "inference_seconds_per_128cube": predict_seconds * 128**3 / max(voxels, 1),
        "test_subjects": [e.id for e in test_entries],
    }
    run.write_done(summary)
    return summary


def forward_seconds_128(checkpoint: Path, repeats: int = 3) -> float:
    """Median wall time of one compiled, warm forward pass of a model on a 128³ volume."""
    import keras

    from tf_explog.inference import load_predictor

    model = load_predictor(checkpoint).model
    channels = model.input_shape[-1]
    x = np.random.default_rng(0).normal(size=(1, 128, 128, 128, channels)).astype("float32")
    model.predict_on_batch(x)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(model.predict_on_batch(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def reproduce(config_path: str | Path, overrides=(), out_dir: str | Path | None = None,
              arms: list[str] | None = None, splits: int | None = None,
              strict: bool = False) -> Path:
    """Runs every arm on every split and writes the report; returns report.md's path.

    ``arms`` and ``splits`` (the first K splits; split k is the same whatever K) restrict the
    work; runs already finished are reused, so the comparison can be grown call by call.
    A failed run is reported (in the report and ``<arm>.error.txt``), not fatal: the
    others still run. With ``strict`` (the command line) the report is written and then
    `RunsFailed` is raised, so that a failed arm is never a success.
    """
    from tf_explog.builders import cache_dir_for, load_manifest
    from tf_explog.comparison import write_report

    rc, base_dir = load_reproduce_config(config_path)
    if splits is not None:
        if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= 100:
            raise ConfigError(f"splits must be between 1 and 100; got {splits!r}.")
        rc.splits = splits
    out = Path(out_dir) if out_dir else (base_dir / rc.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _ensure_synthetic(rc, base_dir)
    selected = arms or list(rc.arms)
    unknown = sorted(set(selected) - set(rc.arms))
    if unknown:
        raise ConfigError(f"{config_path}: no arm(s) {unknown}; arms: {sorted(rc.arms)}.")
    first = _arm_train_config(rc, base_dir, selected[0], rc.arms[selected[0]], overrides)
    manifest = load_manifest(first)
    cache = cache_dir_for(first).resolve()  # one volume cache for every split
    label_names = manifest.label_names
    splits = make_splits(manifest, rc.splits, rc.split_seed)

    results: dict = {name: {} for name in selected}
    failures: dict = {}
    for k, (training, test) in enumerate(splits):
        dataset = Path(first.resolve(first.data.dataset)).resolve()
        if k > 0:
            dataset = write_split_dataset(manifest, training, test,
                                          out / "splits" / f"split_{k}" / "dataset.json")
        split_overrides = [*overrides, f"data.dataset={dataset}", f"data.cache_dir={cache}"]
        for name in selected:
            print(f"[reproduce] split {k}, arm {name}", flush=True)
            run_dir = out / "runs" / f"split_{k}" / name
            try:
                config = _arm_train_config(rc, base_dir, name, rc.arms[name], split_overrides)
                summary = run_arm(config, run_dir, test, label_names, manifest.label_map,
                                  manifest.unknown_labels)
                summary["validation_every"] = config.train.validation_every
                results[name][k] = summary
            except Exception as err:  # one failed run is reported, not fatal
                failures[(name, k)] = f"{type(err).__name__}: {err}"
                print(f"[reproduce] split {k}, arm {name} FAILED: {failures[(name, k)]}",
                      flush=True)
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(run_dir.parent / f"{name}.error.txt", traceback.format_exc())
    forward = None
    reference = rc.reference_arm if results.get(rc.reference_arm) else next(
        (a for a in selected if results[a]), None)
    if reference is not None:
        split = min(results[reference])
        forward = forward_seconds_128(out / "runs" / f"split_{split}" / reference)
    split_info = [{"training": len(tr), "test": len(te), "subjects": [e.id for e in te]}
                  for tr, te in splits]
    report = write_report(out, rc, results, failures, label_names, split_info, forward,
                          environment_line())
    if strict and failures:
        (name, k), message = next(iter(failures.items()))
        raise RunsFailed(
            f"{len(failures)} of {len(splits) * len(selected)} run(s) failed (first: split "
            f"{k}, arm {name}: {message.splitlines()[0] if message else ''}); traceback in "
            f"{out / 'runs' / f'split_{k}' / f'{name}.error.txt'}; report of the others: "
            f"{report}")
    return report


# --------------------------------------------------------------------------------------
# make demo
# --------------------------------------------------------------------------------------

def demo(tiny: bool = False, root: str | Path | None = None) -> dict:
    """The main job on an embedded default: synthesise, train, evaluate, export.

    Uses the packaged ``train_configs/demo.yaml`` (the paper's network, ExpLogLoss gamma =
    0.3, on CPU-sized synthetic volumes). ``tiny`` shrinks everything to seconds (the test
    suite runs it). Outputs go under ``root`` (default: the working directory):
    ``data/demo*``, ``runs/``, ``reports/``, ``saved_models/``.
    """
    from tf_explog.data.synthetic import generate_dataset
    from tf_explog.environment import tool_command
    from tf_explog.evaluation import write_evaluation
    from tf_explog.training import train

    root = Path(root) if root else Path.cwd()
    t0 = time.perf_counter()
    config_path = packaged_config("demo")
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

    print(f"[demo] 2/4 training with {config_path}", flush=True)
    config = load_config(config_path, overrides)
    result = train(config)

    print("[demo] 3/4 segmenting and evaluating the test subjects", flush=True)
    from tf_explog.builders import load_manifest

    manifest = load_manifest(config)
    evaluation, _, _ = segment_and_evaluate(result.run_dir, manifest.entries("test"),
                                            manifest.label_names, progress=sys.stdout.isatty(),
                                            label_map=manifest.label_map,
                                            unknown_labels=manifest.unknown_labels)
    report_dir = root / "reports" / result.run_dir.parent.name / result.run_dir.name
    # The full evaluation, as `tf-explog evaluate` writes it, naming what it evaluated.
    checkpoint = Run.open(result.run_dir).checkpoint("best")
    info = Run.open(result.run_dir).info
    best = info.get("best") or {}
    source = (f"Evaluated checkpoint: `{checkpoint}`"
              + (f" (best {best['monitor']} {best['value']:.4f} at epoch {best['epoch']} of "
                 f"{info.get('epochs_trained')})" if best else "")
              + f", on the {len(manifest.entries('test'))} test subject(s) of "
              f"`{manifest.path}`; predictions in `{Run.open(result.run_dir).predictions_dir}`.")
    write_evaluation(evaluation, report_dir, title=f"Demo: {config.name}", source=source,
                     overwrite=True)
    report = report_dir / "report.md"

    if keras.backend.backend() == "tensorflow":
        from tf_explog.export import export_saved_model

        print("[demo] 4/4 exporting a SavedModel for TF Serving", flush=True)
        exported = export_saved_model(result.run_dir, root / "saved_models", config.name)
    else:  # a SavedModel is TensorFlow's; the .keras checkpoints export there later
        print(f"[demo] 4/4 SavedModel export skipped: it needs TensorFlow (backend here: "
              f"{keras.backend.backend()}); later, with TensorFlow: KERAS_BACKEND=tensorflow "
              f"tf-explog export --run {result.run_dir}", flush=True)
        exported = None

    elapsed = time.perf_counter() - t0
    overall = evaluation.overall
    print("\n[demo] done in {:.0f} s".format(elapsed))
    print(f"  mean test Dice:  {overall.get('dice_mean', float('nan')):.3f}")
    print(f"  run directory:   {result.run_dir}")
    print(f"  TensorBoard:     {tool_command('tensorboard')} --logdir "
          f"{result.run_dir / 'tensorboard'}")
    print(f"  evaluation:      {report} (+ metrics.csv, summary.csv, dice_boxplot.png)")
    print(f"  SavedModel:      {exported or 'not exported (needs TensorFlow)'}")
    print(f"  segment scans:   {tool_command('tf-explog')} predict --model {result.run_dir} "
          "--input FILE_OR_DIR --output DIR")
    return {"run_dir": result.run_dir, "report": report, "saved_model": exported,
            "evaluation": evaluation, "seconds": elapsed}
