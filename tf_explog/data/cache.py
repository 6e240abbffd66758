"""On-disk cache of preprocessed volumes, read back memory-mapped.

Decoding a .nii.gz costs ~50 ms per 128³ volume and preprocessing more; training reads each
volume every epoch. :class:`VolumeCache` decodes and preprocesses each (image, labels) pair once
and stores uncompressed ``.npy`` arrays plus a small ``meta.json`` in one directory per entry:

    <cache_dir>/<image stem>-<key>/
        image.npy          float32 [D, H, W, C]
        labels.npy         uint8 / int16 / int32 [D, H, W]        (when labels are given)
        label_coords.npy   int32 [N, 3]: sampled voxels of each foreground label
        meta.json          record, sources (size, mtime, inode), preprocessor fingerprint,
                           per-label summary (count, bounding box, slice of label_coords)

``key`` hashes both source paths and the preprocessor fingerprint, so two preprocessings share
a cache directory without evicting each other; an entry is rebuilt when a source file changes
(size, mtime or inode). Entries are built in a temporary directory and renamed into place, so a
failed or interrupted write leaves no half entry. Later reads use ``np.load(mmap_mode="r")``:
only the pages actually touched (e.g. one patch) are read from disk.

This module does not import TensorFlow (a JAX-side ``keras.utils.PyDataset`` can reuse it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from .nifti import NiftiFileNotFoundError, load_volume, nifti_stem
from .preprocess import Preprocessor
from tf_explog.errors import InputError

__all__ = [
    "CACHE_FORMAT",
    "CacheError",
    "CacheEntry",
    "VolumeCache",
    "default_cache_dir",
    "source_signature",
    "summarise_labels",
]

PathLike = Union[str, os.PathLike]

# Bump when the entry layout changes; entries of another format are rebuilt.
CACHE_FORMAT = 1


class CacheError(InputError):
    """A cache entry cannot be built or read; the message names the source file."""


def default_cache_dir() -> Path:
    """``$TF_EXPLOG_CACHE_DIR``, else ``$XDG_CACHE_HOME/tf_explog``, else ``~/.cache/tf_explog``."""
    env = os.environ.get("TF_EXPLOG_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tf_explog"


def source_signature(path: PathLike) -> dict:
    """Identity of a source file for invalidation: absolute path, size, mtime (ns), inode."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    return {
        "path": p, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "inode": int(st.st_ino)
    }


def _label_dtype(labels: np.ndarray):
    hi = int(labels.max()) if labels.size else 0
    lo = int(labels.min()) if labels.size else 0
    if lo >= 0 and hi <= np.iinfo(np.uint8).max:
        return np.uint8
    if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
        return np.int16
    return np.int32


def summarise_labels(labels: np.ndarray, max_coords: int, seed: int = 0) -> tuple:
    """Per-label voxel count, bounding box and a uniform sample of foreground voxel coordinates.

    Args:
        labels: non-negative int ``[D, H, W]``.
        max_coords: at most this many coordinates are kept per foreground label (all of them
            when the label has fewer voxels), drawn uniformly without replacement.
        seed: seed of that draw.

    Returns:
        ``(summary, coords)``: ``summary`` maps ``str(label)`` of every label present to
        ``{"count", "bbox" ([[lo, hi] per axis], inclusive; None for background), "coords"
        ([start, stop) rows of coords)}``; ``coords`` is int32 ``[N, 3]``.

    Raises:
        ValueError: negative label values.
    """
    labels = np.asarray(labels)
    if labels.size and int(labels.min()) < 0:
        raise InputError(f"labels: negative label id {int(labels.min())}; ids must be >= 0")
    counts = np.bincount(labels.reshape(-1))
    # One pass for every bounding box; coordinates are then searched inside each box only,
    # which is cheap for the small structures that matter.
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False))
    rng = np.random.default_rng(seed)
    summary, chunks, offset = {}, [], 0
    if counts.size and counts[0]:
        summary["0"] = {"count": int(counts[0]), "bbox": None, "coords": [0, 0]}
    for value, box in enumerate(boxes, start=1):
        if box is None:
            continue
        zyx = np.argwhere(labels[box] == value)
        zyx += np.array([sl.start for sl in box])
        if len(zyx) > max_coords:
            zyx = zyx[np.sort(rng.choice(len(zyx), size=max_coords, replace=False))]
        chunks.append(zyx.astype(np.int32))
        summary[str(value)] = {
            "count": int(counts[value]),
            "bbox": [[sl.start, sl.stop - 1] for sl in box],
            "coords": [offset, offset + len(zyx)],
        }
        offset += len(zyx)
    coords = np.concatenate(chunks) if chunks else np.zeros((0, 3), np.int32)
    return summary, coords


@dataclass
class CacheEntry:
    """One cached, preprocessed volume (arrays are read-only memory maps).

    Attributes:
        image: float32 ``[D, H, W, C]``.
        labels: ``[D, H, W]`` (uint8/int16/int32) or None.
        record: the preprocessing record (see ``Preprocessor.forward``).
        present_labels: ``{label id: {"count", "bbox", "coords"}}`` for every label present.
        directory: the entry's directory.
    """

    image: np.ndarray
    labels: Optional[np.ndarray]
    record: dict
    present_labels: dict
    directory: Path
    _coords: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def foreground_labels(self) -> list:
        """Label ids > 0 present in this volume, ascending."""
        return sorted(k for k in self.present_labels if k > 0)

    def coords(self, label: int) -> np.ndarray:
        """Sampled voxel coordinates ``[k, 3]`` of a foreground label (empty if absent)."""
        item = self.present_labels.get(int(label))
        if item is None or self._coords is None:
            return np.zeros((0, 3), np.int32)
        start, stop = item["coords"]
        return np.asarray(self._coords[start:stop])

    def sample_patch(
        self, patch_size: Sequence[int], rng: np.random.Generator, oversample: float = 0.0,
        pad_value: Optional[float] = None,
    ) -> tuple:
        """Cut one patch, centred on a rare-label voxel with probability ``oversample``.

        With probability ``oversample`` (and when the volume has foreground), a label is chosen
        uniformly among the foreground labels present and the patch is centred on one of its
        voxels (shifted to stay inside the volume, so the voxel is always inside the patch);
        otherwise the patch position is uniform. Volumes smaller than the patch are padded
        (centred; image with ``pad_value``, default the volume's background intensity from
        its preprocessing record, labels with 0). Only the patch is read from disk.

        Returns:
            ``(image float32 [p0, p1, p2, C], labels int32 [p0, p1, p2] or None, info)`` where
            ``info = {"start": [...], "label": chosen label or None}`` (padded coordinates).
        """
        patch = np.asarray(patch_size, int)
        shape = np.asarray(self.image.shape[:3], int)
        padded = np.maximum(shape, patch)
        pad_before = (padded - shape) // 2
        high = padded - patch  # inclusive upper bound of the start
        chosen = None
        fg = self.foreground_labels
        if fg and rng.random() < oversample:
            chosen = fg[int(rng.integers(len(fg)))]
            pts = self.coords(chosen)
            centre = pts[int(rng.integers(len(pts)))] + pad_before
            start = np.clip(centre - patch // 2, 0, high)
        else:
            start = np.array([int(rng.integers(h + 1)) for h in high])
        # Intersection of the patch with the real (unpadded) volume.
        lo = np.maximum(start - pad_before, 0)
        hi = np.minimum(start + patch - pad_before, shape)
        dst = tuple(
            slice(int(a - s + p), int(b - s + p)) for a, b, s, p in zip(lo, hi, start, pad_before)
        )
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        if pad_value is None:
            pad_value = self.record.get("intensity", {}).get("background", 0.0)
        img = np.empty((*patch, self.image.shape[3]), np.float32)
        img[...] = np.asarray(pad_value, np.float32)  # one value per channel, or one for all
        img[dst] = self.image[src]
        lab = None
        if self.labels is not None:
            lab = np.zeros(tuple(patch), np.int32)
            lab[dst] = self.labels[src]
        return img, lab, {"start": [int(v) for v in start], "label": chosen}


class VolumeCache:
    """Decode-once cache of preprocessed volumes (see the module docstring for the layout).

    Args:
        cache_dir: directory of the cache (created when missing); default
            :func:`default_cache_dir`.
        preprocessor: applied to every entry; default ``Preprocessor()`` (z-score only).
        max_coords_per_label: foreground voxels kept per label for oversampling.

    Thread-safe: concurrent requests for the same entry build it once.
    """

    def __init__(
        self,
        cache_dir: Optional[PathLike] = None,
        preprocessor: Optional[Preprocessor] = None,
        *,
        max_coords_per_label: int = 1024,
    ) -> None:
        if preprocessor is not None and not isinstance(preprocessor, Preprocessor):
            raise InputError(
                f"preprocessor: expected a Preprocessor, got {type(preprocessor).__name__}"
            )
        if int(max_coords_per_label) < 1:
            raise InputError(f"max_coords_per_label: expected >= 1, got {max_coords_per_label!r}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.preprocessor = preprocessor if preprocessor is not None else Preprocessor()
        self.fingerprint = self.preprocessor.fingerprint()
        self.max_coords_per_label = int(max_coords_per_label)
        self._locks: dict = {}
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------------ paths and freshness

    def entry_dir(self, image_path: PathLike, label_path: Optional[PathLike] = None) -> Path:
        """Directory of the entry for this pair under this preprocessing."""
        image_path = os.path.abspath(os.fspath(image_path))
        label_path = os.path.abspath(os.fspath(label_path)) if label_path is not None else ""
        key = hashlib.sha256(
            json.dumps([image_path, label_path, self.fingerprint, CACHE_FORMAT]).encode()
        ).hexdigest()[:16]
        stem = nifti_stem(image_path) or os.path.basename(image_path)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60]
        return self.cache_dir / f"{stem}-{key}"

    def _sources(self, image_path, label_path) -> dict:
        out = {"image": source_signature(image_path)}
        out["label"] = source_signature(label_path) if label_path is not None else None
        return out

    def _read_meta(self, directory: Path) -> Optional[dict]:
        try:
            with open(directory / "meta.json") as f:
                return json.load(f)
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def _is_valid(self, meta: Optional[dict], sources: dict) -> bool:
        return (
            meta is not None
            and meta.get("format") == CACHE_FORMAT
            and meta.get("fingerprint") == self.fingerprint
            and meta.get("sources") == sources
        )

    def is_fresh(self, image_path: PathLike, label_path: Optional[PathLike] = None) -> bool:
        """True when a valid entry exists for the current source files and preprocessing."""
        meta = self._read_meta(self.entry_dir(image_path, label_path))
        return self._is_valid(meta, self._sources(image_path, label_path))

    # ------------------------------------------------------------------ public API

    def entry(self, image_path: PathLike, label_path: Optional[PathLike] = None) -> CacheEntry:
        """The cached entry for a pair, building (or rebuilding) it when needed.

        Raises:
            NiftiFileNotFoundError / NiftiError / ValueError: the sources cannot be read or
                preprocessed (messages name the file); nothing is left in the cache then.
        """
        for p in (image_path, label_path):
            if p is not None and not os.path.exists(p):
                raise NiftiFileNotFoundError(f"{os.fspath(p)}: file not found")
        directory = self.entry_dir(image_path, label_path)
        with self._lock_for(directory):
            sources = self._sources(image_path, label_path)
            meta = self._read_meta(directory)
            if not self._is_valid(meta, sources):
                meta = self._build(directory, image_path, label_path, sources)
            return self._open(directory, meta)

    def get(self, image_path: PathLike, label_path: Optional[PathLike] = None) -> tuple:
        """``(image_mmap, labels_mmap or None, record)`` for a pair (see :meth:`entry`)."""
        e = self.entry(image_path, label_path)
        return e.image, e.labels, e.record

    def present_labels(self, image_path: PathLike, label_path: PathLike) -> dict:
        """``{label id: {"count", "bbox", ...}}`` of the preprocessed labels of a pair."""
        return self.entry(image_path, label_path).present_labels

    def warm(self, pairs: Iterable, workers: int = 1) -> int:
        """Build every missing or stale entry of ``pairs`` ((image, label) tuples).

        Returns:
            The number of pairs processed.
        """
        pairs = list(pairs)
        if workers <= 1:
            for image_path, label_path in pairs:
                self.entry(image_path, label_path)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda p: self.entry(*p), pairs))
        return len(pairs)

    # ------------------------------------------------------------------ internals

    def _lock_for(self, directory: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(str(directory), threading.Lock())

    def _build(self, directory: Path, image_path, label_path, sources: dict) -> dict:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=self.cache_dir))
        try:
            image = load_volume(image_path, kind="image")
            labels = load_volume(label_path, kind="label") if label_path is not None else None
            img, lab, record = self.preprocessor.forward(image, labels)
            np.save(tmp / "image.npy", img)
            summary = None
            if lab is not None:
                np.save(tmp / "labels.npy", lab.astype(_label_dtype(lab)))
                seed = int(directory.name.rsplit("-", 1)[-1], 16) % (2**32)
                summary, coords = summarise_labels(lab, self.max_coords_per_label, seed)
                np.save(tmp / "label_coords.npy", coords)
            meta = {
                "format": CACHE_FORMAT,
                "fingerprint": self.fingerprint,
                "preprocessor": self.preprocessor.to_dict(),
                "sources": sources,
                "record": record,
                "image": {"shape": list(img.shape), "dtype": str(img.dtype)},
                "labels": None if lab is None else {"shape": list(lab.shape)},
                "present_labels": summary,
            }
            # meta.json last: a directory without it is never taken for an entry.
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f)
            self._commit(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return meta

    def _commit(self, tmp: Path, directory: Path) -> None:
        """Move a finished temporary entry into place (replacing a stale one)."""
        trash = None
        if directory.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-{directory.name}-", dir=self.cache_dir))
            # Readers holding memory maps of the old files keep them (POSIX unlink semantics).
            os.replace(directory, trash / "entry")
        try:
            os.rename(tmp, directory)
        except OSError:
            # Another process committed the same entry first: keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def _open(self, directory: Path, meta: dict) -> CacheEntry:
        try:
            image = np.load(directory / "image.npy", mmap_mode="r")
            labels = coords = None
            if meta.get("labels") is not None:
                labels = np.load(directory / "labels.npy", mmap_mode="r")
                coords = np.load(directory / "label_coords.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CacheError(
                f"{meta['sources']['image']['path']}: cache entry {directory} is unreadable "
                f"({exc}); delete it to rebuild"
            ) from exc
        present = {int(k): v for k, v in (meta.get("present_labels") or {}).items()}
        return CacheEntry(image, labels, meta["record"], present, directory, coords)
