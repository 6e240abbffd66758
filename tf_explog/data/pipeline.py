"""Streaming ``tf.data`` pipeline from a data-set manifest to ``(image, labels)`` batches.

Each case is decoded and preprocessed once into a :class:`~tf_explog.data.cache.VolumeCache`
(uncompressed ``.npy``, memory-mapped afterwards); the dataset then reads from the cache in
parallel. Memory is bounded by the buffer sizes (``num_parallel_reads`` volumes in flight,
``prefetch`` batches), never by the data-set size: shuffling permutes case *indices*.

Two modes:

- ``"volume"``: whole preprocessed volumes (the paper: 128³, batch 1);
- ``"patch"``: ``patches_per_volume`` patches per case read; a fraction ``oversample`` of them is
  centred on a voxel of a foreground label chosen uniformly among the labels present in that
  case (so the smallest structures are seen as often as the large ones), the rest placed
  uniformly; cases smaller than the patch are zero-padded.

Randomness (order, patch positions, augmentation) derives from ``seed``: two datasets built with
the same arguments yield the same batches.

This is the only module of ``tf_explog.data`` that imports TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from .cache import VolumeCache, default_cache_dir
from .manifest import Manifest
from .nifti import canonical_geometry
from .preprocess import Preprocessor
from tf_explog.labels import labels_by_output
from .pydataset import (_is_int, _positive_triple, build_augmentation,  # shared, TF-free
                        split_pairs)
from tf_explog.errors import InputError

__all__ = ["make_dataset", "build_augmentation"]

_MODES = ("volume", "patch")
_MASK64 = (1 << 63) - 1


def _static_shape(preprocessor: Preprocessor, pairs: list, need_fixed: bool) -> Optional[tuple]:
    """Spatial shape of every preprocessed volume if known without decoding, else None."""
    if preprocessor.target_shape is not None:
        return tuple(preprocessor.target_shape)
    if preprocessor.resize_shape is not None:
        return tuple(preprocessor.resize_shape)
    if not need_fixed:
        return None
    shapes: dict = {}
    for image, _ in pairs:
        shape, spacing, _ = canonical_geometry(image)
        shapes.setdefault(preprocessor.output_shape(shape, spacing), []).append(image)
    if len(shapes) > 1:
        listing = "; ".join(
            f"{s}: {len(v)} case(s), e.g. {os.path.basename(v[0])}" for s, v in shapes.items()
        )
        raise InputError(
            "batch_size: volume mode with batch_size > 1 needs equal volume shapes, got "
            f"{listing}. Set the preprocessor's resize_shape or target_shape, or use batch_size=1."
        )
    return next(iter(shapes))


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
        manifest: a :class:`Manifest` or a path to ``dataset.json`` (or its folder).
        split: "training", "validation", "test" or "all".
        mode: "volume" (whole volumes) or "patch".
        patch_size: patch shape (int or 3 ints), patch mode only.
        batch_size: batch size.
        shuffle: shuffle the case order every epoch (seeded).
        seed: seed of shuffling, patch positions and (built) augmentation.
        augment: None, True, a dict of ``RandomAffine3D`` arguments, or a callable applied to
            each batch as ``image, labels = augment((image, labels), training=True)``.
        oversample: patch mode: fraction of patches centred on a voxel of a foreground label
            chosen uniformly among those present in the case.
        cache_dir: the volume cache (default :func:`~tf_explog.data.cache.default_cache_dir`).
        preprocessor: default ``Preprocessor()`` (z-score only); the manifest's label map is
            applied when the preprocessor has none.
        repeat: repeat forever (for ``fit(steps_per_epoch=...)``).
        aux_outputs: k > 0 makes labels a dict ``{"segmentation": y, "aux_1": y, ...,
            "aux_k": y}`` (the same full-resolution labels) for a model with k auxiliary
            heads; their losses average the labels down (``deep_supervision_losses``).
        patches_per_volume: patch mode: patches cut from each case read (interleaved across
            ``num_parallel_reads`` cases).
        num_parallel_reads: cases read/decoded concurrently (default ``min(4, cpu count)``).
        prefetch: batches prepared ahead.
        drop_remainder: drop a last incomplete batch.
        deterministic: keep the element order reproducible under parallel reads.

    Returns:
        ``tf.data.Dataset`` of ``(image float32 [B, D, H, W, C], labels int32 [B, D, H, W])``
        (labels a dict with ``aux_outputs``); of images only when the split has no labels.

    Raises:
        ValueError: invalid arguments or an empty split.
        ManifestError: the manifest cannot be read.
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    if mode not in _MODES:
        raise InputError(f"mode: expected one of {_MODES}, got {mode!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not 0.0 <= float(oversample) <= 1.0:
        raise InputError(f"oversample: expected a fraction in [0, 1], got {oversample!r}")
    if not _is_int(aux_outputs) or aux_outputs < 0:
        raise InputError(f"aux_outputs: expected an int >= 0, got {aux_outputs!r}")
    if int(patches_per_volume) < 1:
        raise InputError(f"patches_per_volume: expected >= 1, got {patches_per_volume!r}")
    if int(prefetch) < 0:
        raise InputError(f"prefetch: expected >= 0, got {prefetch!r}")
    if preprocessor is not None and not isinstance(preprocessor, Preprocessor):
        raise InputError(
            f"preprocessor: expected a Preprocessor, got {type(preprocessor).__name__}"
        )
    patch = _positive_triple(patch_size, "patch_size")
    parallel = int(num_parallel_reads or min(4, os.cpu_count() or 1))
    if parallel < 1:
        raise InputError(f"num_parallel_reads: expected >= 1, got {num_parallel_reads!r}")

    pairs, with_labels = split_pairs(manifest, split, aux_outputs)

    preprocessor = manifest.preprocessor_for(preprocessor)
    cache = VolumeCache(cache_dir if cache_dir is not None else default_cache_dir(), preprocessor)
    _, _, channels = canonical_geometry(pairs[0][0])
    aug = build_augmentation(augment, seed)
    seed = int(seed)

    if mode == "volume":
        spatial = _static_shape(preprocessor, pairs, need_fixed=batch_size > 1)
        spatial = spatial if spatial is not None else (None, None, None)
    else:
        spatial = patch
    image_shape = (*spatial, channels)

    def load_volume_np(index, rnd):
        e = cache.entry(*pairs[int(index)])
        image = np.array(e.image, dtype=np.float32)  # copy: never hand TF a view of the mmap
        if not with_labels:
            return image
        return image, np.array(e.labels, dtype=np.int32)

    k = int(patches_per_volume)

    def load_patches_np(index, rnd):
        e = cache.entry(*pairs[int(index)])
        rng = np.random.default_rng([seed & _MASK64, int(rnd) & _MASK64])
        cut = [e.sample_patch(patch, rng, float(oversample)) for _ in range(k)]
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

    indices = tf.data.Dataset.range(len(pairs))
    if shuffle:
        indices = indices.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        indices = indices.repeat()
    # One random number per case read, re-drawn each epoch: seeds its patch positions.
    randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((indices, randoms))

    if mode == "volume":
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
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

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

    if aux_outputs:
        n_aux = int(aux_outputs)
        ds = ds.map(lambda image, labels: (image, labels_by_output(labels, n_aux)))
    if prefetch:
        ds = ds.prefetch(int(prefetch))
    return ds
