"""Train a config on the JAX backend with TensorFlow blocked, as on the GPU machine.

A thin call of the package's own trainer (`tf_explog.training.train`, which on JAX feeds
``model.fit`` through the ``keras.utils.PyDataset`` front end): the same run directory as
``tf-explog train`` (checkpoints/best.keras, checkpoints/final.keras, metrics.csv, config.yaml,
run.json, tensorboard/), plus ``summary.json`` (device, versions, per-epoch seconds, history,
whether TensorFlow was imported) and, when the config's ``dataset.json`` is missing, the
synthetic benchmark generated there first. ``KERAS_BACKEND=jax tf-explog train`` does the
same training; this script adds the data generation and the JSON summary the GPU checks read.

Usage (from the project root)::

    KERAS_BACKEND=jax python bench/train_jax.py --config train_configs/paper.yaml \\
        --out runs/jax_paper [--set train.epochs=2 ...] [--subjects 43 --shape 128] \\
        [--workers 2] [--overwrite]

On the GPU machine (``../shared/docs/GPU.md``; JAX, numpy, scipy, no TensorFlow, maybe no
PyYAML): here ``../shared/tools/gpu_wheels.sh pyyaml``, then with ``carry=[".whl"]``::

    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl \
      && export PYTHONPATH=$PWD/.site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 || exit; \
    python3 bench/train_jax.py --config train_configs/paper.yaml --workers 4 \
      --set data.dataset=/tmp/synth/dataset.json --subjects 43 --shape 128 \
      --out $OUT/paper_jax [--set train.epochs=...]

``--out`` must be missing or empty (``--overwrite`` deletes it first). One arm of a reproduce
config: ``--config train_configs/reproduce_paper.yaml --arm exp_log_g0.3``; the whole
comparison is ``KERAS_BACKEND=jax tf-explog reproduce --config ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


class _NoTensorFlow:
    """Import hook making ``import tensorflow`` fail, as on the GPU machine (not installed).

    Keras itself imports TensorFlow when it is installed (``keras.utils.set_random_seed``
    seeds it too); blocking it here proves, on any machine, that nothing needs it.
    """

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by train_jax.py)")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    raise SystemExit(f"[train_jax] runs on the JAX backend; KERAS_BACKEND is "
                     f"{os.environ['KERAS_BACKEND']!r} (use tf-explog train for TensorFlow)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_explog.config import Config, ConfigError, load_config  # noqa: E402
from tf_explog.files import atomic_write  # noqa: E402

PREFIX = "[train_jax]"


def log(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def devices() -> list:
    """The backend's devices as strings (JAX: ``jax.devices()``)."""
    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    return ["(not JAX) " + keras.backend.backend()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True,
                   help="YAML training config (e.g. train_configs/paper.yaml), or a reproduce "
                        "config (train_configs/reproduce_paper.yaml) together with --arm")
    p.add_argument("--arm", default=None,
                   help="with a reproduce config: train this arm (e.g. exp_log_g0.3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. train.epochs=2)")
    p.add_argument("--out", required=True, help="the run directory to create")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty --out first")
    p.add_argument("--subjects", type=int, default=43,
                   help="synthetic training subjects when dataset.json is missing (paper: 43)")
    p.add_argument("--shape", type=int, default=128,
                   help="synthetic volume size when dataset.json is missing")
    p.add_argument("--synth-seed", type=int, default=0, help="seed of the synthetic data set")
    p.add_argument("--workers", type=int, default=None,
                   help="threads preparing batches (train.data_workers)")
    return p.parse_args(argv)


def ensure_dataset(config: Config, args) -> Path:
    path = config.resolve(config.data.dataset)
    if path.is_file():
        return path
    if path.name != "dataset.json":
        raise SystemExit(f"{PREFIX} {path}: data.dataset not found (and not a dataset.json "
                         "path the synthetic data set could be generated at)")
    from tf_explog.data.synthetic import generate_dataset

    log(f"{path} missing: generating the synthetic data set ({args.subjects} subjects, "
        f"{args.shape}^3) in {path.parent}")
    t = time.perf_counter()
    generate_dataset(path.parent, subjects=args.subjects, shape=args.shape,
                     seed=args.synth_seed, verbose=False, workers=os.cpu_count() or 1)
    log(f"synthetic data set written in {time.perf_counter() - t:.1f} s")
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"train.data_workers={args.workers}")
    try:
        if args.arm:
            from tf_explog.experiments import arm_train_config

            config = arm_train_config(args.config, args.arm, overrides)
        else:
            config = load_config(args.config, overrides)
    except ConfigError as err:
        raise SystemExit(f"{PREFIX} {err}") from None
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.overwrite:
            raise SystemExit(f"{PREFIX} --out {out}: exists and is not empty; pass "
                             "--overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if out.is_dir():
        out.rmdir()  # empty: Run.create makes it
    ensure_dataset(config, args)
    log(f"backend {keras.backend.backend()}, devices {devices()}, seed {config.seed}, "
        f"policy {config.train.dtype_policy}")

    from tf_explog.runs import read_metrics_csv
    from tf_explog.training import resolve_jit_compile, train

    t = time.perf_counter()
    result = train(config, run_dir=out)
    fit_seconds = time.perf_counter() - t
    rows = read_metrics_csv(result.run_dir / "metrics.csv")
    secs = [float(r["epoch_seconds"]) for r in rows if "epoch_seconds" in r]
    history = {k: [float(r[k]) for r in rows if k in r]
               for k in sorted({k for r in rows for k in r})}
    summary = {
        "backend": keras.backend.backend(),
        "devices": devices(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "jax": _jax_version(),
        "tensorflow_imported": "tensorflow" in sys.modules,
        "config": str(Path(args.config).resolve()),
        "overrides": overrides,
        "fingerprint": config.fingerprint(),
        "seed": config.seed,
        "dtype_policy": config.train.dtype_policy,
        "jit_compile": resolve_jit_compile(config.train.jit_compile),
        "workers": config.train.data_workers,
        "best_checkpoint": str(result.best_checkpoint),
        "final_model": str(result.final_model),
        "fit_seconds": fit_seconds,  # data check, caching and the fit
        "epoch_seconds": secs,
        "first_epoch_seconds": secs[0] if secs else None,
        "median_later_epoch_seconds": float(np.median(secs[1:])) if len(secs) > 1 else None,
        "history": history,
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    log(f"done: {fit_seconds:.1f} s, epoch seconds {[round(s, 2) for s in secs]}, run {out}")
    return summary


def _jax_version():
    try:
        import jax

        return jax.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
