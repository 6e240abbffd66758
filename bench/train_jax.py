"""Train a config on the JAX backend with no TensorFlow anywhere (VolumeSequence + model.fit).

The GPU machine has JAX but no TensorFlow, so ``tf_explog.training`` (tf.data, TensorBoard,
tf.distribute) cannot run there. This script trains the same model, loss, class weights,
metrics and augmentation from the same config, fed by
:class:`tf_explog.data.pydataset.VolumeSequence`, and logs with ``CSVLogger`` and
``ModelCheckpoint`` only. It prints the device and the seconds of every epoch.

Usage (from the project root)::

    KERAS_BACKEND=jax python bench/train_jax.py --config train_configs/paper.yaml \\
        --out runs/jax_paper [--set train.epochs=2 ...] [--subjects 43 --shape 128] \\
        [--workers 2] [--overwrite]

When the config's ``dataset.json`` is missing, the synthetic benchmark is generated there
first (``tf_explog.data.synthetic.generate_dataset`` with ``--subjects`` / ``--shape``;
about 0.4 s per 128³ subject on this CPU).

On the GPU machine (``../shared/docs/GPU.md``; it has JAX, numpy, scipy, no TensorFlow, and
maybe no PyYAML, which ``tf_explog.config`` needs): here ``../shared/tools/gpu_wheels.sh
pyyaml``, then with ``carry=[".whl"]``::

    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl \
      && export PYTHONPATH=$PWD/.site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 || exit; \
    python3 bench/train_jax.py --config train_configs/paper.yaml --workers 4 \
      --set data.dataset=/tmp/synth/dataset.json --subjects 43 --shape 128 \
      --out $OUT/paper_jax [--set train.epochs=...]

Outputs under ``--out`` (a missing or empty folder, or any with ``--overwrite``):
``config.yaml`` (resolved config), ``metrics.csv`` (one row per epoch, ``epoch_seconds``
included), ``best.keras`` (best ``train.checkpoint_monitor``; ``loss`` when there is no
validation split), ``final.keras`` and ``summary.json`` (device, versions, seed, per-epoch
seconds, history, whether TensorFlow was imported).

The paper-scale loss comparison, one arm per call (then evaluate the held-out subjects with
``tf_explog.inference.predict_volume`` and ``tf_explog.evaluation``, both TensorFlow-free)::

    python3 bench/train_jax.py --config train_configs/reproduce_paper.yaml \
      --arm exp_log_g0.3 --out $OUT/exp_log_g0.3
    python3 bench/train_jax.py --config train_configs/reproduce_paper.yaml \
      --arm linear_dice --out $OUT/linear_dice

Data, model, loss and metrics come from ``tf_explog.builders.TrainingSetup``, as in
``tf_explog.training``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from tf_explog.builders import TrainingSetup  # noqa: E402
from tf_explog.callbacks import BestCheckpoint  # noqa: E402
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


class EpochClock(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to the logs and prints it (before CSVLogger writes the row)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        self.seconds.append(seconds)
        if logs is not None:
            logs["epoch_seconds"] = seconds
        shown = {k: round(float(v), 4) for k, v in (logs or {}).items()
                 if k in ("loss", "dice", "val_loss", "val_dice")}
        log(f"epoch {epoch + 1}: {seconds:.2f} s {shown}")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True,
                   help="YAML training config (e.g. train_configs/paper.yaml), or a reproduce "
                        "config (train_configs/reproduce_paper.yaml) together with --arm")
    p.add_argument("--arm", default=None,
                   help="with a reproduce config: train this arm (e.g. exp_log_g0.3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. train.epochs=2)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--subjects", type=int, default=43,
                   help="synthetic training subjects when dataset.json is missing (paper: 43)")
    p.add_argument("--shape", type=int, default=128,
                   help="synthetic volume size when dataset.json is missing")
    p.add_argument("--synth-seed", type=int, default=0, help="seed of the synthetic data set")
    p.add_argument("--skip-data-check", action="store_true",
                   help="do not decode every case to validate the data set first (for data "
                        "just generated; tf-explog train always checks)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads preparing batches (1: in the training loop)")
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
                     seed=args.synth_seed, verbose=False)
    log(f"synthetic data set written in {time.perf_counter() - t:.1f} s")
    return path


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{PREFIX} --out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"{PREFIX} --out {out}: not empty; pass --overwrite to write into it")
    out.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"{PREFIX} --workers: expected >= 1, got {args.workers}")
    try:
        if args.arm:
            from tf_explog.experiments import arm_train_config

            config = arm_train_config(args.config, args.arm, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"{PREFIX} {err}") from None
    if config.train.strategy != "none":
        raise SystemExit(f"{PREFIX} train.strategy={config.train.strategy!r} needs TensorFlow; "
                         "use train.strategy=none here")
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    ensure_dataset(config, args)

    log(f"backend {keras.backend.backend()}, devices {devices()}, seed {config.seed}, "
        f"policy {config.train.dtype_policy}")
    keras.utils.set_random_seed(config.seed)
    keras.config.set_dtype_policy(config.train.dtype_policy)
    try:
        return _train(config, args, out)
    finally:
        keras.config.set_dtype_policy("float32")


def _train(config: Config, args, out: Path) -> dict:
    setup = TrainingSetup.from_config(config, validate=not args.skip_data_check)
    train_seq, val_seq = setup.sequences(workers=args.workers)
    t = time.perf_counter()
    cached = train_seq.warm(workers=args.workers)
    if val_seq is not None:
        cached += val_seq.warm(workers=args.workers)
    warm_seconds = time.perf_counter() - t
    log(f"cache ready: {cached} cases in {warm_seconds:.1f} s ({train_seq.cache.cache_dir})")

    # "auto" means XLA on JAX whatever the device: unlike TensorFlow on this CPU (XLA ~10x
    # slower), JAX without jit runs op by op; measured on the 2-core CPU, 16^3 toy model:
    # jit 11.7 s first epoch (compile) then 0.32 s/epoch, eager 31 s then 1.5 s/epoch.
    jit = True if config.train.jit_compile == "auto" else bool(config.train.jit_compile)
    model = setup.build_model()
    setup.compile(model, jit)
    atomic_write(out / "config.yaml", config.dump())

    monitor = config.train.checkpoint_monitor
    if val_seq is None and monitor.startswith("val_"):
        monitor = "loss"
    clock = EpochClock()
    # Inference-mode validation after BatchNorm recalibration, as tf-explog train does.
    callbacks = setup.inference_callbacks() + [
        clock,
        BestCheckpoint(out / "best.keras", monitor=monitor),
        keras.callbacks.CSVLogger(str(out / "metrics.csv"), append=False),
    ]
    steps = config.train.steps_per_epoch or len(train_seq)
    log(f"training {len(train_seq.pairs)} cases ({steps} batches/epoch), "
        f"validation {0 if val_seq is None else len(val_seq.pairs)}, "
        f"{model.count_params():,} parameters, jit_compile={jit}, workers={args.workers}")
    t = time.perf_counter()
    # shuffle=False: the sequence shuffles itself, seeded; Keras's own batch-index shuffle
    # would use Python's global random instead.
    history = model.fit(
        train_seq, epochs=config.train.epochs,
        steps_per_epoch=config.train.steps_per_epoch, callbacks=callbacks,
        shuffle=False, verbose=config.train.verbose)
    fit_seconds = time.perf_counter() - t
    model.save(str(out / "final.keras"))
    if not (out / "best.keras").exists():
        model.save(str(out / "best.keras"))

    secs = clock.seconds
    summary = {
        "backend": keras.backend.backend(),
        "devices": devices(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "jax": _jax_version(),
        "tensorflow_imported": "tensorflow" in sys.modules,
        "config": str(Path(args.config).resolve()),
        "overrides": list(args.overrides),
        "fingerprint": config.fingerprint(),
        "seed": config.seed,
        "dtype_policy": config.train.dtype_policy,
        "jit_compile": jit,
        "workers": args.workers,
        "parameters": int(model.count_params()),
        "train_cases": len(train_seq.pairs),
        "validation_cases": 0 if val_seq is None else len(val_seq.pairs),
        "cache_seconds": warm_seconds,
        "fit_seconds": fit_seconds,
        "epoch_seconds": secs,
        "first_epoch_seconds": secs[0] if secs else None,
        "median_later_epoch_seconds": float(np.median(secs[1:])) if len(secs) > 1 else None,
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    log(f"done: fit {fit_seconds:.1f} s, epoch seconds {[round(s, 2) for s in secs]}, "
        f"outputs in {out}")
    return summary


def _jax_version():
    try:
        import jax

        return jax.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
