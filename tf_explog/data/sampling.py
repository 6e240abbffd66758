"""What every training input front end reads from a split, in one TensorFlow-free place.

:func:`tf_explog.data.pipeline.make_dataset` (``tf.data``) and
:class:`tf_explog.data.pydataset.VolumeSequence` (``keras.utils.PyDataset``, for the JAX
backend) differ only in how they order, batch, seed and run the reads. Everything else is
here, so the two cannot drift apart:

- argument validation (:class:`SplitSampler`, :func:`check_int`, :func:`positive_triple`,
  :func:`build_augmentation`), every message naming the argument;
- the split: its ``(image, label)`` pairs with every file checked (:func:`split_pairs`), the
  preprocessing (the manifest's label map added) and the
  :class:`~tf_explog.data.cache.VolumeCache` it is read from;
- the static volume shape, and the early refusal of volume-mode batches of unequal shapes;
- one element of a case (:meth:`SplitSampler.read`):

  - ``"volume"`` mode: the whole preprocessed volume (the paper: 128³, batch 1);
  - ``"patch"`` mode: one patch drawn with a given ``numpy`` generator; a fraction
    ``oversample`` of them centred on a voxel of a foreground label chosen uniformly among
    the labels present in the case (so the smallest structures are seen as often as the
    large ones), the rest placed uniformly; cases smaller than the patch are padded
    (:meth:`~tf_explog.data.cache.CacheEntry.sample_patch`);

- the labels as a model with auxiliary heads is fitted on (:meth:`SplitSampler.targets`).

NumPy only; never imports TensorFlow.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .cache import CacheEntry, VolumeCache, default_cache_dir
from .core import read_volume
from .manifest import Manifest, ManifestError
from .nifti import canonical_geometry
from .preprocess import Preprocessor
from tf_explog.errors import InputError
from tf_explog.labels import labels_by_output

__all__ = ["MODES", "SplitSampler", "split_pairs", "build_augmentation", "check_int",
           "positive_triple", "is_int"]

PathLike = Union[str, os.PathLike]

MODES = ("volume", "patch")


# ---------------------------------------------------------------------- argument checks


def is_int(value) -> bool:
    """An int or numpy integer, but not a bool (``True`` is no batch size)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, checked to be an integer ``>= minimum``.

    Raises:
        InputError: naming ``name``: "expected a positive int" (``minimum`` 1) or
            "expected an int >= minimum".
    """
    if not is_int(value) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InputError(f"{name}: expected {expected}, got {value!r}")
    return int(value)


def positive_triple(value, name: str) -> tuple:
    """Three positive ints from an int or a sequence of 3 (e.g. a patch size).

    Raises:
        InputError: naming ``name``, for anything else (including non-integral floats).
    """
    if is_int(value):
        value = (int(value),) * 3
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected an int or 3 ints, got {value!r}") from None
    if len(out) != 3 or any(v < 1 for v in out) or any(
        float(v) != float(w) for v, w in zip(out, value)
    ):
        raise InputError(f"{name}: expected 3 positive ints, got {value!r}")
    return out


def _fraction(value, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a fraction in [0, 1], got {value!r}") from None
    if not 0.0 <= out <= 1.0:
        raise InputError(f"{name}: expected a fraction in [0, 1], got {value!r}")
    return out


def build_augmentation(augment: Any, seed: int = 0) -> Optional[Callable]:
    """Turn an ``augment`` argument into a callable (or None), as both front ends do.

    Args:
        augment: None/False (no augmentation); True (``RandomAffine3D`` with the paper's
            defaults); a dict of ``RandomAffine3D`` keyword arguments; or any callable used as
            ``image, labels = augment((image, labels), training=True)`` (e.g. a Keras layer).
        seed: seed given to ``RandomAffine3D`` when the dict does not set one.

    Returns:
        The callable, or None.

    Raises:
        InputError: an unsupported value.
    """
    if augment is None or augment is False:
        return None
    if augment is True or isinstance(augment, Mapping):
        from tf_explog.augmentation import RandomAffine3D  # Keras: only when asked for

        kwargs = dict(augment) if isinstance(augment, Mapping) else {}
        kwargs.setdefault("seed", int(seed))
        return RandomAffine3D(**kwargs)
    if callable(augment):
        return augment
    raise InputError(
        f"augment: expected None, True, a dict of RandomAffine3D arguments or a callable, "
        f"got {augment!r}"
    )


# ---------------------------------------------------------------------- the split


def split_pairs(manifest: Manifest, split: str, aux_outputs: int = 0) -> tuple:
    """``([(image, label or None), ...], all_labelled)`` of a split, every file checked.

    Fails here, with every missing file named, rather than deep inside a loader worker.

    Raises:
        InputError: the split is empty, labelled only in part, or unlabelled with
            ``aux_outputs``.
        ManifestError: listing every missing file.
    """
    entries = manifest.entries(split)
    if not entries:
        raise InputError(f"split: {split!r} of {manifest.path} has no cases")
    pairs = [tuple(e.pair) for e in entries]
    missing = [
        f"{p}: file not found" for pair in pairs for p in pair
        if p is not None and not os.path.isfile(p)
    ]
    if missing:
        raise ManifestError(missing, manifest.path)
    labelled = [p[1] is not None for p in pairs]
    if any(labelled) and not all(labelled):
        names = [os.path.basename(p[0]) for p in pairs if p[1] is None]
        raise InputError(f"split {split!r}: some cases have no label file: {names[:10]}")
    if aux_outputs and not all(labelled):
        raise InputError(f"aux_outputs: split {split!r} of {manifest.path} has no labels")
    return pairs, all(labelled)


def _equal_volume_shape(preprocessor: Preprocessor, pairs: Sequence) -> tuple:
    """The one preprocessed shape of every case, from the file headers (nothing decoded).

    Raises:
        InputError: naming a file of each shape, when the shapes differ.
    """
    if preprocessor.output_shape((16, 16, 16), (1.0, 1.0, 1.0)) is None:
        raise InputError(
            "batch_size: volume mode with batch_size > 1 needs equal volume shapes, and "
            "crop_foreground makes them depend on each image. Set the preprocessor's "
            "resize_shape or target_shape, or use batch_size=1.")
    shapes: dict = {}
    for image, _ in pairs:
        shape, spacing, _ = canonical_geometry(image)
        shapes.setdefault(preprocessor.output_shape(shape, spacing), []).append(image)
    if len(shapes) > 1:
        listing = "; ".join(
            f"{s}: {len(v)} case(s), e.g. {os.path.basename(str(v[0]))}"
            for s, v in shapes.items()
        )
        raise InputError(
            "batch_size: volume mode with batch_size > 1 needs equal volume shapes, got "
            f"{listing}. Set the preprocessor's resize_shape or target_shape, or use "
            "batch_size=1."
        )
    return next(iter(shapes))


class SplitSampler:
    """The validated settings of a split's training input and one-element reads from it.

    Building one checks every argument both front ends share, resolves the split into
    checked ``(image, label)`` pairs and, in volume mode with ``batch_size > 1``, refuses
    volumes of unequal shapes (reading headers only) -- so a front end fails before it
    starts any worker. Holding one costs no memory: cases are read from the cache on demand.

    The front ends pass every argument, with their own defaults; those here are neutral.

    Args:
        manifest: a :class:`Manifest` or a path to ``dataset.json`` (or its folder).
        split: "training", "validation", "test" or "all".
        mode: "volume" (whole volumes) or "patch".
        batch_size: batch size (the shape check depends on it).
        patch_size: patch shape (int or 3 ints); needed in patch mode, checked when given.
        oversample: patch mode: fraction of patches centred on a voxel of a foreground label
            chosen uniformly among those present in the case.
        cache_dir: the volume cache (default :func:`~tf_explog.data.cache.default_cache_dir`).
        preprocessor: default ``Preprocessor()`` (z-score only); the manifest's label map is
            added when the preprocessor has none.
        aux_outputs: k > 0 makes the targets a dict ``{"segmentation": y, "aux_1": y, ...,
            "aux_k": y}`` (the same full-resolution labels) for a model with k auxiliary
            heads; their losses average the labels down (``deep_supervision_losses``).
        patches_per_volume: patch mode: patches cut from each case per read or pass.

    Attributes:
        pairs: ``[(image path, label path or None), ...]`` in manifest order.
        with_labels: every case has labels (else none has).
        preprocessor: the preprocessing actually applied (with the manifest's label map).
        cache: the :class:`VolumeCache`.
        patches_per_volume: elements per case and pass: the argument, 1 in volume mode.
        spatial_shape: ``(D, H, W)`` of every element: the patch size, or the volume shape
            when known without decoding, else ``(None, None, None)``.

    Raises:
        InputError: an invalid argument (named), an empty split, unequal volume shapes with
            ``batch_size > 1`` in volume mode.
        ManifestError: listing every missing file, or the manifest cannot be read.
    """

    def __init__(
        self,
        manifest: Union[Manifest, PathLike],
        split: str,
        *,
        mode: str,
        batch_size: int = 1,
        patch_size: Optional[Union[int, Sequence[int]]] = None,
        oversample: float = 0.0,
        cache_dir: Optional[PathLike] = None,
        preprocessor: Optional[Preprocessor] = None,
        aux_outputs: int = 0,
        patches_per_volume: int = 1,
    ) -> None:
        if not isinstance(manifest, Manifest):
            manifest = Manifest.load(manifest)
        if mode not in MODES:
            raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
        self.batch_size = check_int(batch_size, "batch_size")
        self.oversample = _fraction(oversample, "oversample")
        self.aux_outputs = check_int(aux_outputs, "aux_outputs", 0)
        patches = check_int(patches_per_volume, "patches_per_volume")
        if preprocessor is not None and not isinstance(preprocessor, Preprocessor):
            raise InputError(
                f"preprocessor: expected a Preprocessor, got {type(preprocessor).__name__}"
            )
        if patch_size is not None:
            patch_size = positive_triple(patch_size, "patch_size")
        elif mode == "patch":
            raise InputError("patch_size: patch mode needs a patch size, got None")
        self.patch_size: Optional[tuple] = patch_size

        self.pairs, self.with_labels = split_pairs(manifest, split, self.aux_outputs)
        self.manifest = manifest
        self.split = split
        self.mode = mode
        self.patches_per_volume = patches if mode == "patch" else 1
        self.preprocessor = manifest.preprocessor_for(preprocessor)
        self.cache = VolumeCache(
            cache_dir if cache_dir is not None else default_cache_dir(), self.preprocessor
        )
        self.spatial_shape = self._spatial_shape()

    def _spatial_shape(self) -> tuple:
        if self.mode == "patch":
            return self.patch_size
        p = self.preprocessor
        if p.target_shape is not None:
            return tuple(p.target_shape)
        if p.resize_shape is not None:
            return tuple(p.resize_shape)
        if self.batch_size > 1:  # a batch needs one shape: check it now, not mid-epoch
            return _equal_volume_shape(p, self.pairs)
        return (None, None, None)

    @cached_property
    def channels(self) -> int:
        """Image channels (from the first case's header)."""
        return canonical_geometry(self.pairs[0][0])[2]

    def __len__(self) -> int:
        """Cases in the split."""
        return len(self.pairs)

    def entry(self, case: int) -> CacheEntry:
        """The cache entry of case ``case`` (index into :attr:`pairs`), built if missing."""
        return self.cache.entry(*self.pairs[case])

    def read(self, entry: CacheEntry, rng: Optional[np.random.Generator] = None) -> tuple:
        """One element of a case: its whole volume, or one patch drawn with ``rng``.

        Args:
            entry: the case's cache entry (:meth:`entry`).
            rng: patch mode: the generator that places the patch (the same state gives the
                same patch; successive draws from one generator give successive patches).
                Unused in volume mode.

        Returns:
            ``(image float32 [*spatial, C], labels int32 [*spatial] or None)``; fresh arrays
            (never views of the cache's memory maps).
        """
        if self.mode == "volume":
            return read_volume(entry)
        if rng is None:
            raise TypeError("SplitSampler.read: patch mode needs a numpy Generator as rng")
        image, labels, _ = entry.sample_patch(self.patch_size, rng, self.oversample)
        return image, labels

    def targets(self, labels):
        """``labels`` as the model is fitted on: themselves, or the per-output dict
        (:func:`tf_explog.labels.labels_by_output`) with ``aux_outputs``. Any array type."""
        return labels_by_output(labels, self.aux_outputs)
