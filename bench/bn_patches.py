"""Does BatchNorm recalibration on fewer patches keep the validation Dice? (patch-mode runs)

Validation recalibrates BatchNorm first (``tf_explog.batchnorm``); in patch mode it runs the
model over ``per_case`` training-like patches of every training case (8 by default,
``tf_explog.data.core.clean_patches``), which at the recipe's size costs more than the
validation itself. This trains a small network briefly on synthetic ``--shape``³ volumes in
``--patch``³ patches (the run's own data, loss and augmentation), then for each ``per_case``
recalibrates and validates (whole validation volumes, Gaussian-blended sliding windows, as
``InferenceValidation`` does), and prints one JSON line each: mean validation Dice, the
recalibration's seconds and patches, and the largest change of any BatchNorm statistic from
the 8-patch one. Also with Keras' moving averages (no recalibration), for scale.

    python bench/bn_patches.py [--shape 64 --patch 32 --subjects 10 --epochs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, default=64)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--subjects", type=int, default=10)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--per-case", type=int, nargs="+", default=[8, 4, 2, 1])
    args = p.parse_args(argv)

    import yaml

    from tf_explog.batchnorm import batchnorm_layers, recalibrate_batchnorm
    from tf_explog.builders import TrainingSetup
    from tf_explog.callbacks import validate_volumes
    from tf_explog.config import load_config
    from tf_explog.data.core import clean_patches
    from tf_explog.data.synthetic import generate_dataset
    from tf_explog.training import resolve_jit_compile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root / "data", subjects=args.subjects, test_subjects=0,
                         shape=args.shape, verbose=False)
        (root / "c.yaml").write_text(yaml.safe_dump({
            "name": "bn_patches", "runs_dir": "runs", "seed": 0,
            "data": {"dataset": "data/dataset.json", "mode": "patch",
                     "patch_size": [args.patch] * 3, "oversample": 0.33,
                     "validation_fraction": 0.3,
                     "preprocess": {"target_shape": args.shape}},
            "model": {"filters": [8, 16, 16, 32, 32], "encoder_depths": [1] * 5,
                      "decoder_depths": [1] * 4},
            "loss": {"name": "exp_log"},
            "train": {"epochs": args.epochs, "batch_size": 1, "steps_per_epoch": args.steps,
                      "learning_rate": 0.005, "image_summary_every": 0, "verbose": 0}}))
        config = load_config(root / "c.yaml")
        setup = TrainingSetup.from_config(config)
        keras.utils.set_random_seed(0)
        model = setup.build_model()
        setup.compile(model, resolve_jit_compile(config.train.jit_compile))
        start = time.perf_counter()
        data = setup.tf_dataset() if keras.backend.backend() == "tensorflow" else \
            setup.sequence("training")
        model.fit(data, epochs=args.epochs, steps_per_epoch=args.steps, verbose=0)
        train_s = time.perf_counter() - start
        train_volumes, val_volumes = setup.volumes("training"), setup.volumes("validation")
        layers = batchnorm_layers(model)
        print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                          "backend": keras.backend.backend(), "shape": args.shape,
                          "patch": args.patch, "training_cases": len(train_volumes),
                          "validation_cases": len(val_volumes), "train_s": round(train_s, 1),
                          "steps": args.epochs * args.steps}), flush=True)
        window, classes = (args.patch,) * 3, len(setup.label_names)

        def dice() -> float:
            return validate_volumes(model, val_volumes, classes, window=window)["dice"]

        print(json.dumps({"per_case": 0, "what": "Keras moving averages",
                          "val_dice": round(dice(), 4)}), flush=True)
        reference = None
        for per_case in args.per_case:
            batches = clean_patches(train_volumes, window, config.data.oversample,
                                    per_case=per_case, seed=config.seed)
            report = recalibrate_batchnorm(model, batches)
            # Per-channel standard deviation against the first (largest) setting's.
            stds = np.concatenate([np.sqrt(np.asarray(layer.moving_variance))
                                   for layer in layers])
            if reference is None:
                reference = stds
            change = np.abs(stds / reference - 1.0)
            print(json.dumps({"per_case": per_case, "patches": report.batches,
                              "recalibration_s": round(report.seconds, 2),
                              "val_dice": round(dice(), 4),
                              "bn_std_change_vs_first": {
                                  "median": round(float(np.median(change)), 4),
                                  "max": round(float(change.max()), 4)}}), flush=True)


if __name__ == "__main__":
    main()
