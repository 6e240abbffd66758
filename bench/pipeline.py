"""Benchmark of the NIfTI -> tf.data input pipeline (prints figures; never pass/fail).

Measures, on this machine:

- volumes/s in volume mode (default 128³, batch 1, augmentation on when
  ``tf_explog.augmentation`` exists; also without it), cold (decoding .nii.gz, preprocessing,
  writing the cache) and warm (memory-mapped cache);
- patches/s in patch mode (default 64³), cold and warm;
- peak RSS of a process streaming one cold and one warm epoch of 8 vs 64 volumes (should be
  flat: memory is bounded by the buffers, not by the data-set size);
- the training-step time of a model of the paper's size, when :func:`training_step_seconds`
  is filled in (hook left for the lead), and the ratio input time / step time.

Source data are random NIfTI files written here: 8 distinct cases (19 spherical structures
from ~30% of the side down to a few voxels, in three orientations); larger sets hard-link them
under other names, so each is still a separate cache entry, decoded on its own. Usage::

    python bench/pipeline.py [--size 128] [--patch 64] [--volumes 16] [--rss 8 64] [--out DIR]

Runs in about 1-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as tf_explog does (4x on AVX2 CPUs)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

ORIENTATIONS = [
    np.eye(4),
    np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]]),  # LIA
    np.diag([-1.0, -1.0, 1.0, 1.0]),  # LPS
]


def write_dataset(out: Path, cases: int, size: int, seed: int = 0, distinct: int = 8) -> Path:
    """Write ``cases`` random labelled volumes (``distinct`` real files, the rest hard links)."""
    rng = np.random.default_rng(seed)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    grid = np.indices((size,) * 3, dtype=np.float32)
    training = []
    for i in range(cases):
        img_p, lab_p = out / "imagesTr" / f"b{i:03d}.nii.gz", out / "labelsTr" / f"b{i:03d}.nii.gz"
        if i < distinct:
            labels = np.zeros((size,) * 3, np.uint8)
            # Spheres from large to a few voxels: the paper's kind of imbalance.
            for k, radius in enumerate(np.geomspace(size * 0.3, 1.5, 19), start=1):
                c = rng.uniform(radius, size - radius, 3)
                mask = sum((g - cc) ** 2 for g, cc in zip(grid, c)) <= radius**2
                labels[mask] = k
            image = (rng.normal(size=labels.shape) + labels * 0.2).astype(np.float32)
            affine = ORIENTATIONS[i % len(ORIENTATIONS)] @ np.diag([1.2, 1.2, 1.2, 1.0])
            nib.save(nib.Nifti1Image(image, affine), str(img_p))
            nib.save(nib.Nifti1Image(labels, affine), str(lab_p))
        else:
            src = i % distinct
            for kind, p in (("imagesTr", img_p), ("labelsTr", lab_p)):
                target = out / kind / f"b{src:03d}.nii.gz"
                try:
                    os.link(target, p)
                except OSError:
                    shutil.copy(target, p)
        training.append({"image": f"./imagesTr/{img_p.name}", "label": f"./labelsTr/{lab_p.name}"})
    labels = {"0": "background", **{str(k): f"s{k}" for k in range(1, 20)}}
    (out / "dataset.json").write_text(json.dumps(
        {"name": "bench", "modality": {"0": "MR"}, "labels": labels, "training": training,
         "test": []}))
    return out / "dataset.json"


def training_step_seconds(size: int, steps: int = 3) -> Optional[float]:
    """Median seconds per training step of the paper's model at ``size``³, batch 1.

    Timed by ``bench/train_step.py``: ``build_model`` (20 labels) with ``ExpLogLoss`` and
    Nadam, float32, no XLA (what ``jit_compile: auto`` chooses on CPU).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import time_case

    return time_case(size, "float32", False, steps=steps, warmup=1,
                     num_classes=20)["median_step_s"]


def _epoch(ds) -> tuple:
    t = time.perf_counter()
    n = 0
    for image, _ in ds:
        n += int(image.shape[0])
    return n, time.perf_counter() - t


def bench_throughput(manifest_path: Path, size: int, patch: int, work: Path) -> dict:
    from tf_explog.data.pipeline import make_dataset

    try:
        import tf_explog.augmentation  # noqa: F401
        augment = True
    except ImportError:
        augment = None
    results = {}
    common = dict(split="all", seed=0)
    cold_dir = work / "cache_volumes"
    ds = make_dataset(manifest_path, mode="volume", cache_dir=cold_dir, augment=augment, **common)
    n, t = _epoch(ds)
    results["volume_cold"] = (n, t)
    n, t = _epoch(ds)
    results["volume_warm"] = (n, t)
    if augment:
        ds = make_dataset(manifest_path, mode="volume", cache_dir=cold_dir, **common)
        results["volume_warm_noaug"] = _epoch(ds)
    results["augment"] = bool(augment)
    patches = dict(mode="patch", patch_size=patch, cache_dir=work / "cache_patches", **common)
    ds = make_dataset(manifest_path, **patches)
    results["patch_cold"] = _epoch(ds)
    ds = make_dataset(manifest_path, patches_per_volume=8, **patches)
    results["patch_warm"] = _epoch(ds)
    return results


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB.

    ``/proc/self/status`` VmHWM belongs to the process's own address space; ``ru_maxrss``
    would not do in a child process, as Linux carries it over from the parent across exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_child(manifest_path: str, cache_dir: str) -> None:
    """Stream one cold and one warm epoch, then print peak RSS figures (MiB) as JSON."""
    from tf_explog.data.pipeline import make_dataset

    base = _peak_rss_mib()
    ds = make_dataset(manifest_path, mode="volume", cache_dir=cache_dir, split="all")
    n1, _ = _epoch(ds)
    cold = _peak_rss_mib()
    n2, _ = _epoch(ds)
    print(json.dumps({"volumes": n1, "warm_volumes": n2, "after_import_mib": base,
                      "cold_epoch_mib": cold, "peak_mib": _peak_rss_mib()}))


def bench_rss(counts, size: int, work: Path) -> dict:
    out = {}
    for n in counts:
        root = work / f"rss_{n}"
        path = write_dataset(root, n, size, seed=1)
        # Import TensorFlow first so the baseline includes it.
        code = ("import sys, tensorflow; sys.argv = sys.argv[:1]; "
                f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import pipeline as b; "
                f"b._rss_child({str(path)!r}, {str(root / 'cache')!r})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child for {n} volumes failed:\n{proc.stderr[-2000:]}")
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="volume side (voxels)")
    parser.add_argument("--patch", type=int, default=64, help="patch side (voxels)")
    parser.add_argument("--volumes", type=int, default=16, help="cases for the throughput runs")
    parser.add_argument("--rss", type=int, nargs="*", default=[8, 64], help="case counts for RSS")
    parser.add_argument("--out", type=Path, default=None,
                        help="work dir (default: a temp dir, removed afterwards)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    work = args.out or Path(tempfile.mkdtemp(prefix="tf_explog_bench_"))
    try:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
              f"Python {platform.python_version()}, TensorFlow {tf.__version__}")
        t = time.perf_counter()
        path = write_dataset(work / "data", args.volumes, args.size)
        print(f"wrote {args.volumes} cases of {args.size}³ in {time.perf_counter() - t:.1f} s")
        r = bench_throughput(path, args.size, args.patch, work)

        def rate(key):
            n, s = r[key]
            return f"{n / s:7.2f}/s ({n} in {s:.1f} s)"

        aug = "augmentation on" if r["augment"] else "augmentation unavailable"
        print(f"\nvolume mode {args.size}³, batch 1, {aug}:")
        print(f"  cold (decode + preprocess + cache write): {rate('volume_cold')}")
        print(f"  warm (memory-mapped cache):               {rate('volume_warm')}")
        if "volume_warm_noaug" in r:
            print(f"  warm, no augmentation:                    {rate('volume_warm_noaug')}")
        print(f"patch mode {args.patch}³:")
        print(f"  cold (1 patch per decoded case):          {rate('patch_cold')}")
        print(f"  warm (8 patches per case read):           {rate('patch_warm')}")

        step = training_step_seconds(args.size)
        n, s = r["volume_warm"]
        if step is None:
            print("\ntraining step: n/a (fill bench/pipeline.py:training_step_seconds)")
        else:
            print(f"\ntraining step {args.size}³: {step * 1000:.0f} ms; "
                  f"input {s / n * 1000:.0f} ms per volume warm -> "
                  f"ratio input/step {s / n / step:.2f} (> 1: input-bound)")

        if args.rss:
            rss = bench_rss(args.rss, args.size, work)
            print(f"\npeak RSS (VmHWM) of a process streaming {args.size}³ volumes, batch 1:")
            for n, v in rss.items():
                print(f"  {n:3d} volumes: after importing TensorFlow "
                      f"{v['after_import_mib']:6.0f} MiB, "
                      f"after a cold epoch {v['cold_epoch_mib']:6.0f} MiB, "
                      f"after a warm epoch {v['peak_mib']:6.0f} MiB")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
