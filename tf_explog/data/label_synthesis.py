"""MR-like images synthesised from real label maps (a benchmark with real anatomy).

Real brain label maps (FreeSurfer ``aseg``-style ids, e.g. the training label maps of
SynthSeg, Billot et al. 2023) carry the difficulty this package exists for: an optic chiasm
of ~200 voxels at 1 mm beside ~440,000 voxels of white matter, thin and curved shapes. They
come without images; this module draws one MR-like image per map, in the spirit of SynthSeg's
generative model (a Gaussian per label, then the scanner):

1. **Intensities**: every label id gets a mean and a standard deviation. In ``"t1"`` contrast
   the known FreeSurfer ids take T1-like means (white matter bright, grey matter darker, CSF
   dark; :data:`T1_MEANS`, on FreeSurfer's scale where white matter is 110), jittered per
   subject by ±``jitter``; ids it does not know (head tissue ≥ 500, anything else) get a
   random mean per subject in ``[10, 150]``. In ``"random"`` contrast every id gets a random
   mean in ``[0, 200]`` (SynthSeg's domain randomisation). Every voxel then draws its own value
   (``std``: 3 % of WM by default), so a structure is a texture, not a constant.
2. **Partial-volume blur**: a Gaussian of ``σ = 0.425 × acquisition / voxel`` voxels (a voxel
   of ``acquisition`` mm seen on the map's grid; FWHM ≈ the acquisition size).
3. **Bias field**: a smooth multiplicative field ``exp(b)``, ``b`` a low-order cosine series
   with ``bias`` its largest amplitude.
4. **Noise everywhere**, the air included: Rician (the magnitude of a complex Gaussian), so the
   air is not zero and a head crop cannot rely on it.

The label files are copied byte for byte (never rewritten), the images share their affine and
grid, and the data set is written in the Medical Segmentation Decathlon layout with the label
map (``{class: [original ids]}``) and class names beside it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy import ndimage

from tf_explog.errors import InputError
from tf_explog.files import write_json

from .nifti import NIFTI_SUFFIXES, list_nifti_files, nifti_stem, read_array, save_array, voxel_spacing

__all__ = ["T1_MEANS", "CONTRASTS", "synthesize_image", "synthesize_from_label_maps",
           "label_intensities"]

#: T1-like mean intensity per FreeSurfer id (white matter = 110, FreeSurfer's own scale).
#: Values follow the usual T1 ordering: WM > deep grey (pallidum > thalamus > putamen >
#: caudate) > cortex ≈ hippocampus > CSF; the optic chiasm is white matter (a nerve tract).
T1_MEANS: dict[int, float] = {
    0: 0.0,                     # air (noise only)
    2: 110.0, 41: 110.0,        # cerebral white matter
    3: 72.0, 42: 72.0,          # cerebral cortex
    4: 30.0, 43: 30.0,          # lateral ventricles
    5: 32.0, 44: 32.0,          # inferior lateral ventricles
    7: 105.0, 46: 105.0,        # cerebellum white matter
    8: 68.0, 47: 68.0,          # cerebellum cortex
    10: 92.0, 49: 92.0,         # thalamus
    11: 80.0, 50: 80.0,         # caudate
    12: 86.0, 51: 86.0,         # putamen
    13: 100.0, 52: 100.0,       # pallidum
    14: 30.0, 15: 30.0,         # 3rd, 4th ventricle
    16: 98.0,                   # brain stem
    17: 74.0, 53: 74.0,         # hippocampus
    18: 76.0, 54: 76.0,         # amygdala
    24: 28.0,                   # CSF
    25: 60.0, 57: 60.0,         # lesions (merged into white matter by the task's map)
    26: 80.0, 58: 80.0,         # accumbens
    28: 96.0, 60: 96.0,         # ventral DC
    30: 55.0, 62: 55.0,         # vessels
    31: 58.0, 63: 58.0,         # choroid plexus
    72: 30.0,                   # 5th ventricle
    77: 90.0,                   # WM hypointensities
    85: 108.0,                  # optic chiasm
}

CONTRASTS = ("t1", "random")
_WM = 110.0


def _check(name: str, value: Any, low: float, high: float = math.inf, *, integer=False):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not (low <= float(value) <= high) or math.isnan(float(value)):
        kind = "an integer" if integer else "a number"
        raise InputError(f"synthesize: argument '{name}' must be {kind} in [{low}, {high}], "
                         f"got {value!r}")
    return int(value) if integer else float(value)


def label_intensities(ids: Sequence[int], rng: np.random.Generator, contrast: str = "t1",
                      jitter: float = 0.05) -> dict[int, float]:
    """Mean intensity of every label id for one subject (see the module docstring)."""
    if contrast not in CONTRASTS:
        raise InputError(f"synthesize: argument 'contrast' must be one of {CONTRASTS}, "
                         f"got {contrast!r}")
    means = {}
    for i in sorted(int(v) for v in ids):
        if contrast == "random":
            means[i] = float(rng.uniform(0.0, 200.0))
        elif i in T1_MEANS:
            means[i] = T1_MEANS[i] * float(1.0 + rng.uniform(-jitter, jitter))
        else:
            means[i] = float(rng.uniform(10.0, 150.0))
    return means


def _cosine_field(shape: Sequence[int], rng: np.random.Generator, order: int = 3,
                  amplitude: float = 0.3) -> np.ndarray:
    """A smooth random field: Σ c_ijk cos(πi x) cos(πj y) cos(πk z), max |c| = amplitude."""
    coef = rng.uniform(-1.0, 1.0, size=(order + 1,) * 3) / np.arange(1, order + 2) ** 1.0
    coef = coef * amplitude / max(np.abs(coef).max(), 1e-12)
    bases = [np.cos(np.pi * np.arange(order + 1)[:, None] * np.linspace(0.0, 1.0, n)[None, :])
             for n in shape]
    field = np.einsum("ijk,ix,jy,kz->xyz", coef, *bases, optimize=True)
    return field.astype(np.float32)


def synthesize_image(labels: np.ndarray, spacing: Sequence[float], seed, *,
                     contrast: str = "t1", acquisition: Optional[float] = None,
                     std: float = 0.03, noise: float = 0.03, bias: float = 0.3,
                     jitter: float = 0.05) -> tuple[np.ndarray, dict[int, float]]:
    """One MR-like image of the label map ``labels`` (original ids, any integer array).

    Args:
        labels: ``[D, H, W]`` integer label ids.
        spacing: voxel size in mm along each axis of ``labels``.
        seed: anything ``numpy.random.default_rng`` takes; the same seed gives the same image.
        contrast: ``"t1"`` (T1-like means for known ids) or ``"random"`` (every id random).
        acquisition: simulated acquisition voxel size in mm (partial-volume blur with FWHM ≈
            that size); ``None``: the map's own voxel size.
        std: within-label standard deviation, as a fraction of white matter's intensity.
        noise: Rician noise σ, as a fraction of white matter's intensity (0: none).
        bias: largest amplitude of the log bias field (0: none).
        jitter: relative per-subject jitter of the T1 means.

    Returns:
        ``(image float32 [D, H, W], {id: mean intensity before blur, bias and noise})``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"synthesize: labels must be a 3-D integer array, got "
                         f"{labels.dtype} {labels.shape}")
    std = _check("std", std, 0.0, 1.0)
    noise = _check("noise", noise, 0.0, 1.0)
    bias = _check("bias", bias, 0.0, 2.0)
    jitter = _check("jitter", jitter, 0.0, 0.5)
    spacing = np.asarray([float(s) for s in spacing], float)
    acq = spacing if acquisition is None else np.full(3, _check("acquisition", acquisition,
                                                                1e-3, 100.0))
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(labels, return_inverse=True)
    means = label_intensities(ids, rng, contrast, jitter)
    lut = np.asarray([means[int(i)] for i in ids], np.float32)
    image = lut[inverse.reshape(labels.shape)]
    if std:
        image += rng.standard_normal(labels.shape, np.float32) * np.float32(std * _WM)
    sigma = 0.425 * acq / spacing
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest", truncate=3.0)
    if bias:
        image *= np.exp(_cosine_field(labels.shape, rng, amplitude=bias))
    if noise:
        s = np.float32(noise * _WM)
        real = image + rng.standard_normal(labels.shape, np.float32) * s
        imag = rng.standard_normal(labels.shape, np.float32) * s
        image = np.sqrt(real * real + imag * imag)
    else:
        np.maximum(image, 0.0, out=image)
    return image.astype(np.float32, copy=False), means


# --------------------------------------------------------------------------------------
# A data set on disk
# --------------------------------------------------------------------------------------


def _synthesize_one(task: tuple) -> dict:
    """Process-pool task: read one map, draw its image, write the image, copy the labels."""
    (index, label_file, image_path, label_path, seed, contrast, acquisition, options) = task
    start = time.perf_counter()
    data, affine = read_array(label_file)
    if data.ndim != 3:
        raise InputError(f"{label_file}: a label map must be 3-D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputError(f"{label_file}: label ids must be whole numbers")
        data = rounded.astype(np.int32)
    image, means = synthesize_image(data, voxel_spacing(affine), [seed, index],
                                    contrast=contrast, acquisition=acquisition, **options)
    save_array(image, affine, image_path)
    shutil.copyfile(label_file, label_path)  # the labels exactly as given
    return {"means": {str(k): round(v, 3) for k, v in means.items()},
            "seconds": time.perf_counter() - start}


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc})") from None


def synthesize_from_label_maps(
    maps_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    label_map: str | os.PathLike | None = None,
    label_names: str | os.PathLike | None = None,
    subjects: Optional[int] = None,
    test_subjects: int = 0,
    seed: int = 0,
    contrast: str = "t1",
    acquisition: Optional[float] = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    **options: Any,
) -> dict[str, Any]:
    """Write an MR-like data set (Decathlon layout) from a folder of label maps.

    Subject ``i`` (the maps in name order) gets :func:`synthesize_image` with seed
    ``[seed, i]``; the first ``subjects - test_subjects`` go to ``training``, the rest to
    ``test``. Label files are copied unchanged; ``dataset.json`` carries the label map (from
    ``label_map``, default ``MAPS_DIR/label_map.json`` when present) and the class names
    (``label_names``, default ``MAPS_DIR/labels.json``); the map is also written beside it as
    ``label_map.json``. Built in a temporary sibling folder and moved into place.

    Args:
        maps_dir: folder of ``.nii``/``.nii.gz`` label maps.
        out_dir: the data set folder (new or empty, or ``overwrite``).
        label_map, label_names: JSON files (see above).
        subjects: how many maps to use (default all).
        test_subjects: how many of them form the test list.
        seed: base seed; the same seed gives the same images.
        contrast, acquisition, **options: see :func:`synthesize_image`.
        workers: processes synthesising subjects in parallel (results do not depend on it).
        progress: print a line per subject (default: when stdout is a terminal).

    Returns:
        dict with ``out_dir``, ``dataset_json``, ``num_training``, ``num_test``,
        ``seconds`` (per subject) and ``intensities`` (per subject, id → mean).
    """
    from tf_explog.labels import load_label_map

    maps_dir = Path(maps_dir)
    files = list_nifti_files(maps_dir, "label map")
    n = len(files) if subjects is None else _check("subjects", subjects, 1, len(files),
                                                   integer=True)
    test_subjects = _check("test_subjects", test_subjects, 0, n - 1, integer=True)
    seed = _check("seed", seed, 0, 2**32 - 1, integer=True)
    workers = _check("workers", workers, 1, 256, integer=True)
    if contrast not in CONTRASTS:
        raise InputError(f"synthesize: argument 'contrast' must be one of {CONTRASTS}, "
                         f"got {contrast!r}")
    if acquisition is not None:
        _check("acquisition", acquisition, 1e-3, 100.0)
    files = files[:n]

    lm_path = Path(label_map) if label_map is not None else maps_dir / "label_map.json"
    lm = None
    if label_map is not None or lm_path.exists():
        lm = load_label_map(lm_path).to_dict()
    names_path = Path(label_names) if label_names is not None else maps_dir / "labels.json"
    if label_names is not None or names_path.exists():
        raw_names = _read_json(names_path, "label names")
        if not isinstance(raw_names, dict):
            raise InputError(f"{names_path}: expected an object {{\"0\": \"background\", ...}}")
        names = {str(k): str(v) for k, v in raw_names.items()}
    elif lm is not None:
        names = {"0": "background", **{str(k): f"class_{k}" for k in lm}}
    else:
        raise InputError(f"{maps_dir}: no labels.json or label_map.json; give label_names "
                         "(and label_map for ids that are not 0..N-1)")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"synthesize: out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"synthesize: out_dir {str(out)!r} is not empty; pass --overwrite "
                         "to replace it")
    if progress is None:
        progress = sys.stdout.isatty()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries: dict[str, list] = {"training": [], "test": []}
        tasks = []
        for i, f in enumerate(files):
            is_test = i >= n - test_subjects
            img_dir, lab_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
            suffix = next(s for s in NIFTI_SUFFIXES if f.name.endswith(s))
            name = nifti_stem(f.name) + suffix
            for d in (img_dir, lab_dir):
                (tmp / d).mkdir(exist_ok=True)
            entries["test" if is_test else "training"].append(
                {"image": f"./{img_dir}/{name}", "label": f"./{lab_dir}/{name}"})
            tasks.append((i, f, tmp / img_dir / name, tmp / lab_dir / name, seed, contrast,
                          acquisition, options))
        results = []
        start = time.perf_counter()

        def report(k, result):
            results.append(result)
            if progress:
                print(f"synthesised {k + 1}/{n}: {files[k].name} "
                      f"({result['seconds']:.1f} s)", flush=True)

        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(workers, n)) as pool:
                for k, result in enumerate(pool.map(_synthesize_one, tasks)):
                    report(k, result)
        else:
            for k, task in enumerate(tasks):
                report(k, _synthesize_one(task))
        manifest = {
            "name": out.name,
            "description": f"MR-like images synthesised from the label maps in {maps_dir} "
                           "(tf_explog.data.label_synthesis)",
            "tensorImageSize": "3D",
            "modality": {"0": "T1" if contrast == "t1" else "synthetic"},
            "labels": names,
            "numTraining": len(entries["training"]),
            "numTest": len(entries["test"]),
            "training": entries["training"],
            "test": entries["test"],
            "synthesis": {"seed": seed, "contrast": contrast, "acquisition": acquisition,
                          "options": options, "source": str(maps_dir.resolve()),
                          "intensities": {files[k].name: r["means"]
                                          for k, r in enumerate(results)}},
        }
        if lm is not None:
            manifest["label_map"] = lm
            write_json(tmp / "label_map.json", lm, indent=1)
        write_json(tmp / "dataset.json", manifest, indent=1)
        if out.exists():
            parked = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, parked / out.name)
            os.replace(tmp, out)
            shutil.rmtree(parked, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = [r["seconds"] for r in results]
    if progress:
        print(f"wrote {len(entries['training'])} training + {len(entries['test'])} test "
              f"subjects to {out} in {time.perf_counter() - start:.1f} s")
    return {"out_dir": str(out), "dataset_json": str(out / "dataset.json"),
            "num_training": len(entries["training"]), "num_test": len(entries["test"]),
            "seconds": seconds,
            "intensities": [r["means"] for r in results]}
