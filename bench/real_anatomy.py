"""Real anatomy: how fast MR-like images are synthesised from 256³ label maps (one process,
then a process pool) and how long the Otsu head crop takes per volume.

    python bench/real_anatomy.py [--maps DIR] [--count N] [--workers K]

DIR defaults to ../shared/data/brain_label_maps (SynthSeg's training label maps). Prints
figures, never passes or fails on time; says which machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from tf_explog.data.label_synthesis import synthesize_from_label_maps
    from tf_explog.data.nifti import load_volume
    from tf_explog.data.preprocess import foreground_box
    from tf_explog.environment import environment_line

    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--maps", default=str(here.parent.parent / "shared" / "data" /
                                              "brain_label_maps"))
    parser.add_argument("--count", type=int, default=4, help="maps to synthesise")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    maps = Path(args.maps)
    if not maps.is_dir():
        raise SystemExit(f"{maps}: no label maps here; pass --maps DIR")
    print(f"machine: {environment_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for workers in (1, args.workers):
            out = Path(tmp) / f"w{workers}"
            start = time.perf_counter()
            result = synthesize_from_label_maps(maps, out, subjects=args.count, workers=workers,
                                                progress=False)
            wall = time.perf_counter() - start
            rates[workers] = args.count / wall
            print(f"synthesis, {workers} process(es): {args.count} subjects of 256³ in "
                  f"{wall:.1f} s = {rates[workers]:.3f} images/s "
                  f"(per subject {np.median(result['seconds']):.1f} s median)")
        if args.workers > 1:
            print(f"pool / one process: {rates[args.workers] / rates[1]:.2f}x")
        images = sorted((Path(tmp) / "w1" / "imagesTr").glob("*.nii.gz"))
        times, threshold_crops = [], 0
        for path in images:
            volume = load_volume(path, kind="image")
            start = time.perf_counter()
            lo, hi = foreground_box(volume.array, volume.spacing, margin_mm=10.0,
                                    method="otsu")
            times.append(time.perf_counter() - start)
            box = foreground_box(volume.array, volume.spacing, 0.05, 10.0)
            threshold_crops += box != ((0, 0, 0), volume.array.shape[:3])
            print(f"  {path.name}: Otsu box {lo}-{hi} of {volume.array.shape[:3]}")
        print(f"Otsu head crop: {np.median(times):.2f} s per 256³ volume (median of "
              f"{len(times)}); threshold 0.05 cropped {threshold_crops} of {len(times)}")


if __name__ == "__main__":
    main()
