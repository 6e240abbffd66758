"""Invertible preprocessing of canonical volumes: resampling, cube padding, resizing,
crop/pad and intensity normalisation.

:class:`Preprocessor` is a small JSON-able description of what to do; ``forward`` applies it to
one image (and optionally its labels) and returns a ``record`` saying exactly what was done, so
that :func:`invert_labels` / :func:`invert_probabilities` can map a prediction back onto the
canonical grid of the input, voxel for voxel (then :func:`tf_explog.data.nifti.save_like`
writes it in the file's own orientation).

Geometry uses voxel *centres*: resampling an axis of ``n_in`` voxels to ``n_out`` voxels maps
output voxel ``j`` to input coordinate ``(j + 0.5) * n_in / n_out - 0.5`` (both grids cover the
same physical extent), which makes nearest-neighbour upsampling of labels exactly invertible.

The paper's preset (Wong et al. 2018, §3): resample to isotropic spacing at the smallest voxel
size, zero-pad to a cube, resize to 128³.

This module does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from .nifti import LabelMap, Volume, apply_label_map
from tf_explog.errors import InputError

__all__ = [
    "Preprocessor",
    "invert_labels",
    "invert_probabilities",
    "resample_to_shape",
    "foreground_box",
    "affines_close",
    "resamples",
    "RESAMPLING_STEPS",
    "CROP_PAD_STEPS",
    "PREPROCESS_FORMAT",
]

# Bump when the algorithm changes in a way that changes outputs: it is part of the fingerprint,
# so on-disk caches built by older code are rebuilt.
PREPROCESS_FORMAT = 2  # 2: records carry the background intensity

#: The steps a preprocessing record holds, by how they are undone: resampling steps by
#: resampling back (labels and probabilities change values), crops and pads by index
#: selection (exact). Every reader of a record asks here.
RESAMPLING_STEPS = ("resample", "resize")
CROP_PAD_STEPS = ("pad_to_cube", "crop_pad", "crop_foreground")


def resamples(record: Mapping) -> bool:
    """Whether undoing ``record`` resamples (else it only crops and pads: exact)."""
    return any(step["op"] in RESAMPLING_STEPS for step in record["steps"])


_NORMALIZATIONS = (None, "zscore", "zscore_nonzero")
_PRESETS = (None, "paper")
_IMAGE_ORDERS = (1, 3)
_UNKNOWN = ("background", "raise")
_CROP_METHODS = ("threshold", "otsu")
_EPS_STD = 1e-8


def affines_close(a: np.ndarray, b: np.ndarray, atol: float = 1e-3) -> bool:
    """True when two 4x4 affines agree to ``atol`` (mm for translations; headers store float32)."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=0.0, atol=atol))


def _triple(value, name: str, kind=float) -> Optional[tuple]:
    """None, a positive scalar or 3 positive numbers -> None or a 3-tuple."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name}: expected a positive number or 3 of them, got {value!r}")
    if np.isscalar(value):
        value = (value,) * 3
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(
            f"{name}: expected a positive number or 3 of them, got {value!r}"
        ) from None
    if len(out) != 3 or any(not np.isfinite(v) or v <= 0 for v in out):
        raise InputError(f"{name}: expected a positive number or 3 of them, got {value!r}")
    if kind is int and any(float(v) != float(w) for v, w in zip(out, value)):
        raise InputError(f"{name}: expected integers, got {value!r}")
    return out


def resample_to_shape(array: np.ndarray, out_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample the first three axes of ``array`` to ``out_shape`` (same physical extent).

    Args:
        array: ``[D, H, W]`` or ``[D, H, W, C]``.
        out_shape: target ``(D', H', W')``.
        order: spline order (0 nearest for labels, 1 linear, 3 cubic).

    Returns:
        Array of shape ``out_shape (+ (C,))`` and the input's dtype.
    """
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(array.shape[:3]) == out_shape:
        return array.copy()
    if array.ndim == 4:
        return np.stack(
            [resample_to_shape(array[..., c], out_shape, order) for c in range(array.shape[3])],
            axis=-1,
        )
    out = np.empty(out_shape, dtype=array.dtype)
    # grid_mode=True: input and output grids span the same extent (voxel edges aligned), i.e.
    # output j <-> input (j + 0.5) * n_in / n_out - 0.5; "nearest" extends the border voxel.
    ndimage.zoom(
        array,
        np.divide(out_shape, array.shape[:3]),
        output=out,
        order=order,
        mode="nearest",
        grid_mode=True,
        prefilter=order > 1,
    )
    return out


def _resampled_shape(shape, spacing, target_spacing) -> tuple:
    """Grid shape after resampling to ``target_spacing`` ("min" or 3 numbers), same extent."""
    target = (min(spacing),) * 3 if target_spacing == "min" else target_spacing
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def _scale_affine(affine: np.ndarray, in_shape, out_shape) -> np.ndarray:
    """Affine of a resampled grid (voxel j of the new grid = (j + .5) * r - .5 of the old)."""
    r = np.divide(np.asarray(in_shape, float), np.asarray(out_shape, float))
    m = np.eye(4)
    m[:3, :3] = np.diag(r)
    m[:3, 3] = 0.5 * r - 0.5
    return affine @ m


def _shift_affine(affine: np.ndarray, before) -> np.ndarray:
    """Affine after padding ``before[i]`` voxels (negative: cropping) at the start of axis i."""
    m = np.eye(4)
    m[:3, 3] = -np.asarray(before, float)
    return affine @ m


def _crop_pad(array: np.ndarray, before, after, value) -> np.ndarray:
    """Pad (positive amounts) or crop (negative amounts) each spatial axis at both ends."""
    crop = tuple(
        slice(max(-b, 0), n - max(-a, 0)) for n, b, a in zip(array.shape, before, after)
    )
    array = array[crop]
    pad = [(max(b, 0), max(a, 0)) for b, a in zip(before, after)]
    pad += [(0, 0)] * (array.ndim - 3)
    if any(p != (0, 0) for p in pad):
        array = np.pad(array, pad, mode="constant", constant_values=value)
    return np.ascontiguousarray(array)


def _box_of(mask: np.ndarray, spacing: Sequence[float], margin_mm: float, scale=1) -> tuple:
    """``(lo, hi)`` of ``mask``'s bounding box (voxels of a grid ``scale`` times finer),
    grown by ``margin_mm`` and clipped to ``mask.shape * scale``."""
    shape = [int(n) * scale for n in mask.shape]
    margin = [int(np.ceil(margin_mm / float(s))) for s in spacing]
    lo, hi = [], []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(max(0, int(present[0]) * scale - margin[axis]))
        hi.append(min(shape[axis], (int(present[-1]) + 1) * scale + margin[axis]))
    return tuple(lo), tuple(hi)


def head_mask(image: np.ndarray, spacing: Sequence[float], smooth_mm: float = 2.0,
              min_component: float = 0.01) -> np.ndarray:
    """The head (everything that is not air) of ``[D, H, W(, C)]``, robust to noise in the air.

    The first channel is smoothed (Gaussian, ``smooth_mm``), thresholded by Otsu's method,
    and connected components smaller than ``min_component`` times the largest are dropped
    (noise specks in the air survive smoothing as small islands); holes are filled in 3-D
    (dark tissue inside the head, e.g. skull and CSF, belongs to the head).
    """
    from skimage.filters import threshold_otsu

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 4:
        image = image[..., 0]
    sigma = [smooth_mm / float(s) for s in spacing]
    smooth = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    if not np.isfinite(smooth).all() or float(smooth.max()) <= float(smooth.min()):
        return np.zeros(image.shape, bool)
    mask = smooth > threshold_otsu(smooth)
    components, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(components.ravel())[1:]
        keep = np.flatnonzero(sizes >= min_component * sizes.max()) + 1
        mask = np.isin(components, keep)
    return ndimage.binary_fill_holes(mask)


def foreground_box(image: np.ndarray, spacing: Sequence[float], threshold: float = 0.0,
                   margin_mm: float = 10.0, method: str = "threshold") -> tuple:
    """``(lo, hi)`` voxel bounds (``hi`` exclusive) of the foreground of ``[D, H, W, C]``,
    grown by ``margin_mm`` and clipped to the volume; the whole volume when nothing is
    foreground.

    Foreground, by ``method``:
      - ``"threshold"``: any channel ``!= 0`` (``threshold`` 0, for skull-stripped or
        conformed scans), else any channel ``> threshold * 99.5th percentile`` of that
        channel. Noise in the air passes any low threshold: use "otsu" for raw scans.
      - ``"otsu"``: :func:`head_mask`, computed on a grid 2× coarser (voxels under 2 mm)
        for speed; the box is mapped back to full resolution.
    """
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., np.newaxis]
    shape = tuple(int(n) for n in image.shape[:3])
    if method not in _CROP_METHODS:
        raise InputError(f"crop_method: expected one of {_CROP_METHODS}, got {method!r}")
    scale = 1
    if method == "otsu":
        # Coarsen to ~2 mm: the box only needs the margin's precision, and 256³ at 1 mm
        # would take seconds per volume.
        scale = max(1, int(2.0 // max(float(min(spacing)), 1e-6)))
        small = image[::scale, ::scale, ::scale, 0] if scale > 1 else image[..., 0]
        mask = head_mask(small, [float(s) * scale for s in spacing])
    elif threshold == 0:
        mask = np.any(image != 0, axis=-1)
    else:
        levels = np.percentile(image.reshape(-1, image.shape[-1]), 99.5, axis=0) * threshold
        mask = np.any(image > levels, axis=-1)
    if not mask.any():
        return (0, 0, 0), shape
    lo, hi = _box_of(mask, spacing, margin_mm, scale)
    return lo, tuple(min(h, n) for h, n in zip(hi, shape))


def _centred_amounts(in_shape, out_shape):
    """(before, after) per axis to go from in_shape to out_shape, centred (negative = crop)."""
    diff = np.asarray(out_shape, int) - np.asarray(in_shape, int)
    before = np.where(diff >= 0, diff // 2, -((-diff) // 2))
    after = diff - before
    return [int(v) for v in before], [int(v) for v in after]


@dataclass
class Preprocessor:
    """What to do to each canonical volume before training (and undo after inference).

    Steps, in order (each optional): label map -> crop to the foreground (``crop_foreground``)
    -> resample to ``target_spacing`` -> zero-pad to a cube -> resize to ``resize_shape`` ->
    centred crop/pad to ``target_shape`` -> percentile clipping -> intensity normalisation
    (computed on the final grid, so padding is excluded by "zscore_nonzero").

    Args:
        target_spacing: None (keep), "min" (isotropic at the volume's smallest spacing), a
            spacing in mm, or 3 of them (canonical axis order).
        pad_to_cube: zero-pad every axis to the longest one (centred).
        resize_shape: resize (interpolate, keeping the extent) to this shape; int or 3 ints.
        target_shape: centred crop/pad to this shape; int or 3 ints.
        image_order: image interpolation, 1 (linear) or 3 (cubic); labels are always nearest.
        normalization: "zscore" (whole volume), "zscore_nonzero" (statistics over non-zero
            voxels, zero voxels stay 0) or None; per channel.
        clip_percentiles: ``(low, high)`` percentiles to clip intensities to before
            normalising (over the same voxels as the statistics), or None.
        pad_value: image value used for padding (labels pad with 0 = background).
        crop_foreground: crop each volume to the bounding box of its foreground (the head),
            found from the image alone so that it works at test time, grown by
            ``crop_margin``; recorded like any crop, so predictions are written back onto the
            full input grid (the cropped-away region as background).
        crop_threshold: foreground voxels: any channel ``!= 0`` when 0 (skull-stripped or
            conformed scans, as nnU-Net crops), else ``> crop_threshold`` times the image's
            99.5th percentile (scans with background noise), in ``[0, 1)``.
        crop_margin: margin around the foreground box, in mm (canonical axes).
        crop_method: how the foreground is found: "threshold" (``crop_threshold`` above) or
            "otsu" (Otsu's threshold of a smoothed image, small islands dropped, holes
            filled: robust to the noise in the air of raw scans; see :func:`head_mask`).
        label_map: ``{new_id: [original values]}`` applied to labels (see ``nifti.LabelMap``).
        unknown_labels: "background" or "raise" for label values outside ``label_map``.
        preset: None or "paper": fills unset geometry options with the paper's
            (``target_spacing="min"``, ``pad_to_cube=True``, ``resize_shape=128``); pass
            ``resize_shape`` to change the size (see :meth:`paper`).
    """

    target_spacing: Union[None, str, float, Sequence[float]] = None
    pad_to_cube: bool = False
    resize_shape: Union[None, int, Sequence[int]] = None
    target_shape: Union[None, int, Sequence[int]] = None
    image_order: int = 1
    normalization: Optional[str] = "zscore"
    clip_percentiles: Optional[Sequence[float]] = None
    pad_value: float = 0.0
    label_map: Optional[Mapping] = None
    unknown_labels: str = "background"
    preset: Optional[str] = None
    crop_foreground: bool = False
    crop_threshold: float = 0.0
    crop_margin: float = 10.0
    crop_method: str = "threshold"

    def __post_init__(self) -> None:
        if self.preset not in _PRESETS:
            raise InputError(f"preset: expected one of {_PRESETS}, got {self.preset!r}")
        if self.preset == "paper":
            if self.target_spacing is None:
                self.target_spacing = "min"
            self.pad_to_cube = True
            if self.resize_shape is None:
                self.resize_shape = 128
        if isinstance(self.target_spacing, str):
            if self.target_spacing != "min":
                raise InputError(
                    f"target_spacing: expected None, 'min', a number or 3 numbers, "
                    f"got {self.target_spacing!r}"
                )
        else:
            self.target_spacing = _triple(self.target_spacing, "target_spacing", float)
        self.resize_shape = _triple(self.resize_shape, "resize_shape", int)
        self.target_shape = _triple(self.target_shape, "target_shape", int)
        if not isinstance(self.pad_to_cube, (bool, np.bool_)):
            raise InputError(f"pad_to_cube: expected a bool, got {self.pad_to_cube!r}")
        self.pad_to_cube = bool(self.pad_to_cube)
        if self.image_order not in _IMAGE_ORDERS or isinstance(self.image_order, bool):
            raise InputError(f"image_order: expected 1 or 3, got {self.image_order!r}")
        self.image_order = int(self.image_order)
        if self.normalization not in _NORMALIZATIONS:
            raise InputError(
                f"normalization: expected one of {_NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.clip_percentiles is not None:
            try:
                lo, hi = (float(v) for v in self.clip_percentiles)
            except (TypeError, ValueError):
                raise InputError(
                    f"clip_percentiles: expected (low, high), got {self.clip_percentiles!r}"
                ) from None
            if not 0.0 <= lo < hi <= 100.0:
                raise InputError(
                    "clip_percentiles: expected 0 <= low < high <= 100, "
                    f"got {self.clip_percentiles!r}"
                )
            self.clip_percentiles = (lo, hi)
        try:
            self.pad_value = float(self.pad_value)
        except (TypeError, ValueError):
            raise InputError(f"pad_value: expected a number, got {self.pad_value!r}") from None
        if self.label_map is not None:
            self.label_map = LabelMap.coerce(self.label_map).to_dict()
        if not isinstance(self.crop_foreground, (bool, np.bool_)):
            raise InputError(f"crop_foreground: expected a bool, got {self.crop_foreground!r}")
        self.crop_foreground = bool(self.crop_foreground)
        for key, low, high in (("crop_threshold", 0.0, 1.0), ("crop_margin", 0.0, np.inf)):
            value = getattr(self, key)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise InputError(f"{key}: expected a number, got {value!r}") from None
            if isinstance(getattr(self, key), bool) or not low <= value < high:
                raise InputError(f"{key}: expected a number in [{low}, {high}), got "
                                 f"{getattr(self, key)!r}")
            setattr(self, key, value)
        if self.crop_method not in _CROP_METHODS:
            raise InputError(
                f"crop_method: expected one of {_CROP_METHODS}, got {self.crop_method!r}")
        if self.unknown_labels not in _UNKNOWN:
            raise InputError(
                f"unknown_labels: expected one of {_UNKNOWN}, got {self.unknown_labels!r}"
            )

    # ---------------------------------------------------------------- construction / identity

    @classmethod
    def paper(cls, size: int = 128, **overrides: Any) -> "Preprocessor":
        """The paper's preset: isotropic at the smallest spacing, zero-pad to a cube, resize."""
        return cls(preset="paper", resize_shape=size, **overrides)

    def to_dict(self) -> dict:
        """JSON-able dict; :meth:`from_dict` restores an equal Preprocessor."""
        d = dataclasses.asdict(self)
        for key in ("target_spacing", "resize_shape", "target_shape", "clip_percentiles"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> "Preprocessor":
        """Build from :meth:`to_dict` output (or a config section); unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise InputError(f"preprocessor: expected a mapping, got {type(data).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise InputError(
                f"preprocessor: unknown option(s) {unknown}; allowed: {sorted(allowed)}"
            )
        return cls(**dict(data))

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the options and the algorithm version (cache key)."""
        payload = json.dumps({"format": PREPROCESS_FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def output_shape(self, shape: Sequence[int], spacing: Sequence[float]) -> Optional[tuple]:
        """Spatial shape :meth:`forward` produces for a canonical ``shape`` and ``spacing``;
        None when it depends on the image (``crop_foreground`` without ``resize_shape`` or
        ``target_shape``)."""
        shape = tuple(int(s) for s in shape[:3])
        spacing = _triple(spacing, "spacing", float)
        if self.crop_foreground and self.resize_shape is None and self.target_shape is None:
            return None
        if self.target_spacing is not None:
            shape = _resampled_shape(shape, spacing, self.target_spacing)
        if self.pad_to_cube:
            shape = (max(shape),) * 3
        if self.resize_shape is not None:
            shape = tuple(self.resize_shape)
        if self.target_shape is not None:
            shape = tuple(self.target_shape)
        return shape

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        image: Union[Volume, np.ndarray],
        labels: Union[Volume, np.ndarray, None] = None,
        *,
        spacing: Optional[Sequence[float]] = None,
    ) -> tuple:
        """Preprocess one canonical image (and its labels).

        Args:
            image: a :class:`Volume` of kind "image", or an array ``[D, H, W]`` /
                ``[D, H, W, C]`` (then ``spacing`` is needed when resampling).
            labels: a label :class:`Volume`, an int array ``[D, H, W]`` or None.
            spacing: voxel size (mm) of array inputs; ignored for Volumes.

        Returns:
            ``(image float32 [D', H', W', C], labels int32 [D', H', W'] or None, record)``;
            ``record`` is a JSON-able dict of every step (see :func:`invert_labels`).

        Raises:
            ValueError: shapes or affines of image and labels disagree, non-finite intensities,
                label values outside the label map with ``unknown_labels="raise"``.
        """
        img_name = image.path if isinstance(image, Volume) and image.path else "image"
        lab_name = labels.path if isinstance(labels, Volume) and labels.path else "labels"
        if isinstance(image, Volume):
            spacing = image.spacing
            affine = np.asarray(image.affine, float)
            img = image.array
        else:
            img = np.asarray(image)
            affine = None
        if img.ndim == 3:
            img = img[..., np.newaxis]
        if img.ndim != 4:
            raise InputError(
                f"{img_name}: expected [D, H, W] or [D, H, W, C], got shape {img.shape}"
            )
        img = img.astype(np.float32, copy=False)
        if not np.all(np.isfinite(img)):
            raise InputError(f"{img_name}: image contains NaN/Inf intensities")
        if spacing is None:
            if self.target_spacing is not None:
                raise InputError("spacing: required for array inputs when target_spacing is set")
            spacing = (1.0, 1.0, 1.0)
        spacing = _triple(spacing, "spacing", float)
        if affine is None:
            affine = np.diag([*spacing, 1.0])

        lab = None
        if labels is not None:
            if isinstance(labels, Volume):
                if not affines_close(labels.affine, affine):
                    raise InputError(
                        f"{lab_name}: affine does not match the image {img_name}\n"
                        f"labels:\n{np.round(labels.affine, 4)}\nimage:\n{np.round(affine, 4)}"
                    )
                lab = labels.array
            else:
                lab = np.asarray(labels)
            if not np.issubdtype(lab.dtype, np.integer):
                raise InputError(f"{lab_name}: labels must be integers, got {lab.dtype}")
            if tuple(lab.shape) != tuple(img.shape[:3]):
                raise InputError(
                    f"{lab_name}: label shape {tuple(lab.shape)} does not match the image "
                    f"{img_name} spatial shape {tuple(img.shape[:3])}"
                )
            if self.label_map is not None:
                lab = apply_label_map(lab, self.label_map, self.unknown_labels, source=lab_name)
            lab = lab.astype(np.int32, copy=False)
            if lab.size and int(lab.min()) < 0:
                raise InputError(
                    f"{lab_name}: negative label value {int(lab.min())}; ids must be >= 0"
                )

        record: dict = {
            "format": PREPROCESS_FORMAT,
            "preprocessor": self.fingerprint(),
            "input_shape": [int(s) for s in img.shape[:3]],
            "input_spacing": list(spacing),
            "input_affine": affine.tolist(),
            "channels": int(img.shape[3]),
            "steps": [],
            "label_map": self.label_map,
        }
        shape = tuple(img.shape[:3])

        def resample(out_shape, op):
            nonlocal img, lab, affine, shape
            out_shape = tuple(int(s) for s in out_shape)
            if out_shape == shape:
                return
            img = resample_to_shape(img, out_shape, self.image_order)
            if lab is not None:
                lab = resample_to_shape(lab, out_shape, 0)
            record["steps"].append(
                {"op": op, "in_shape": list(shape), "out_shape": list(out_shape)}
            )
            affine = _scale_affine(affine, shape, out_shape)
            shape = out_shape

        def crop_pad(out_shape, op):
            nonlocal img, lab, affine, shape
            out_shape = tuple(int(s) for s in out_shape)
            if out_shape == shape:
                return
            before, after = _centred_amounts(shape, out_shape)
            img = _crop_pad(img, before, after, self.pad_value)
            if lab is not None:
                lab = _crop_pad(lab, before, after, 0)
            record["steps"].append(
                {"op": op, "in_shape": list(shape), "out_shape": list(out_shape),
                 "before": before, "after": after}
            )
            affine = _shift_affine(affine, before)
            shape = out_shape

        if self.crop_foreground:
            lo, hi = foreground_box(img, spacing, self.crop_threshold, self.crop_margin,
                                    self.crop_method)
            if (tuple(lo), tuple(hi)) != ((0, 0, 0), shape):
                before = [-int(v) for v in lo]
                after = [int(h) - int(n) for h, n in zip(hi, shape)]
                img = _crop_pad(img, before, after, self.pad_value)
                if lab is not None:
                    lab = _crop_pad(lab, before, after, 0)
                out_shape = tuple(int(h - l) for l, h in zip(lo, hi))
                record["steps"].append(
                    {"op": "crop_foreground", "in_shape": list(shape),
                     "out_shape": list(out_shape), "before": before, "after": after})
                affine = _shift_affine(affine, before)
                shape = out_shape
        if self.target_spacing is not None:
            resample(_resampled_shape(shape, spacing, self.target_spacing), "resample")
        if self.pad_to_cube:
            crop_pad((max(shape),) * 3, "pad_to_cube")
        if self.resize_shape is not None:
            resample(self.resize_shape, "resize")
        if self.target_shape is not None:
            crop_pad(self.target_shape, "crop_pad")

        img, intensity = self._normalise(img)
        # The volume's own background (its minimum per channel, after normalisation): what
        # augmentation, patch sampling and inference pad with. After z-scoring 0 is the
        # mean tissue intensity, not the background.
        intensity["background"] = [float(v) for v in img.reshape(-1, img.shape[3]).min(0)]
        record["intensity"] = intensity
        record["output_shape"] = [int(s) for s in shape]
        record["output_affine"] = affine.tolist()
        record["output_spacing"] = [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
        return np.ascontiguousarray(img, dtype=np.float32), lab, record

    __call__ = forward

    def _normalise(self, img: np.ndarray) -> tuple:
        """Percentile clipping and z-scoring per channel; returns (image, JSON-able record)."""
        info: dict = {"normalization": self.normalization, "clip": None, "mean": None, "std": None}
        if self.normalization is None and self.clip_percentiles is None:
            return img, info
        img = np.array(img, dtype=np.float32, copy=True)
        clips, means, stds = [], [], []
        for c in range(img.shape[3]):
            ch = img[..., c]  # a view: edited in place
            mask = (ch != 0) if self.normalization == "zscore_nonzero" else None
            if mask is not None and not mask.any():  # all-zero channel: nothing to normalise
                clips.append(None)
                means.append(0.0)
                stds.append(1.0)
                continue
            values = ch[mask] if mask is not None else ch
            if self.clip_percentiles is not None:
                lo, hi = np.percentile(values, self.clip_percentiles)
                clips.append([float(lo), float(hi)])
                values = np.clip(values, lo, hi).astype(np.float32, copy=False)
                if mask is None:
                    ch[...] = values
                else:
                    ch[mask] = values
            if self.normalization is None:
                continue
            mean = float(np.mean(values, dtype=np.float64))
            std = float(np.std(values, dtype=np.float64))
            std = std if std > _EPS_STD else 1.0
            means.append(mean)
            stds.append(std)
            if mask is None:
                ch -= np.float32(mean)
                ch /= np.float32(std)
            else:
                ch[mask] = ((values - mean) / std).astype(np.float32)
        if self.clip_percentiles is not None:
            info["clip"] = clips
        if self.normalization is not None:
            info["mean"], info["std"] = means, stds
        return img, info

    # ---------------------------------------------------------------- inverse (bound helpers)

    @staticmethod
    def invert_labels(labels: np.ndarray, record: Mapping) -> np.ndarray:
        """See :func:`invert_labels`."""
        return invert_labels(labels, record)

    @staticmethod
    def invert_probabilities(
        probs: np.ndarray, record: Mapping, fill: str = "background"
    ) -> np.ndarray:
        """See :func:`invert_probabilities`."""
        return invert_probabilities(probs, record, fill=fill)


def _check_record(record: Mapping) -> None:
    for key in ("steps", "input_shape", "output_shape"):
        if key not in record:
            raise InputError(
                f"record: missing {key!r}; pass the record returned by Preprocessor.forward"
            )
    if record.get("format") != PREPROCESS_FORMAT:
        raise InputError(
            f"record: format {record.get('format')!r}, this version reads {PREPROCESS_FORMAT}"
        )


def _invert(array: np.ndarray, record: Mapping, order: int, fill_value) -> np.ndarray:
    _check_record(record)
    if tuple(array.shape[:3]) != tuple(record["output_shape"]):
        raise InputError(
            f"array: spatial shape {tuple(array.shape[:3])} does not match the preprocessed "
            f"shape {tuple(record['output_shape'])} in the record"
        )
    for step in reversed(record["steps"]):
        if step["op"] in RESAMPLING_STEPS:
            array = resample_to_shape(array, step["in_shape"], order)
        elif step["op"] in CROP_PAD_STEPS:
            before = [-b for b in step["before"]]
            after = [-a for a in step["after"]]
            array = _crop_pad(array, before, after, 0)
            if fill_value is not None:
                # Regions cropped away by forward() come back as "background".
                region = np.ones(step["in_shape"], bool)
                region[tuple(slice(max(b, 0), n - max(a, 0)) for b, a, n in
                             zip(before, after, step["in_shape"]))] = False
                array[region] = fill_value
        else:
            raise InputError(f"record: unknown step {step['op']!r}")
    return array


def invert_labels(labels: np.ndarray, record: Mapping) -> np.ndarray:
    """Map a label map on the preprocessed grid back onto the canonical input grid.

    Steps are undone in reverse order, resampling with nearest neighbour; regions cropped
    away by ``forward`` come back as background (0). For upsampling, padding and cube
    padding this is the exact inverse of ``forward`` on labels.

    Args:
        labels: int ``[D', H', W']`` on the preprocessed grid.
        record: the record returned by :meth:`Preprocessor.forward`.

    Returns:
        int32 ``[D, H, W]`` on the canonical grid of the input (``record["input_shape"]``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"labels: expected an integer [D, H, W] array, got {labels.dtype} {labels.shape}"
        )
    return _invert(labels.astype(np.int32, copy=False), record, order=0, fill_value=None)


def invert_probabilities(
    probs: np.ndarray, record: Mapping, fill: str = "background"
) -> np.ndarray:
    """Map class probabilities on the preprocessed grid back onto the canonical input grid.

    Resampling is linear (probabilities stay non-negative and sum to 1). Regions cropped away
    by ``forward`` are filled with background (class 0 probability 1) or zeros.

    Args:
        probs: float ``[D', H', W', K]``.
        record: the record returned by :meth:`Preprocessor.forward`.
        fill: "background" or "zero" for cropped-away regions.

    Returns:
        float32 ``[D, H, W, K]``.
    """
    if fill not in ("background", "zero"):
        raise InputError(f"fill: expected 'background' or 'zero', got {fill!r}")
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4:
        raise InputError(f"probs: expected [D, H, W, K], got shape {probs.shape}")
    fill_value = np.zeros(probs.shape[-1], np.float32)
    if fill == "background":
        fill_value[0] = 1.0
    return _invert(probs, record, order=1, fill_value=fill_value)
