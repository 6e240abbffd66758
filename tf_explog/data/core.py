"""The input-pipeline core shared by every front end (tf.data, PyDataset, callbacks).

- :func:`read_volume`: one cached volume as fresh NumPy arrays (every whole-volume read);
- :class:`SplitVolumes`: the preprocessed whole volumes of a split, read lazily from the
  :class:`~tf_explog.data.cache.VolumeCache` as NumPy ``(image, labels)`` pairs (for
  inference-mode validation and BatchNorm recalibration);
- :func:`clean_batches`: batches of one volume (padded to a multiple of 16) or of its tiles
  (patch-trained models), without augmentation, for
  :func:`tf_explog.batchnorm.recalibrate_batchnorm`.

The training front ends' shared core (validation, patch sampling) is
:mod:`tf_explog.data.sampling`.

NumPy only; no TensorFlow.
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .cache import CacheEntry, VolumeCache
from .manifest import Manifest
from .preprocess import Preprocessor
from tf_explog.geometry import pad_to_multiple, window_starts

__all__ = ["read_volume", "SplitVolumes", "split_volumes", "clean_batches", "clean_patches"]

PathLike = Union[str, os.PathLike]


def read_volume(entry: CacheEntry) -> tuple:
    """``(image float32 [D, H, W, C], labels int32 [D, H, W] or None)`` of a cache entry.

    Copies: never hand out a view of the read-only memory map (``tf.numpy_function`` must
    not be given one, and a caller writing in place would fail on it).
    """
    image = np.array(entry.image, dtype=np.float32)
    labels = None if entry.labels is None else np.array(entry.labels, dtype=np.int32)
    return image, labels


class SplitVolumes:
    """Preprocessed ``(image float32 [D, H, W, C], labels int32 [D, H, W])`` of a split.

    A sequence (``len``, indexing, iteration in manifest order) that reads each case from the
    volume cache when asked for it, so holding one costs no memory.

    Args:
        pairs: ``[(image path, label path), ...]``.
        cache: the :class:`VolumeCache` (it fixes the preprocessing).
    """

    def __init__(self, pairs: Sequence, cache: VolumeCache) -> None:
        self.pairs = [tuple(p) for p in pairs]
        self.cache = cache

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple:
        return read_volume(self.cache.entry(*self.pairs[index]))

    def __iter__(self) -> Iterator[tuple]:
        for i in range(len(self)):
            yield self[i]


def split_volumes(manifest: Manifest, split: str, preprocessor: Preprocessor,
                  cache_dir: PathLike) -> Optional[SplitVolumes]:
    """The :class:`SplitVolumes` of a split, or None when the split is empty."""
    entries = manifest.entries(split)
    if not entries:
        return None
    return SplitVolumes([e.pair for e in entries],
                        VolumeCache(cache_dir, manifest.preprocessor_for(preprocessor)))


def _tiles(image: np.ndarray, window: Sequence[int]) -> Iterator[np.ndarray]:
    """Non-overlapping windows covering the volume (the last one flush with the end)."""
    image = pad_to_multiple(image)
    shape = image.shape[:3]
    win = [min(w, s) for w, s in zip(window, shape)]
    starts = [window_starts(s, w, 0.0) for s, w in zip(shape, win)]
    for corner in itertools.product(*starts):
        yield image[tuple(slice(c, c + w) for c, w in zip(corner, win))]


def clean_batches(volumes: Sequence, window: Optional[Sequence[int]] = None
                  ) -> Callable[[], Iterator[np.ndarray]]:
    """A function returning a fresh iterator of clean image batches ``[1, D, H, W, C]``.

    Each volume is given whole (padded to a multiple of 16, as inference does) or, with
    ``window``, as the non-overlapping windows that tile it (the positions inference slides
    over). No augmentation, no labels: what BatchNorm recalibration needs.
    """
    def batches() -> Iterator[np.ndarray]:
        for element in volumes:
            image = element[0] if isinstance(element, tuple) else element
            if window is None:
                yield pad_to_multiple(image)[np.newaxis]
            else:
                for tile in _tiles(image, window):
                    yield tile[np.newaxis]
    return batches


def clean_patches(volumes: SplitVolumes, patch_size: Sequence[int], oversample: float,
                  per_case: int = 8, seed: int = 0) -> Callable[[], Iterator[np.ndarray]]:
    """A function returning a fresh iterator of training-like patches ``[1, p0, p1, p2, C]``.

    Each case gives ``per_case`` patches drawn as training draws them (a fraction
    ``oversample`` centred on a structure, the rest placed uniformly), without augmentation
    and the same ones at every call (seeded per case). For BatchNorm recalibration of
    patch-trained models: the statistics must describe what training batches looked like.
    Tiling the volumes instead (:func:`clean_batches` with a window) gives the corners'
    background the weight of the centre; measured on the paper network trained on 64³
    patches of 128³ synthetic volumes, validation Dice was 0.27 after recalibrating on tiles,
    0.80 on training-like patches and 0.64 with Keras' moving averages.
    """
    patch = tuple(int(v) for v in patch_size)

    def batches() -> Iterator[np.ndarray]:
        for case, pair in enumerate(volumes.pairs):
            entry = volumes.cache.entry(*pair)
            rng = np.random.default_rng([int(seed), case])
            for _ in range(int(per_case)):
                image, _, _ = entry.sample_patch(patch, rng, float(oversample))
                yield image[np.newaxis]
    return batches

