"""NIfTI reading and writing with canonical (RAS) orientation and label maps.

Volumes are read with nibabel and reoriented to the closest canonical orientation (RAS+: the
first array axis points Right, the second Anterior, the third Superior) by axis permutation and
flips only, never by interpolation, so the round trip back to the file's own orientation is
exact. The original affine, shape and header are kept so that predictions computed on the
canonical grid can be written back onto the input's grid with :func:`save_like`.

Conventions: images come out as float32 ``[D, H, W, C]`` (``C = 1`` for 3D files, the fourth
axis of a 4D file is the channel axis); labels as int32 ``[D, H, W]``.

This module does not import TensorFlow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import nibabel as nib
import numpy as np
from nibabel import orientations as nib_ornt

# Label maps live in tf_explog.labels; re-exported here for load_volume(label_map=...).
from tf_explog.labels import LabelMap, apply_label_map, invert_label_map  # noqa: F401
from tf_explog.errors import InputError
from tf_explog.files import atomic_path

__all__ = [
    "NiftiError",
    "NiftiFileNotFoundError",
    "Volume",
    "load_volume",
    "read_header",
    "canonical_geometry",
    "to_original_orientation",
    "to_canonical_orientation",
    "save_like",
    "LabelMap",
    "apply_label_map",
    "invert_label_map",
    "save_array",
]

PathLike = Union[str, os.PathLike]
_KINDS = ("image", "label")
#: NIfTI file name endings, longest first (so ``.nii.gz`` is stripped whole).
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class NiftiError(InputError):
    """A NIfTI file (or an array meant for one) is unusable; the message names the file."""


class NiftiFileNotFoundError(NiftiError, FileNotFoundError):
    """A NIfTI file does not exist (both a :class:`ValueError` and a :class:`FileNotFoundError`)."""


@dataclass
class Volume:
    """One volume read from disk, in canonical RAS orientation.

    Attributes:
        array: canonical data; images float32 ``[D, H, W, C]``, labels int32 ``[D, H, W]``.
        affine: 4x4 voxel-to-world (mm) affine of ``array``.
        original_affine: the file's own affine (the one nibabel reports).
        original_shape: the file's own data shape (3D or 4D).
        header: a copy of the file's header.
        path: the file the volume came from ("" for volumes built in memory).
        spacing: voxel size in mm along the canonical axes ``(D, H, W)``.
        orientation: nibabel orientation array (``[3, 2]``) taking the file's axes to the
            canonical ones; :func:`to_original_orientation` applies its inverse.
        kind: "image" or "label".
    """

    array: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple
    header: nib.Nifti1Header
    path: str
    spacing: tuple
    orientation: np.ndarray = field(repr=False)
    kind: str = "image"

    @property
    def original_axcodes(self) -> tuple:
        """Axis codes of the file's orientation, e.g. ``("L", "I", "A")``."""
        return nib.aff2axcodes(self.original_affine)

    @property
    def spatial_shape(self) -> tuple:
        """Canonical spatial shape ``(D, H, W)``."""
        return tuple(int(s) for s in self.array.shape[:3])


def nifti_stem(name: Union[str, PathLike]) -> Optional[str]:
    """The file name without ``.nii.gz``/``.nii``; None when it is not a NIfTI name."""
    name = os.path.basename(os.fspath(name))
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def list_nifti_files(directory: PathLike, what: str = "input") -> list:
    """The ``.nii``/``.nii.gz`` files directly in ``directory``, sorted; hidden files skipped.

    Raises:
        NiftiFileNotFoundError: no such directory.
        NiftiError: it holds no NIfTI file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NiftiFileNotFoundError(f"{directory}: {what} directory not found")
    # A link that loops or points nowhere is listed (and refused when read), not skipped.
    files = sorted(p for p in directory.iterdir()
                   if (p.is_file() or (p.is_symlink() and not p.exists()))
                   and nifti_stem(p.name) and not p.name.startswith("."))
    if not files:
        raise NiftiError(f"{directory}: no .nii or .nii.gz files in the {what} directory")
    return files


def voxel_spacing(affine: np.ndarray) -> tuple:
    """Voxel size in mm along each array axis of a 4x4 affine (any orientation): the length
    of each of its first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def read_array(path: PathLike) -> tuple:
    """The voxel data of a file as stored (no reorientation, no conversion) and its affine.

    For comparing files that share a grid (evaluation); training and inference use
    :func:`load_volume`, which reorients to RAS and checks the data.

    Returns:
        ``(array, 4x4 affine float64)``.

    Raises:
        NiftiFileNotFoundError / NiftiError: missing, unreadable or truncated file.
    """
    img = _load_image(path)
    return _decode(img, path), np.asarray(img.affine, dtype=np.float64)


def _describe(path: PathLike) -> str:
    return os.fspath(path) if path else "<in-memory volume>"


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise InputError(f"kind must be one of {_KINDS}, got {kind!r}")


def _load_image(path: PathLike):
    """nib.load with every failure turned into a NiftiError naming the file."""
    p = os.fspath(path)
    if not os.path.exists(p):
        if os.path.islink(p):  # exists() follows links: a loop or a dangling link
            raise NiftiError(f"{p}: a symbolic link that loops or points to a missing file "
                             f"({os.readlink(p)})")
        raise NiftiFileNotFoundError(f"{p}: file not found")
    if os.path.isdir(p):
        raise NiftiError(f"{p}: is a directory, expected a .nii or .nii.gz file")
    try:
        img = nib.load(p)
    except Exception as exc:  # nibabel raises many types for bad headers; report them all alike
        raise NiftiError(f"{p}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from exc
    if not hasattr(img, "affine") or img.affine is None:
        raise NiftiError(f"{p}: not a spatial image with an affine")
    check_affine(img.affine, p)
    return img


def check_affine(affine, path: PathLike) -> None:
    """Refuses an affine that cannot place voxels in space: NaN/Inf entries, or a singular
    3x3 part (a zero or repeated column), which reorientation and resampling cannot use.

    Raises:
        NiftiError: naming the file and what is wrong.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        raise NiftiError(f"{os.fspath(path)}: the header's affine (sform/qform) holds NaN or "
                         "Inf; fix the header (e.g. set sform_code/qform_code to a valid one)")
    lengths = np.linalg.norm(matrix[:3, :3], axis=0)
    det = abs(float(np.linalg.det(matrix[:3, :3])))
    if np.any(lengths == 0) or det <= 1e-12 * float(np.prod(lengths)):
        raise NiftiError(f"{os.fspath(path)}: the header's affine (sform/qform) is singular "
                         f"(voxel axes of length {np.round(lengths, 6).tolist()} mm, "
                         "determinant 0); fix the header")


def read_header(path: PathLike) -> tuple:
    """Read only the header of a NIfTI file (no voxel data are decoded).

    Args:
        path: a .nii or .nii.gz file.

    Returns:
        ``(shape, affine)``: the file's data shape and its 4x4 affine (float64).

    Raises:
        NiftiFileNotFoundError: the file does not exist.
        NiftiError: the header cannot be parsed.
    """
    img = _load_image(path)
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def canonical_geometry(path: PathLike) -> tuple:
    """Canonical spatial shape, spacing and channel count of a file, from its header only.

    Args:
        path: a .nii or .nii.gz image.

    Returns:
        ``(shape (D, H, W), spacing (mm, canonical axes), channels)``; channels is 1 for 3D.

    Raises:
        NiftiError: unreadable header or not 3D/4D.
    """
    shape, affine = read_header(path)
    if len(shape) not in (3, 4):
        raise NiftiError(
            f"{os.fspath(path)}: image has {len(shape)} dimensions {shape}; expected 3D or 4D"
        )
    ornt = nib_ornt.io_orientation(affine)
    canon = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        canon[int(target)] = shape[axis]
    canon_affine = affine @ nib_ornt.inv_ornt_aff(ornt, shape[:3])
    spacing = tuple(float(s) for s in np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0)))
    return tuple(canon), spacing, (shape[3] if len(shape) == 4 else 1)


#: Largest volume decoded, in bytes as float32 (or the stored type, if wider): a header that
#: declares more is refused before any memory is allocated. Set TF_EXPLOG_MAX_VOLUME_BYTES
#: (or this attribute) to change it.
MAX_VOLUME_BYTES = int(os.environ.get("TF_EXPLOG_MAX_VOLUME_BYTES", 4 << 30))


def _check_size(img, path: PathLike) -> None:
    shape = tuple(int(s) for s in img.shape)
    itemsize = max(4, np.dtype(img.get_data_dtype()).itemsize)
    size = int(np.prod(shape, dtype=np.float64)) * itemsize
    if size > MAX_VOLUME_BYTES:
        raise NiftiError(
            f"{os.fspath(path)}: the header declares shape {shape} of "
            f"{img.get_data_dtype()} ({size / 2**30:.1f} GiB as float32), above the limit "
            f"of {MAX_VOLUME_BYTES / 2**30:.1f} GiB; a corrupt header, or raise "
            "TF_EXPLOG_MAX_VOLUME_BYTES")


def _decode(img, path: PathLike) -> np.ndarray:
    _check_size(img, path)
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError or ValueError
        raise NiftiError(
            f"{os.fspath(path)}: cannot decode voxel data, the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _as_int_labels(data: np.ndarray, path: PathLike) -> np.ndarray:
    """Labels as int32; float storage is accepted only when every value is a whole number."""
    p = _describe(path)
    if np.issubdtype(data.dtype, np.bool_):
        return data.astype(np.int32)
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(np.int32)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise NiftiError(f"{p}: label values do not fit in int32")
        return data.astype(np.int32, copy=False)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise NiftiError(f"{p}: label volume contains NaN or Inf values")
        if not np.array_equal(data, np.round(data)):
            bad = data[data != np.round(data)]
            raise NiftiError(
                f"{p}: label volume holds non-integer values (e.g. {float(bad.flat[0])!r}); "
                "expected integer label ids"
            )
        return data.astype(np.int32)
    raise NiftiError(f"{p}: unsupported label data type {data.dtype}, expected integers")


def load_volume(
    path: PathLike,
    *,
    kind: str = "image",
    label_map: "LabelMap | Mapping | None" = None,
    unknown: str = "background",
    allow_nonfinite: bool = False,
) -> Volume:
    """Read a NIfTI image or label volume and reorient it to canonical RAS.

    Args:
        path: a .nii or .nii.gz file.
        kind: "image" (3D or 4D with a channel axis; returned float32 ``[D, H, W, C]``) or
            "label" (3D integer ids, or 4D with a single channel; returned int32 ``[D, H, W]``).
        label_map: labels only: ``{new_id: [original values]}`` applied after reading
            (see :func:`apply_label_map`).
        unknown: labels only, with ``label_map``: "background" or "raise" for values not in it.
        allow_nonfinite: images only: accept NaN/Inf intensities instead of raising.

    Returns:
        A :class:`Volume`.

    Raises:
        NiftiFileNotFoundError: missing file.
        NiftiError: unreadable/truncated file, wrong dimensionality, non-integer labels,
            non-finite intensities, label values outside ``label_map`` with ``unknown="raise"``.
    """
    _check_kind(kind)
    if label_map is not None and kind != "label":
        raise InputError("label_map applies to kind='label' only")
    p = os.fspath(path)
    img = _load_image(p)
    data = _decode(img, p)
    original_shape = tuple(int(s) for s in data.shape)
    if kind == "image":
        if data.ndim == 3:
            data = data[..., np.newaxis]
        elif data.ndim != 4:
            raise NiftiError(
                f"{p}: image has {data.ndim} dimensions {original_shape}; expected 3D [X, Y, Z] "
                "or 4D [X, Y, Z, channels]"
            )
        if not (np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.bool_)):
            raise NiftiError(f"{p}: unsupported image data type {data.dtype}")
        if np.iscomplexobj(data):
            raise NiftiError(f"{p}: complex-valued images are not supported")
        data = data.astype(np.float32, copy=False)
        if not allow_nonfinite and not np.all(np.isfinite(data)):
            n_bad = int(np.count_nonzero(~np.isfinite(data)))
            raise NiftiError(f"{p}: image contains {n_bad} NaN/Inf intensity values")
    else:
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise NiftiError(
                f"{p}: label volume has shape {original_shape}; expected 3D [X, Y, Z] "
                "(or 4D with a single channel)"
            )
        data = _as_int_labels(data, p)
        if label_map is not None:
            data = apply_label_map(data, label_map, unknown=unknown, source=p)
    original_affine = np.asarray(img.affine, dtype=np.float64)
    ornt = nib_ornt.io_orientation(original_affine)
    canonical = np.ascontiguousarray(nib_ornt.apply_orientation(data, ornt))
    affine = original_affine @ nib_ornt.inv_ornt_aff(ornt, data.shape[:3])
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Volume(
        array=canonical,
        affine=affine,
        original_affine=original_affine,
        original_shape=original_shape,
        header=img.header.copy(),
        path=p,
        spacing=spacing,
        orientation=ornt,
        kind=kind,
    )


def _inverse_orientation(ornt: np.ndarray) -> np.ndarray:
    """Orientation array undoing ``ornt`` (canonical axes back to the file's axes)."""
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    return nib_ornt.ornt_transform(identity, ornt)


def to_canonical_orientation(array: np.ndarray, volume: Volume) -> np.ndarray:
    """Reorient an array on the volume's *file* grid to canonical orientation.

    Args:
        array: data on the file's grid, spatial axes first (extra trailing axes are kept).
        volume: the :class:`Volume` whose orientation to use.

    Returns:
        The reoriented array (a view where possible).
    """
    return nib_ornt.apply_orientation(np.asarray(array), volume.orientation)


def to_original_orientation(array: np.ndarray, volume: Volume) -> np.ndarray:
    """Undo :func:`load_volume`'s reorientation, voxel for voxel.

    Args:
        array: canonical-orientation data whose first three axes have ``volume``'s canonical
            spatial shape (extra trailing axes, e.g. channels or classes, are kept).
        volume: the reference :class:`Volume`.

    Returns:
        The array on the file's own axes (a view where possible).

    Raises:
        ValueError: spatial shape differs from the volume's canonical shape.
    """
    array = np.asarray(array)
    if array.ndim < 3 or tuple(array.shape[:3]) != volume.spatial_shape:
        raise InputError(
            f"array: spatial shape {tuple(array.shape[:3])} does not match the canonical shape "
            f"{volume.spatial_shape} of {_describe(volume.path)}"
        )
    return nib_ornt.apply_orientation(array, _inverse_orientation(volume.orientation))


def _storage_dtype(array: np.ndarray) -> np.ndarray:
    """Cast to a dtype NIfTI readers handle everywhere (no bool, no 64-bit)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return array.astype(dt, copy=False)
        raise InputError("array: integer values do not fit in int32")
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise InputError(f"array: unsupported dtype {array.dtype} for NIfTI output")


def save_like(
    array: np.ndarray, reference: Volume, path: PathLike, *, overwrite: bool = False
) -> Path:
    """Write a canonical-orientation array onto the reference file's grid, atomically.

    The output has the reference's original orientation, shape and affine, and a copy of its
    header (data type and dimensions updated), so it overlays the input in any viewer.

    Args:
        array: ``[D, H, W]`` or ``[D, H, W, K]`` in canonical orientation, spatial shape equal
            to ``reference.array.shape[:3]``. Integers are stored in the smallest of
            uint8/int16/int32 that fits, floats as float32.
        reference: the :class:`Volume` the array belongs to.
        path: output .nii or .nii.gz file.
        overwrite: replace an existing file.

    Returns:
        The written path.

    Raises:
        ValueError: wrong shape/dtype or a path without a NIfTI suffix.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"path: {path} must end in .nii or .nii.gz")
    data = _storage_dtype(np.asarray(array))
    data = np.ascontiguousarray(to_original_orientation(data, reference))
    header = reference.header.copy()
    image_cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    if not isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        header = None  # a non-NIfTI reference (e.g. MGH): fall back to a fresh NIfTI header
    img = image_cls(data, reference.original_affine, header=header)
    img.header.set_data_dtype(data.dtype)
    # No intensity scaling: values are stored exactly as given.
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path


def save_array(array: np.ndarray, affine: np.ndarray, path: PathLike, *,
               overwrite: bool = False) -> Path:
    """Write an array as a new NIfTI-1 file (mm units, qform and sform set to ``affine``),
    atomically. For files with no reference scan (synthetic data); see :func:`save_like`.

    Raises:
        InputError: a path without a NIfTI suffix.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if nifti_stem(path.name) is None:
        raise InputError(f"path: {path} must end in .nii or .nii.gz")
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path
