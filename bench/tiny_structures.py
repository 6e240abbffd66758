"""Why the smallest structures are lost: what each grid leaves of them, and what training sees.

    python bench/tiny_structures.py [--maps DIR] [--dataset data/brain/dataset.json]

Part 1 (label maps only, NumPy): for each structure of the task's label map, its voxels at
1 mm and after 2 mm / 4 mm resampling, and the best 1 mm Dice a *perfect* network at 2 mm or
4 mm could score once its prediction is brought back to 1 mm:
  - "nearest": it reproduces the labels resampled by nearest neighbour (what training on
    resampled labels teaches), written back by nearest neighbour;
  - "soft": it reproduces each coarse voxel's partial volumes (what a network trained
    against the 1 mm labels through a trilinear upsampling can learn,
    ``model.input_downsample``), written back by linear interpolation, thresholded at 1/2
    (the structure against everything else).
Part 2 (with --dataset, the synthesised data set): how often a training patch of the recipe
contains the optic chiasm, its class weight, and ``-ln Dice`` of predicting nothing
(ε = 1) next to that of a large structure.

Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def _block_mean(mask: np.ndarray, f: int) -> np.ndarray:
    s = [n // f for n in mask.shape]
    m = mask[:s[0] * f, :s[1] * f, :s[2] * f].astype(np.float32)
    return m.reshape(s[0], f, s[1], f, s[2], f).mean((1, 3, 5))


def ceilings(mask: np.ndarray, f: int) -> tuple:
    """(voxels at 1/f, nearest Dice, soft Dice) for one structure's 1 mm mask."""
    shape = mask.shape
    nearest = mask[f // 2::f, f // 2::f, f // 2::f]
    back = np.repeat(np.repeat(np.repeat(nearest, f, 0), f, 1), f, 2)[:shape[0], :shape[1],
                                                                      :shape[2]]
    soft = _block_mean(mask, f)
    up = ndimage.zoom(soft, f, order=1, mode="nearest", grid_mode=True)[:shape[0], :shape[1],
                                                                        :shape[2]]
    pad = [(0, n - u) for n, u in zip(shape, up.shape)]
    up = np.pad(up, pad)
    return int(nearest.sum()), _dice(mask, back), _dice(mask, up > 0.5)


def part1(maps: Path, count: int) -> None:
    from tf_explog.data.nifti import read_array
    from tf_explog.labels import apply_label_map, load_label_map

    label_map = load_label_map(maps / "label_map.json")
    names = json.loads((maps / "labels.json").read_text())
    files = sorted(maps.glob("*.nii.gz"))[:count]
    rows: dict = {}
    for path in files:
        data, _ = read_array(path)
        classes = apply_label_map(np.rint(data).astype(np.int32), label_map, "background")
        for c in range(1, label_map.num_classes):
            mask = classes == c
            r = [int(mask.sum())]
            for f in (2, 4):
                r.extend(ceilings(mask, f))
            rows.setdefault(c, []).append(r)
    print(f"{len(files)} label maps from {maps}; per structure, mean over the maps")
    print(f"{'structure':<28}{'1 mm':>8}{'2 mm':>7}{'near':>6}{'soft':>6}"
          f"{'4 mm':>7}{'near':>6}{'soft':>6}")
    for c, r in sorted(rows.items(), key=lambda kv: np.mean([x[0] for x in kv[1]])):
        m = np.mean(np.asarray(r, float), axis=0)
        print(f"{names[str(c)]:<28}{m[0]:>8.0f}{m[1]:>7.0f}{m[2]:>6.2f}{m[3]:>6.2f}"
              f"{m[4]:>7.0f}{m[5]:>6.2f}{m[6]:>6.2f}")


def part2(dataset: Path, config: Path, arm: str, patches: int) -> None:
    from tf_explog.builders import TrainingSetup
    from tf_explog.experiments import _arm_train_config, load_reproduce_config

    # The arm's settings on the given data set (nothing is synthesised here).
    rc, base_dir = load_reproduce_config(config)
    cfg = _arm_train_config(rc, base_dir, arm, rc.arms[arm],
                            [f"data.dataset={dataset.resolve()}"])
    setup = TrainingSetup.from_config(cfg)
    from tf_explog.data.sampling import SplitSampler

    sampler = SplitSampler(setup.manifest, "training", mode="patch",
                           patch_size=cfg.data.patch_size, oversample=cfg.data.oversample,
                           cache_dir=setup.cache_dir, preprocessor=setup.preprocessor)
    chiasm = len(setup.label_names) - 1
    rng = np.random.default_rng(0)
    hits, voxels = 0, []
    for i in range(patches):
        entry = sampler.entry(i % len(sampler))
        _, labels = sampler.read(entry, rng)
        n = int((labels == chiasm).sum())
        hits += n > 0
        voxels.append(n)
    weights = setup.class_weights
    print(f"arm {arm}: {patches} training patches of {cfg.data.patch_size} "
          f"(oversample {cfg.data.oversample}): the optic chiasm is in {hits / patches:.0%}, "
          f"{np.mean([v for v in voxels if v] or [0]):.0f} voxels when present")
    if weights is not None:
        print(f"  class weights: optic chiasm {weights[chiasm]:.0f}, background "
              f"{weights[0]:.2f}, largest structure {min(weights[1:]):.2f}")
    n = np.mean([v for v in voxels if v] or [0])
    print(f"  -ln Dice of predicting nothing (eps = 1): optic chiasm {np.log(n + 1):.2f}, "
          f"its (.)^0.3 {np.log(n + 1) ** 0.3:.2f}")


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--maps", default=str(here.parent.parent / "shared" / "data" /
                                              "brain_label_maps"))
    parser.add_argument("--dataset", default=None, help="the synthesised data set")
    parser.add_argument("--config", default=str(here.parent / "train_configs" /
                                                "reproduce_brain.yaml"))
    parser.add_argument("--patches", type=int, default=200)
    parser.add_argument("--count", type=int, default=10, help="label maps to read")
    args = parser.parse_args()
    if args.count:
        part1(Path(args.maps), args.count)
    if args.dataset:
        for arm in ("recipe_2mm", "recipe"):
            part2(Path(args.dataset), Path(args.config), arm, args.patches)


if __name__ == "__main__":
    main()
