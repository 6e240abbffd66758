"""Does the trained model hold up in inference mode? BatchNorm statistics at full scale.

Trains one arm of a config on the JAX backend (``bench/train_jax.py``: the same model, loss,
augmentation, recalibration and inference-mode validation as ``tf-explog train``) and then
segments held-out subjects with the final and the best checkpoint, each run three ways:

- ``as_saved``: ``model(x, training=False)`` as loaded: recalibrated population statistics
  with ``train.bn_recalibration: true``, Keras' moving averages with ``false``;
- ``batch_stats``: every BatchNorm normalises with the statistics of the volume it sees (what
  training used), noise and dropout off;
- ``recalibrated``: precise BatchNorm (1 pass over the clean training volumes) applied after
  training, as a user can do to any model.

It prints one JSON line per (checkpoint, mode, split) — mean Dice over the structures, over
the smallest third, per structure — and the validation curve of the run, and writes them to
``--out/fidelity.json``. Dice is computed in the preprocessed grid against the preprocessed
labels (independent NumPy, confusion matrix), held-out test subjects and the training volumes.

Usage (one arm per process; two processes share one GPU well)::

    KERAS_BACKEND=jax python bench/bn_fidelity.py --config train_configs/paper.yaml \\
        --set data.dataset=/tmp/synth/dataset.json --set train.bn_recalibration=false \\
        --out /tmp/ema --subjects 14 --shape 128

Sizes: at 48³ on a 2-core CPU one arm of ``demo.yaml`` (40 epochs) takes ~5 minutes; at 128³
on one H200 one arm of ``paper.yaml`` (100 epochs, 11 training volumes) about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import train_jax  # noqa: E402  (blocks TensorFlow, as on the GPU machine)

import numpy as np  # noqa: E402


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of every class from the confusion matrix (float64); absent in both: NaN."""
    k = num_classes
    conf = np.bincount(truth.ravel().astype(np.int64) * k + pred.ravel().astype(np.int64),
                       minlength=k * k).reshape(k, k).astype(np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def segment(model, image: np.ndarray, mode: str) -> np.ndarray:
    from tf_explog.batchnorm import batch_statistics
    from tf_explog.inference import predict_volume

    if mode == "batch_stats":
        with batch_statistics(model):
            probs = predict_volume(model, image,
                                   predict_fn=lambda b: model(b, training=False))
    else:
        probs = predict_volume(model, image)
    return probs.argmax(-1)


def evaluate(model, volumes, num_classes: int, mode: str) -> np.ndarray:
    """``[cases, classes]`` Dice."""
    return np.stack([dice_per_class(segment(model, image, mode), labels, num_classes)
                     for image, labels in volumes])


def summarise(dice: np.ndarray, names, fractions) -> dict:
    structures = dice[:, 1:]
    mean_per = np.nanmean(structures, axis=0)
    order = np.argsort(fractions[1:])
    third = order[: max(1, len(order) // 3)]
    return {"dice_mean": float(np.nanmean(mean_per)),
            "dice_smallest_third": float(np.nanmean(mean_per[third])),
            "dice_min_structure": float(np.nanmin(mean_per)),
            "per_structure": {names[i + 1]: round(float(v), 4) for i, v in enumerate(mean_per)}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--subjects", type=int, default=14)
    p.add_argument("--shape", type=int, default=128)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--train-eval", type=int, default=4,
                   help="training volumes to evaluate (0: none)")
    args = p.parse_args(argv)

    out = Path(args.out)
    argv_train = ["--config", args.config, "--out", str(out), "--subjects", str(args.subjects),
                  "--shape", str(args.shape), "--workers", str(args.workers)]
    for item in args.overrides:
        argv_train += ["--set", item]
    start = time.perf_counter()
    summary = train_jax.main(argv_train)
    train_seconds = time.perf_counter() - start

    from tf_explog.batchnorm import recalibrate_batchnorm
    from tf_explog.builders import TrainingSetup
    from tf_explog.config import load_config
    from tf_explog.data.core import clean_batches
    from tf_explog.inference import load_keras_model

    setup = TrainingSetup.from_config(load_config(args.config, args.overrides))
    test, training = setup.volumes("test"), setup.volumes("training")
    names = setup.label_names
    k = len(names)
    fractions = np.bincount(np.concatenate([lab.ravel() for _, lab in test]),
                            minlength=k) / sum(lab.size for _, lab in test)
    train_subset = [training[i] for i in range(min(args.train_eval, len(training)))]

    results = {"config": args.config, "overrides": args.overrides,
               "devices": summary["devices"], "train_seconds": train_seconds,
               "fit_seconds": summary["fit_seconds"],
               "val_dice_curve": summary["history"].get("val_dice"),
               "loss_curve": summary["history"].get("loss"), "evaluations": []}
    for checkpoint in ("final.keras", "best.keras"):
        model = load_keras_model(out / "checkpoints" / checkpoint)
        for mode in ("as_saved", "batch_stats", "recalibrated"):
            if mode == "recalibrated":
                recalibrate_batchnorm(model, clean_batches(training))
            for split, volumes in (("test", test), ("training", train_subset)):
                if not volumes:
                    continue
                t = time.perf_counter()
                row = {"checkpoint": checkpoint, "mode": mode, "split": split,
                       "cases": len(volumes),
                       **summarise(evaluate(model, volumes, k, mode), names, fractions),
                       "seconds": round(time.perf_counter() - t, 1)}
                results["evaluations"].append(row)
                print(json.dumps({key: v for key, v in row.items() if key != "per_structure"}),
                      flush=True)
    (out / "fidelity.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
