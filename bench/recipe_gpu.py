"""Train one recipe on the JAX backend and score its held-out subjects on their own grid.

For comparing recipes whose preprocessing differs (the paper's preset resizes to 128³, the
full-resolution recipe keeps the scan's grid): the test subjects are read from their files,
preprocessed as in training, predicted as ``tf-explog predict`` does (whole volume, or
Gaussian-blended sliding windows of the patch size), mapped back onto the canonical input
grid (nearest neighbour for labels, see ``invert_labels``) and compared there with the
label files: per-structure Dice, mean, and the means over size thirds (by the structures'
voxel fraction in the test labels). Training is ``bench/train_jax.py`` (same model, loss,
recalibration and inference-mode validation as ``tf-explog train``).

Usage::

    KERAS_BACKEND=jax python bench/recipe_gpu.py --config train_configs/fullres_patches.yaml \\
        --set data.dataset=/tmp/synth/dataset.json --out /tmp/fullres

Writes ``--out/recipe.json`` and prints one JSON line.
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
from bn_fidelity import dice_per_class  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--checkpoint", default="best.keras")
    args = p.parse_args(argv)

    out = Path(args.out)
    argv_train = ["--config", args.config, "--out", str(out), "--workers", str(args.workers)]
    for item in args.overrides:
        argv_train += ["--set", item]
    start = time.perf_counter()
    summary = train_jax.main(argv_train)
    train_seconds = time.perf_counter() - start

    from tf_explog.builders import TrainingSetup
    from tf_explog.config import load_config
    from tf_explog.data.nifti import load_volume
    from tf_explog.data.preprocess import invert_labels
    from tf_explog.inference import load_keras_model, predict_volume

    setup = TrainingSetup.from_config(load_config(args.config, args.overrides), validate=False)
    model = load_keras_model(out / "checkpoints" / args.checkpoint)
    names, k = setup.label_names, setup.num_classes
    dice, counts, seconds = [], np.zeros(k), []
    for entry in setup.manifest.entries("test"):
        volume = load_volume(entry.image)
        truth = load_volume(entry.label, kind="label",
                            label_map=setup.preprocessor.label_map).array
        t = time.perf_counter()
        image, _, record = setup.preprocessor.forward(volume)
        probs = predict_volume(model, image, window=setup.window)
        pred = invert_labels(probs.argmax(-1).astype(np.int32), record)
        seconds.append(time.perf_counter() - t)
        dice.append(dice_per_class(pred, truth, k))
        counts += np.bincount(truth.ravel(), minlength=k)[:k]
    dice = np.stack(dice)
    per = np.nanmean(dice[:, 1:], axis=0)
    order = np.argsort(counts[1:])  # smallest first
    thirds = np.array_split(order, 3)
    result = {
        "config": args.config, "overrides": args.overrides, "devices": summary["devices"],
        "train_seconds": round(train_seconds, 1), "fit_seconds": round(summary["fit_seconds"], 1),
        "epochs": len(summary["epoch_seconds"]),
        "median_epoch_seconds": summary["median_later_epoch_seconds"],
        "test_subjects": int(dice.shape[0]),
        "predict_seconds_per_subject": round(float(np.mean(seconds)), 2),
        "test_grid": list(truth.shape),
        "dice_mean": round(float(np.mean(per)), 4),
        "dice_smallest_third": round(float(np.mean(per[thirds[0]])), 4),
        "dice_middle_third": round(float(np.mean(per[thirds[1]])), 4),
        "dice_largest_third": round(float(np.mean(per[thirds[2]])), 4),
        "dice_min_structure": round(float(np.min(per)), 4),
        "per_structure": {names[i + 1]: round(float(per[i]), 4) for i in order},
        "voxels_per_subject": {names[i + 1]: int(counts[i + 1] / dice.shape[0])
                               for i in order},
        "val_dice_curve": summary["history"].get("val_dice"),
    }
    (out / "recipe.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({key: v for key, v in result.items()
                      if key not in ("per_structure", "voxels_per_subject", "val_dice_curve")}),
          flush=True)
    return result


if __name__ == "__main__":
    main()
