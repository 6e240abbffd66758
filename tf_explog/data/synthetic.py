"""Synthetic brain-like phantoms with the paper's kind of label imbalance.

The paper's 43 labelled T1 brain MRIs are not public, so this module draws phantoms with
**19 structures + background** whose sizes span the same range: large shells (cortex, white
matter, CSF), medium structures (lateral ventricles, cerebellum, brainstem) and small deep
nuclei of a few hundred voxels at 128³. The smallest/largest structure ratio is 0.12% at
128³ and 0.13–0.14% at 48³ (12 subjects; the paper: 0.14%; the tests bound it at 0.3%). Background (with the unlabelled
scalp and skull) is about 78% of the voxels at 128³, against 93.5% in the paper, whose
largest labelled structures were smaller than whole cortex / white-matter shells.

Each subject gets, from its own seed:

- a random global pose (rotation up to ±6° per axis, per-axis scale, translation) and a
  random smooth displacement field (a low-order cosine basis, a few voxels at 128³);
- one Gaussian-mixture component per tissue: the component means are drawn per subject
  around T1-like values (WM bright, GM darker, CSF dark) and every voxel gets its own draw;
- blur (partial-volume effect), a multiplicative smooth bias field, Rician noise and an
  arbitrary scanner gain, so intensity normalisation is needed as with real scans.

Geometry is defined in normalised coordinates ``u ∈ [-1, 1]`` per axis, so the phantom fills
any grid shape. Arrays are in canonical RAS voxel order (axis 0 → Right, 1 → Anterior,
2 → Superior); "left" structures sit at negative x. :func:`generate_dataset` stores some
subjects in another orientation (LIA, LPS) with the matching affine, so a canonical reader
(``nibabel.as_closest_canonical``) gets exactly the RAS arrays back.

Small shapes: the structures are ellipsoids whose semi-axes are raised to at least
:data:`MIN_SEMI_AXIS_VOXELS` voxels, so they are *scaled up*, not merely discretised away, on
small grids; where painting order still hides a structure completely (possible at 16³, where
neighbours overlap) the voxel of its region closest to its centre is given back to it. Every
one of the 19 structures thus has at least one voxel at any shape ≥ 16³ (smaller shapes are
refused). Sizes at small shapes are therefore relatively larger than at 128³.

Reference: Wong et al., "3D Segmentation with Exponential Logarithmic Loss for Highly
Unbalanced Object Sizes", MICCAI 2018 (data set description, §3).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from tf_explog.errors import InputError
from tf_explog.files import write_json

from .nifti import save_array

__all__ = [
    "LABEL_NAMES",
    "MIN_SEMI_AXIS_VOXELS",
    "MIN_SHAPE",
    "OutputExistsError",
    "generate_subject",
    "generate_dataset",
    "size_table",
    "format_size_table",
    "smallest_to_largest",
]

#: Label names by id (index = label value; 0 is background).
LABEL_NAMES: tuple[str, ...] = (
    "background",
    "white_matter",
    "cortex",
    "csf",
    "left_lateral_ventricle",
    "right_lateral_ventricle",
    "left_cerebellum",
    "right_cerebellum",
    "brainstem",
    "left_thalamus",
    "right_thalamus",
    "left_caudate",
    "right_caudate",
    "left_putamen",
    "right_putamen",
    "left_pallidum",
    "right_pallidum",
    "left_hippocampus",
    "right_hippocampus",
    "third_ventricle",
)

#: Smallest accepted size of each spatial axis.
MIN_SHAPE = 16
#: Lower bound (in voxels) on every ellipsoid semi-axis. A ball of radius ≥ √3/2 always
#: holds a lattice point, so 1.0 keeps every structure alive without deformation.
MIN_SEMI_AXIS_VOXELS = 1.0

# Tissues that are imaged but not labelled (they count as background in the label map).
_SCALP, _SKULL = 20, 21
_N_TISSUES = 22

# T1-like mean intensity per tissue id (white matter ≈ 1); index = tissue id.
_BASE_INTENSITY = np.array(
    [
        0.0,  # air / background
        0.92,  # white matter
        0.58,  # cortex
        0.22,  # csf
        0.18, 0.18,  # lateral ventricles
        0.66, 0.66,  # cerebellum
        0.82,  # brainstem
        0.76, 0.76,  # thalamus
        0.62, 0.62,  # caudate
        0.68, 0.68,  # putamen
        0.80, 0.80,  # pallidum
        0.56, 0.56,  # hippocampus
        0.18,  # third ventricle
        0.80,  # scalp (fat is bright on T1)
        0.10,  # skull
    ],
    dtype=np.float64,
)

# Shells: (tissue id, semi-axes) in normalised template coordinates, painted outside-in.
_R_HEAD = (0.84, 0.92, 0.82)
_R_SKULL = (0.79, 0.88, 0.77)
_R_CSF = (0.74, 0.85, 0.71)
_R_BRAIN = (0.70, 0.81, 0.67)
_R_WM = (0.54, 0.66, 0.50)

# Ellipsoidal structures painted in this order over the shells (later wins, so smaller
# structures come later): (label id, centre, semi-axes, half-space). Half-space "L" keeps
# x < 0 (the left hemisphere in RAS), "R" keeps x > 0. Units: normalised coordinates, where
# 1.0 is half the field of view (96 mm at 128³ and 1.5 mm).
_ELLIPSOIDS: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float], str], ...] = (
    (6, (0.0, -0.53, -0.43), (0.46, 0.25, 0.20), "L"),
    (7, (0.0, -0.53, -0.43), (0.46, 0.25, 0.20), "R"),
    (8, (0.0, -0.22, -0.42), (0.12, 0.12, 0.30), ""),
    (4, (-0.11, 0.02, 0.18), (0.07, 0.32, 0.10), ""),
    (5, (0.11, 0.02, 0.18), (0.07, 0.32, 0.10), ""),
    (9, (-0.10, -0.12, 0.04), (0.09, 0.16, 0.10), ""),
    (10, (0.10, -0.12, 0.04), (0.09, 0.16, 0.10), ""),
    (17, (-0.27, -0.22, -0.20), (0.06, 0.22, 0.07), ""),
    (18, (0.27, -0.22, -0.20), (0.06, 0.22, 0.07), ""),
    (13, (-0.27, 0.06, 0.03), (0.06, 0.17, 0.10), ""),
    (14, (0.27, 0.06, 0.03), (0.06, 0.17, 0.10), ""),
    (11, (-0.16, 0.20, 0.15), (0.055, 0.18, 0.08), ""),
    (12, (0.16, 0.20, 0.15), (0.055, 0.18, 0.08), ""),
    (15, (-0.20, 0.0, 0.0), (0.04, 0.09, 0.07), ""),
    (16, (0.20, 0.0, 0.0), (0.04, 0.09, 0.07), ""),
    (19, (0.0, -0.02, 0.02), (0.018, 0.14, 0.09), ""),
)

# Orientations cycled over the subjects of a data set (subject i uses _ORIENTATIONS[i % 3]);
# the first one is non-canonical so even a one-subject data set exercises reorientation.
_ORIENTATIONS = ("LIA", "RAS", "LPS")


class OutputExistsError(InputError, FileExistsError):
    """The output directory holds files and ``overwrite`` was not given."""


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _check_shape(shape: int | Sequence[int]) -> tuple[int, int, int]:
    """Validate a grid shape: an int (cube) or three ints, each ≥ MIN_SHAPE."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),) * 3
    try:
        dims = tuple(shape)
    except TypeError:
        raise InputError(
            f"synthetic: argument 'shape' must be an int or three ints, got {shape!r}"
        ) from None
    if len(dims) != 3 or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims
    ):
        raise InputError(
            f"synthetic: argument 'shape' must be an int or three ints, got {shape!r}"
        )
    if min(dims) < MIN_SHAPE:
        raise InputError(
            f"synthetic: argument 'shape' must have every axis ≥ {MIN_SHAPE} "
            f"(smaller grids cannot hold all 19 structures), got {dims}"
        )
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


def _cosine_basis(n: int, k: int) -> np.ndarray:
    """Low-frequency cosine basis on normalised coordinates: ``[k, n]`` float32.

    phi_j(u) = cos(pi * j * (u + 1) / 2), j = 0..k-1, with u ∈ [-1, 1].
    """
    u = _norm_coords(n)
    j = np.arange(k, dtype=np.float64)[:, None]
    return np.cos(np.pi * j * (u[None, :] + 1.0) / 2.0).astype(np.float32)


def _norm_coords(n: int) -> np.ndarray:
    """Voxel centres of an axis of n voxels in normalised units (1.0 = half the axis)."""
    return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) / (n / 2.0)


def _separable_field(coef: np.ndarray, bases: Sequence[np.ndarray]) -> np.ndarray:
    """Evaluate sum_ijk coef[i,j,k] phi_i(x) phi_j(y) phi_k(z) on the full grid.

    Done with broadcasting only (no BLAS), so results are bit-identical whatever the
    thread count: determinism per seed covers the array bytes.
    """
    bx, by, bz = bases
    # Contract the y and z factors on a 2D plane first: [k, H, W].
    plane = (coef[:, :, :, None, None] * by[None, :, None, :, None] * bz[None, None, :, None, :])
    plane = plane.sum(axis=(1, 2), dtype=np.float32)
    field = np.zeros((bx.shape[1], by.shape[1], bz.shape[1]), dtype=np.float32)
    for i in range(coef.shape[0]):
        field += bx[i][:, None, None] * plane[i][None, :, :]
    return field


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation matrix R = Rz·Ry·Rx for angles (radians) about axes x, y, z."""
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Warp:
    """Maps voxels to template coordinates: q = M (u - t) + d(u), per subject."""

    def __init__(self, shape: tuple[int, int, int], rng: np.random.Generator) -> None:
        self.shape = shape
        angles = rng.uniform(-6.0, 6.0, size=3) * math.pi / 180.0
        scale = rng.uniform(0.94, 1.04) * rng.uniform(0.97, 1.03, size=3)
        self.matrix = _rotation(angles) @ np.diag(1.0 / scale)
        self.shift = rng.uniform(-0.03, 0.03, size=3)
        # Smooth displacement: cosine basis up to 3 half-waves per axis, amplitude falling
        # with frequency; no constant term (that is the translation above).
        k = 4
        freq = np.add.outer(np.add.outer(np.arange(k), np.arange(k)), np.arange(k))
        coef = rng.normal(0.0, 1.0, size=(3, k, k, k)) * (0.012 / (1.0 + freq))
        coef[:, 0, 0, 0] = 0.0
        self.max_disp = float(np.abs(coef).sum(axis=(1, 2, 3)).max())
        self.u = [_norm_coords(n) for n in shape]
        bases = [_cosine_basis(n, k) for n in shape]
        q = np.empty((3,) + shape, dtype=np.float32)
        for c in range(3):
            q[c] = _separable_field(coef[c].astype(np.float32), bases)
            for a in range(3):
                lin = (self.matrix[c, a] * (self.u[a] - self.shift[a])).astype(np.float32)
                q[c] += lin.reshape([-1 if i == a else 1 for i in range(3)])
        self.q = q
        self._inv = np.linalg.inv(self.matrix)

    def bbox(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
        """Voxel slices that surely contain every voxel mapped into the template box."""
        margin = self.max_disp
        corners = np.array(np.meshgrid(*zip(lo - margin, hi + margin), indexing="ij"))
        corners = corners.reshape(3, -1)
        u = self._inv @ corners + self.shift[:, None]
        slices = []
        for a, n in enumerate(self.shape):
            i_lo = int(math.floor(u[a].min() * n / 2 + (n - 1) / 2)) - 1
            i_hi = int(math.ceil(u[a].max() * n / 2 + (n - 1) / 2)) + 2
            sl = slice(max(i_lo, 0), min(max(i_hi, 0), n))
            # A structure pushed off the grid still gets a non-empty search region.
            slices.append(sl if sl.stop > sl.start else slice(0, n))
        return tuple(slices)  # type: ignore[return-value]


def _ellipsoid_e2(q: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Squared ellipsoidal norm sum(((q - c) / r)²) over a block of template coordinates."""
    e2 = ((q[0] - np.float32(centre[0])) / np.float32(radii[0])) ** 2
    e2 += ((q[1] - np.float32(centre[1])) / np.float32(radii[1])) ** 2
    e2 += ((q[2] - np.float32(centre[2])) / np.float32(radii[2])) ** 2
    return e2


def _min_radii(radii: Sequence[float], shape: tuple[int, int, int]) -> np.ndarray:
    """Raise semi-axes to MIN_SEMI_AXIS_VOXELS voxels on this grid (normalised units)."""
    floor = np.array([MIN_SEMI_AXIS_VOXELS / (n / 2.0) for n in shape])
    return np.maximum(np.asarray(radii, dtype=np.float64), floor)


# --------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------


def _paint_tissues(warp: _Warp, rng: np.random.Generator) -> np.ndarray:
    """Tissue map (label ids 0..19 plus unlabelled scalp/skull) on the subject's grid."""
    q = warp.q
    shape = warp.shape
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[_ellipsoid_e2(q, (0, 0, 0), _R_HEAD) <= 1.0] = _SCALP
    tissue[_ellipsoid_e2(q, (0, 0, 0), _R_SKULL) <= 1.0] = _SKULL
    tissue[_ellipsoid_e2(q, (0, 0, 0), _R_CSF) <= 1.0] = 3

    # Folded cortex: the brain and white-matter surfaces are modulated by products of sines
    # (gyri), and CSF fills sulci in the outer cortex.
    def folds(freq: float) -> np.ndarray:
        f = rng.uniform(0.8, 1.2, size=3) * freq
        ph = rng.uniform(0, 2 * math.pi, size=3)
        out = np.sin(np.float32(f[0]) * q[0] + np.float32(ph[0]))
        out *= np.sin(np.float32(f[1]) * q[1] + np.float32(ph[1]))
        out *= np.sin(np.float32(f[2]) * q[2] + np.float32(ph[2]))
        return out

    brain_e2 = _ellipsoid_e2(q, (0, 0, 0), _R_BRAIN)
    g_out = folds(14.0)
    in_brain = brain_e2 <= (1.0 + 0.03 * g_out) ** 2
    tissue[in_brain] = 2
    sulci = in_brain & (brain_e2 > 0.8**2) & (folds(18.0) > 0.75)
    tissue[sulci] = 3
    wm_e2 = _ellipsoid_e2(q, (0, 0, 0), _R_WM)
    tissue[wm_e2 <= (1.0 + 0.12 * folds(12.0)) ** 2] = 1

    for label, centre, radii, half in _ELLIPSOIDS:
        mask, sl = _structure_mask(warp, centre, radii, half)
        tissue[sl][mask] = label
    _ensure_present(tissue, warp)
    return tissue


def _structure_mask(
    warp: _Warp, centre: Sequence[float], radii: Sequence[float], half: str
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Boolean mask of one ellipsoidal structure inside its voxel bounding box."""
    r = _min_radii(radii, warp.shape)
    c = np.asarray(centre, dtype=np.float64)
    sl = warp.bbox(c - r, c + r)
    qb = warp.q[(slice(None),) + sl]
    mask = _ellipsoid_e2(qb, c, r) <= 1.0
    if half == "L":
        mask &= qb[0] < 0
    elif half == "R":
        mask &= qb[0] >= 0
    return mask, sl


def _ensure_present(tissue: np.ndarray, warp: _Warp) -> None:
    """Give each hidden structure the voxel of its region nearest its centre (in place).

    Only needed on tiny grids where neighbouring structures overlap completely; the donor
    label always keeps at least one voxel.
    """
    counts = np.bincount(tissue.ravel(), minlength=_N_TISSUES)
    for label, centre, radii, half in _ELLIPSOIDS:
        if counts[label] > 0:
            continue
        r = _min_radii(radii, warp.shape)
        c = np.asarray(centre, dtype=np.float64)
        sl = warp.bbox(c - r, c + r)
        qb = warp.q[(slice(None),) + sl]
        e2 = _ellipsoid_e2(qb, c, r)
        if half == "L":
            e2 = np.where(qb[0] < 0, e2, np.inf)
        elif half == "R":
            e2 = np.where(qb[0] >= 0, e2, np.inf)
        block = tissue[sl]
        # Never take the last voxel of another structure.
        e2 = np.where(counts[block] > 1, e2, np.inf)
        flat = int(np.argmin(e2))
        idx = np.unravel_index(flat, e2.shape)
        counts[block[idx]] -= 1
        block[idx] = label
        counts[label] += 1


def _render_image(
    tissue: np.ndarray, warp: _Warp, rng: np.random.Generator
) -> np.ndarray:
    """T1-like image from a tissue map: GMM intensities, blur, bias field, Rician noise."""
    shape = tissue.shape
    means = _BASE_INTENSITY + rng.normal(0.0, 0.035, size=_N_TISSUES)
    means[0] = 0.0
    stds = rng.uniform(0.02, 0.045, size=_N_TISSUES)
    stds[0] = 0.0
    noise = rng.standard_normal(size=shape, dtype=np.float32)
    image = means.astype(np.float32)[tissue] + stds.astype(np.float32)[tissue] * noise

    sigma = rng.uniform(0.5, 1.0) * min(shape) / 128.0 + 0.3
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="constant", truncate=3.0)

    k = 3
    freq = np.add.outer(np.add.outer(np.arange(k), np.arange(k)), np.arange(k))
    coef = rng.normal(0.0, 1.0, size=(k, k, k)) * (0.12 / (1.0 + freq))
    coef[0, 0, 0] = 0.0
    log_bias = _separable_field(coef.astype(np.float32), [_cosine_basis(n, k) for n in shape])
    image *= np.exp(log_bias)

    sigma_n = np.float32(rng.uniform(0.015, 0.04))
    n1 = rng.standard_normal(size=shape, dtype=np.float32)
    n2 = rng.standard_normal(size=shape, dtype=np.float32)
    image = np.sqrt((image + sigma_n * n1) ** 2 + (sigma_n * n2) ** 2)
    gain = np.float32(rng.uniform(300.0, 1500.0))
    return (image * gain).astype(np.float32)


def generate_subject(
    shape: int | Sequence[int] = (128, 128, 128),
    seed: int | Sequence[int] = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one brain-like phantom in memory, in canonical RAS voxel order.

    Args:
        shape: grid shape ``(D, H, W)`` (or one int for a cube); every axis ≥ 16.
        seed: seed for ``numpy.random.default_rng`` (an int or a sequence of ints); the same
            seed gives the same array bytes.

    Returns:
        ``(image, labels)``: image float32 ``[D, H, W]`` (arbitrary scanner units, needs
        normalisation), labels uint8 ``[D, H, W]`` with ids 0..19 (see :data:`LABEL_NAMES`);
        every id is present.
    """
    dims = _check_shape(shape)
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError) as err:
        raise InputError(
            f"synthetic: argument 'seed' must be a non-negative int or ints, got {seed!r}"
        ) from err
    warp = _Warp(dims, rng)
    tissue = _paint_tissues(warp, rng)
    image = _render_image(tissue, warp, rng)
    labels = np.where(tissue >= _SCALP, 0, tissue).astype(np.uint8)
    return image, labels


# --------------------------------------------------------------------------------------
# Size table
# --------------------------------------------------------------------------------------


def size_table(
    labels_list: Sequence[np.ndarray], names: Sequence[str] = LABEL_NAMES
) -> list[dict[str, Any]]:
    """Per-label size statistics over a list of label volumes.

    Args:
        labels_list: integer label volumes (any shapes).
        names: label names by id; ids beyond it are called ``label_<id>``.

    Returns:
        One dict per label id 0..max: ``label``, ``name``, ``voxels`` (total over the list),
        ``mean_voxels`` (per volume), ``fraction`` (of all voxels) and ``ratio_to_largest``
        (voxels / voxels of the largest *structure*, id ≥ 1; ``None`` for background).
    """
    if len(labels_list) == 0:
        raise InputError("size_table: argument 'labels_list' is empty; expected ≥ 1 volume")
    counts = np.zeros(0, dtype=np.int64)
    total = 0
    for i, lab in enumerate(labels_list):
        arr = np.asarray(lab)
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(
                f"size_table: labels_list[{i}] must hold integer ids, got dtype {arr.dtype}"
            )
        if arr.size and arr.min() < 0:
            raise InputError(f"size_table: labels_list[{i}] holds negative ids")
        c = np.bincount(arr.ravel().astype(np.int64))
        if c.size > counts.size:
            counts = np.pad(counts, (0, c.size - counts.size))
        counts[: c.size] += c
        total += arr.size
    largest = int(counts[1:].max()) if counts.size > 1 else 0
    rows = []
    for k, v in enumerate(counts):
        rows.append(
            {
                "label": k,
                "name": names[k] if k < len(names) else f"label_{k}",
                "voxels": int(v),
                "mean_voxels": float(v) / len(labels_list),
                "fraction": float(v) / total if total else 0.0,
                "ratio_to_largest": (float(v) / largest if largest else 0.0) if k else None,
            }
        )
    return rows


def smallest_to_largest(rows: Sequence[dict[str, Any]]) -> float:
    """Smallest/largest structure size ratio (background excluded) from :func:`size_table`."""
    sizes = [r["voxels"] for r in rows if r["label"] != 0]
    if not sizes or max(sizes) == 0:
        raise InputError("smallest_to_largest: the table holds no structure voxels")
    return min(sizes) / max(sizes)


def format_size_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of :func:`size_table` rows, with the smallest/largest ratio."""
    name_w = max([len("name")] + [len(str(r["name"])) for r in rows])
    lines = [
        f"{'id':>3}  {'name':<{name_w}}  {'voxels/vol':>11}  {'fraction':>9}  {'ratio':>8}",
    ]
    for r in rows:
        ratio = "-" if r["ratio_to_largest"] is None else f"{100 * r['ratio_to_largest']:.2f}%"
        lines.append(
            f"{r['label']:>3}  {r['name']:<{name_w}}  {r['mean_voxels']:>11.1f}  "
            f"{100 * r['fraction']:>8.3f}%  {ratio:>8}"
        )
    structures = [r for r in rows if r["label"] != 0]
    if structures and max(r["voxels"] for r in structures) > 0:
        small = min(structures, key=lambda r: r["voxels"])
        big = max(structures, key=lambda r: r["voxels"])
        lines.append(
            f"smallest/largest structure: {100 * smallest_to_largest(rows):.3f}% "
            f"({small['name']} / {big['name']})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Data set on disk (Medical Segmentation Decathlon layout)
# --------------------------------------------------------------------------------------


def _check_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    vals = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)  # type: ignore[arg-type]
    try:
        vals = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise InputError(
            f"generate_dataset: argument 'spacing' must be a positive number or three, "
            f"got {spacing!r}"
        ) from None
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise InputError(
            f"generate_dataset: argument 'spacing' must be a positive number or three, "
            f"got {spacing!r}"
        )
    return vals  # type: ignore[return-value]


def _check_count(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise InputError(
            f"generate_dataset: argument '{name}' must be an int ≥ {minimum}, got {value!r}"
        )
    return int(value)


def _oriented(
    image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], axcodes: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store RAS arrays in orientation ``axcodes`` and return them with the matching affine.

    The RAS affine puts the world origin at the volume centre; reorienting uses nibabel's
    orientation transforms, so ``as_closest_canonical`` of the result gives the RAS arrays.
    """
    import nibabel.orientations as nio

    shape = image.shape
    ras_affine = np.diag(list(spacing) + [1.0])
    ras_affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(axcodes)))
    image_o = np.ascontiguousarray(nio.apply_orientation(image, ornt))
    labels_o = np.ascontiguousarray(nio.apply_orientation(labels, ornt))
    affine = ras_affine @ nio.inv_ornt_aff(ornt, shape)
    return image_o, labels_o, affine


_SUBDIRS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def _swap_into(new: Path, out: Path) -> None:
    """Replace the data-set items of ``out`` by those of ``new``; roll back on failure.

    Old items are parked in ``new/.replaced`` (deleted with ``new`` afterwards); other files
    in ``out`` are not touched.
    """
    parked = new / ".replaced"
    parked.mkdir()
    done: list[tuple[str, bool]] = []  # (item, whether an old one was parked)
    try:
        for item in _SUBDIRS + ("dataset.json",):
            had_old = (out / item).exists() or (out / item).is_symlink()
            if had_old:
                os.replace(out / item, parked / item)
            done.append((item, had_old))
            os.replace(new / item, out / item)
    except BaseException:
        for item, had_old in reversed(done):
            if (out / item).exists() and not (new / item).exists():
                os.replace(out / item, new / item)
            if had_old:
                os.replace(parked / item, out / item)
        raise


def _write_subject(task: tuple) -> np.ndarray:
    """Draw subject ``i`` and write its image and labels (a process-pool task); returns the
    canonical labels (for the size table)."""
    i, dims, seed, spacing3, axcodes, image_path, label_path = task
    image, labels = generate_subject(dims, seed=[seed, i])
    img_o, lab_o, affine = _oriented(image, labels, spacing3, axcodes)
    save_array(img_o, affine, image_path)
    save_array(lab_o, affine, label_path)
    return labels


def generate_dataset(
    out_dir: str | os.PathLike,
    subjects: int = 12,
    shape: int | Sequence[int] = (128, 128, 128),
    seed: int = 0,
    test_subjects: int | None = None,
    spacing: float | Sequence[float] = 1.5,
    overwrite: bool = False,
    verbose: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Write a synthetic brain data set in the Medical Segmentation Decathlon layout.

    Layout: ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/`` holding
    ``brain_NNN.nii.gz`` (image float32, labels uint8, same name in both) and
    ``dataset.json`` (``name``, ``labels``, ``modality``, ``numTraining``, ``numTest``,
    ``training``/``test`` lists of ``{"image": "./imagesTr/…", "label": "./labelsTr/…"}``).
    Subject ``i`` (training first, then test) is :func:`generate_subject` with seed
    ``[seed, i]`` and is stored in orientation ``("LIA", "RAS", "LPS")[i % 3]`` with a real
    affine (``spacing`` mm, world origin at the volume centre).

    The set is built in a temporary sibling directory and moved into place: a new or empty
    ``out_dir`` receives it in one rename; with ``overwrite`` the four sub-directories and
    ``dataset.json`` are swapped one by one and other files in ``out_dir`` are left alone.

    Args:
        out_dir: target directory (created if missing).
        subjects: number of training subjects (≥ 1).
        shape: grid shape (int or three ints, each ≥ 16).
        seed: base seed (int ≥ 0); same seed → same arrays.
        test_subjects: number of test subjects; ``None`` → ``max(1, subjects // 4)``.
        spacing: voxel size in mm (one number or three).
        overwrite: replace an existing data set in a non-empty ``out_dir``.
        verbose: print the per-label size table of the training set.
        workers: processes drawing subjects in parallel (the files do not depend on it;
            about 0.4 s per 128³ subject and 7 s per 256³ subject on one core).

    Returns:
        dict with ``out_dir``, ``dataset_json`` (paths as str), ``num_training``,
        ``num_test``, ``orientations`` (per subject file name), ``size_table`` (rows of
        :func:`size_table` over the training labels) and ``size_table_text``.

    Raises:
        OutputExistsError: ``out_dir`` is non-empty and ``overwrite`` is false.
        ValueError: a bad argument (named in the message).
    """
    dims = _check_shape(shape)
    subjects = _check_count("subjects", subjects, 1)
    seed = _check_count("seed", seed, 0)
    test_subjects = (
        max(1, subjects // 4) if test_subjects is None
        else _check_count("test_subjects", test_subjects, 0)
    )
    spacing3 = _check_spacing(spacing)
    workers = _check_count("workers", workers, 1)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"generate_dataset: out_dir {str(out)!r} exists and is not a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not overwrite:
        raise OutputExistsError(
            f"generate_dataset: out_dir {str(out)!r} is not empty; pass --overwrite (overwrite=True) "
            "to replace the data set in it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for sub in _SUBDIRS:
            (tmp / sub).mkdir()
        entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
        orientations: dict[str, str] = {}
        tasks = []
        for i in range(subjects + test_subjects):
            split, img_dir, lab_dir = (
                ("training", "imagesTr", "labelsTr") if i < subjects
                else ("test", "imagesTs", "labelsTs")
            )
            name = f"brain_{i:03d}.nii.gz"
            axcodes = _ORIENTATIONS[i % len(_ORIENTATIONS)]
            tasks.append((i, dims, seed, spacing3, axcodes, tmp / img_dir / name,
                          tmp / lab_dir / name))
            entries[split].append(
                {"image": f"./{img_dir}/{name}", "label": f"./{lab_dir}/{name}"}
            )
            orientations[name] = axcodes
        if workers > 1:
            # Each subject depends on its own seed only: the files are identical to 1 worker.
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                all_labels = list(pool.map(_write_subject, tasks))
        else:
            all_labels = [_write_subject(task) for task in tasks]
        train_labels = all_labels[:subjects]
        rows = size_table(train_labels)
        text = format_size_table(rows)
        manifest = {
            "name": "SyntheticBrain",
            "description": (
                "Synthetic brain-like T1 phantoms with 19 structures + background "
                "(tf_explog.data.synthetic)"
            ),
            "reference": "Wong et al., MICCAI 2018 (imbalance modelled on its brain data set)",
            "licence": "CC0-1.0",
            "release": "1.0",
            "tensorImageSize": "3D",
            "modality": {"0": "T1"},
            "labels": {str(k): n for k, n in enumerate(LABEL_NAMES)},
            "numTraining": subjects,
            "numTest": test_subjects,
            "training": entries["training"],
            "test": entries["test"],
            "synthetic": {
                "seed": seed,
                "shape": list(dims),
                "spacing": list(spacing3),
                "orientations": orientations,
            },
        }
        write_json(tmp / "dataset.json", manifest, indent=2)

        if not out.exists():
            os.replace(tmp, out)
        elif not non_empty:
            out.rmdir()  # rename() needs the target gone or empty; it is empty here
            os.replace(tmp, out)
        else:
            _swap_into(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    if verbose:
        print(f"wrote {subjects} training + {test_subjects} test subjects to {out}")
        print(text)
    return {
        "out_dir": str(out),
        "dataset_json": str(out / "dataset.json"),
        "num_training": subjects,
        "num_test": test_subjects,
        "orientations": orientations,
        "size_table": rows,
        "size_table_text": text,
    }
