"""Streaming ``tf.data`` pipeline from a data-set manifest to ``(image, labels)`` batches.

Each case is decoded and preprocessed once into a :class:`~tf_explog.data.cache.VolumeCache`
(uncompressed ``.npy``, memory-mapped afterwards); the dataset then reads from the cache in
parallel. Memory is bounded by the buffer sizes (``num_parallel_reads`` volumes in flight,
``prefetch`` batches), never by the data-set size: shuffling permutes case *indices*.

Two modes (:mod:`tf_explog.data.sampling` reads the elements, for both input front ends):

- ``"volume"``: whole preprocessed volumes (the paper: 128³, batch 1);
- ``"patch"``: ``patches_per_volume`` patches per case read, interleaved across
  ``num_parallel_reads`` cases; a fraction ``oversample`` of them centred on a foreground
  voxel, the rest placed uniformly.

Randomness (order, patch positions, augmentation) derives from ``seed``: two datasets built with
the same arguments yield the same batches.

This is the only module of ``tf_explog.data`` that imports TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from .manifest import Manifest
from .preprocess import Preprocessor
from .sampling import SplitSampler, build_augmentation, check_int

__all__ = ["make_dataset", "build_augmentation"]  # build_augmentation: re-exported

_MASK64 = (1 << 63) - 1


def make_dataset(
    manifest: Union[Manifest, str, os.PathLike],
    split: str = "training",
    mode: str = "volume",
    patch_size: Union[int, Sequence[int]] = (64, 64, 64),
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    augment: Any = None,
    oversample: float = 0.33,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    preprocessor: Optional[Preprocessor] = None,
    repeat: bool = False,
    aux_outputs: int = 0,
    *,
    patches_per_volume: int = 1,
    num_parallel_reads: Optional[int] = None,
    prefetch: int = 2,
    drop_remainder: bool = False,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """Stream a split of a data set as ``(image, labels)`` batches.

    Args:
        manifest, split, mode, patch_size, batch_size, oversample, cache_dir, preprocessor,
            aux_outputs, patches_per_volume: the split, its preprocessing and its elements,
            as :class:`~tf_explog.data.sampling.SplitSampler` documents them (the two input
            front ends share it). The ``patches_per_volume`` patches of each case read are
            interleaved across ``num_parallel_reads`` cases.
        shuffle: shuffle the case order every epoch (seeded).
        seed: seed of shuffling, patch positions and (built) augmentation.
        augment: None, True, a dict of ``RandomAffine3D`` arguments, or a callable applied to
            each batch as ``image, labels = augment((image, labels), training=True)``.
        repeat: repeat forever (for ``fit(steps_per_epoch=...)``).
        num_parallel_reads: cases read/decoded concurrently (default ``min(4, cpu count)``).
        prefetch: batches prepared ahead.
        drop_remainder: drop a last incomplete batch.
        deterministic: keep the element order reproducible under parallel reads.

    Returns:
        ``tf.data.Dataset`` of ``(image float32 [B, D, H, W, C], labels int32 [B, D, H, W])``
        (labels a dict with ``aux_outputs``); of images only when the split has no labels.

    Raises:
        InputError: (a ValueError) what :class:`~tf_explog.data.sampling.SplitSampler` raises
            for, and an invalid ``augment``, ``prefetch`` or ``num_parallel_reads``.
        ManifestError: the manifest cannot be read or lists missing files.
    """
    prefetch = check_int(prefetch, "prefetch", 0)
    parallel = check_int(num_parallel_reads or min(4, os.cpu_count() or 1),
                         "num_parallel_reads")
    sampler = SplitSampler(manifest, split, mode=mode, batch_size=batch_size,
                           patch_size=patch_size, oversample=oversample, cache_dir=cache_dir,
                           preprocessor=preprocessor, aux_outputs=aux_outputs,
                           patches_per_volume=patches_per_volume)
    with_labels = sampler.with_labels
    aug = build_augmentation(augment, seed)
    seed = int(seed)
    image_shape = (*sampler.spatial_shape, sampler.channels)
    k = sampler.patches_per_volume

    def load_volume_np(index, rnd):
        image, labels = sampler.read(sampler.entry(int(index)))
        return (image, labels) if with_labels else image

    def load_patches_np(index, rnd):
        entry = sampler.entry(int(index))
        rng = np.random.default_rng([seed & _MASK64, int(rnd) & _MASK64])
        cut = [sampler.read(entry, rng) for _ in range(k)]
        images = np.stack([c[0] for c in cut])
        if not with_labels:
            return images
        return images, np.stack([c[1] for c in cut])

    tout = (tf.float32, tf.int32) if with_labels else tf.float32

    def tf_load(fn, batched: bool):
        lead = (k,) if batched else ()

        def _load(index, rnd):
            out = tf.numpy_function(fn, [index, rnd], tout, stateful=False)
            if with_labels:
                image, labels = out
                image.set_shape((*lead, *image_shape))
                labels.set_shape((*lead, *image_shape[:3]))
                return image, labels
            image = out[0] if isinstance(out, (list, tuple)) else out
            image.set_shape((*lead, *image_shape))
            return image

        return _load

    indices = tf.data.Dataset.range(len(sampler))
    if shuffle:
        indices = indices.shuffle(len(sampler), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        indices = indices.repeat()
    # One random number per case read, re-drawn each epoch: seeds its patch positions.
    randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((indices, randoms))

    if sampler.mode == "volume":
        ds = ds.map(tf_load(load_volume_np, False), num_parallel_calls=parallel,
                    deterministic=deterministic)
    else:
        loader = tf_load(load_patches_np, True)
        ds = ds.interleave(
            lambda i, r: tf.data.Dataset.from_tensors((i, r)).map(loader).unbatch(),
            cycle_length=parallel,
            block_length=1,
            num_parallel_calls=parallel,
            deterministic=deterministic,
        )
    ds = ds.batch(sampler.batch_size, drop_remainder=drop_remainder)

    if aug is not None:
        if with_labels:
            def _augment(image, labels):
                out_image, out_labels = aug((image, labels), training=True)
                return tf.cast(out_image, tf.float32), tf.cast(out_labels, tf.int32)
        else:
            def _augment(image):
                return tf.cast(aug(image, training=True), tf.float32)
        # Sequential: a stateful seed generator must advance in a fixed order.
        ds = ds.map(_augment, num_parallel_calls=None)

    if sampler.aux_outputs:
        ds = ds.map(lambda image, labels: (image, sampler.targets(labels)))
    if prefetch:
        ds = ds.prefetch(prefetch)
    return ds
