"""TensorFlow-free input path: a ``keras.utils.PyDataset`` over the preprocessed volume cache.

The GPU machine runs Keras on JAX and has no TensorFlow, so ``tf.data``
(:mod:`tf_explog.data.pipeline`) cannot feed it. :class:`VolumeSequence` yields the same
batches from the same :class:`~tf_explog.data.cache.VolumeCache` (decode once, memory-mapped
``.npy`` afterwards) with numpy, and applies the same augmentation layer
(:class:`~tf_explog.augmentation.RandomAffine3D`) to each batch:

- ``"volume"`` mode: whole preprocessed volumes (the paper: 128³, batch 1);
- ``"patch"`` mode: ``patches_per_volume`` patches per case and pass, a fraction
  ``oversample`` of them centred on a foreground voxel, the rest placed uniformly;
- labels a dict ``{"segmentation": y, "aux_1": y, ...}`` with ``aux_outputs``.

Validation, the split, the cache and every element read are
:class:`~tf_explog.data.sampling.SplitSampler`'s, shared with the tf.data pipeline; this
module orders, seeds, batches and augments.

Randomness is a pure function of ``(seed, pass, index)``: pass ``p`` orders the cases by
``default_rng([seed, p, 0]).permutation``, the patch ``j`` of case ``c`` comes from
``default_rng([seed, p, 1, c, j])`` and batch ``i`` is augmented with a seed drawn from
``(seed, p, 2, i)``. So ``__getitem__`` can run in any order on any number of worker
threads and two sequences built with the same arguments give the same batches. The pass is
the epoch count (:meth:`on_epoch_end` advances it; :meth:`set_epoch` sets it, e.g. on
resume); with ``repeat=True`` the batch index runs on through consecutive passes.

Differences from :func:`tf_explog.data.pipeline.make_dataset`: the shuffled order and the
random draws differ (numpy instead of ``tf.random``); un-augmented, unshuffled batches are
identical. In patch mode the patches of a pass are ordered patch-major (patch 0 of every
case, then patch 1, ...), i.e. an interleave over all cases rather than over
``num_parallel_reads`` of them.

Augmentation cost: a Keras layer is run through ``layer.stateless_call`` with its seed
generators set per batch. On the JAX backend that call is ``jax.jit``-compiled once per batch
shape. Measured for ``RandomAffine3D`` on the shared 2-core CPU (JAX 0.10, Keras 3.15), one
volume per batch: jitted, about 1 s to compile, then 26 ms per 128³ volume (3 ms at 64³);
eager JAX (``jit_augment=False``), about 3 s for the first call, then 320 ms per 128³ volume
(53 ms at 64³); eager TensorFlow, 285 ms per 128³ volume. On a GPU the jitted call runs on
the device, plus two host-device copies of the batch (8 MiB per 128³ volume each way). Other
callables are called as they are, one batch at a time (under a lock); their randomness then
depends on the order in which workers reach them.

This module imports numpy and Keras only (never TensorFlow), so it runs on the JAX backend.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable, Optional, Sequence, Union

import keras
import numpy as np

from .manifest import Manifest
from .preprocess import Preprocessor
from .sampling import SplitSampler, build_augmentation, check_int, is_int
from tf_explog.errors import InputError

__all__ = [
    "VolumeSequence",
    "BatchAugmenter",
    "build_augmentation",  # re-exported from tf_explog.data.sampling
]

PathLike = Union[str, os.PathLike]

# Stream tags that keep the case order, the patch positions and the augmentation seeds of a
# pass statistically independent of each other.
_ORDER, _PATCH, _AUGMENT = 0, 1, 2
_SEED_STATE_NAME = "seed_generator_state"  # the variable name keras.random.SeedGenerator uses


def _derived_seed(*parts: int) -> int:
    """A 31-bit seed hashed from non-negative ints (fits int32 and uint32 seed dtypes)."""
    state = np.random.SeedSequence([int(p) & ((1 << 63) - 1) for p in parts]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def _to_numpy(x, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(keras.ops.convert_to_numpy(x)), dtype=dtype)


class BatchAugmenter:
    """Apply an augmentation callable to numpy batches, reproducibly per batch key.

    A Keras layer (e.g. ``RandomAffine3D``) is run with ``layer.stateless_call``: every
    ``keras.random.SeedGenerator`` state of the layer is replaced, for that call only, by
    ``[hash(initial seed, key), 0]``, so the draw depends on ``key`` alone -- not on how
    many batches were augmented before nor on which worker thread runs it -- and the layer
    itself is never mutated. On the JAX backend that call is ``jax.jit``-compiled (once per
    input shape). Any other callable is called as ``augment((image, labels), training=True)``
    under a lock.

    Args:
        augment: a Keras layer or a callable with the ``(image, labels), training=True``
            convention (``image`` alone when the batches have no labels).
        jit: "auto" (jit on the JAX backend), True (JAX backend required) or False.

    Raises:
        ValueError: ``augment`` is not callable, or ``jit=True`` off the JAX backend.
    """

    def __init__(self, augment: Callable, jit: Union[str, bool] = "auto") -> None:
        if not callable(augment):
            raise InputError(f"augment: expected a callable, got {augment!r}")
        if jit not in ("auto", True, False):
            raise InputError(f"jit_augment: expected 'auto', True or False, got {jit!r}")
        backend = keras.backend.backend()
        if jit is True and backend != "jax":
            raise InputError(
                f"jit_augment: True needs the JAX backend, the Keras backend is {backend!r}"
            )
        self.augment = augment
        self.jit = backend == "jax" if jit == "auto" else bool(jit)
        self._is_layer = isinstance(augment, keras.layers.Layer)
        self._lock = threading.Lock()
        self._ready = False
        self._seed_slots: list = []  # (index in non_trainable_variables, initial seed)
        self._fn = None

    def _prepare(self, inputs) -> None:
        """Build the layer (a training=False call is an identity) and find its seed states."""
        layer = self.augment
        if not layer.built:
            layer(inputs, training=False)
        for i, v in enumerate(layer.non_trainable_variables):
            if v.name == _SEED_STATE_NAME:
                initial = int(np.asarray(keras.ops.convert_to_numpy(v.value)).reshape(-1)[0])
                self._seed_slots.append((i, initial))

        def run(trainable, non_trainable, inputs):
            out, _ = layer.stateless_call(trainable, non_trainable, inputs, training=True)
            return out

        if self.jit:
            import jax  # only reached on the JAX backend

            self._fn = jax.jit(run)
        else:
            self._fn = run

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], key: int) -> tuple:
        """Augment one batch.

        Args:
            image: float32 ``[B, D, H, W, C]``.
            labels: int ``[B, D, H, W]`` or None.
            key: non-negative int identifying the batch (same key, same transform).

        Returns:
            ``(image float32, labels int32 or None)`` numpy arrays of the input shapes.
        """
        inputs = image if labels is None else (image, labels)
        if self._is_layer:
            with self._lock:
                if not self._ready:
                    self._prepare(inputs)
                    self._ready = True
        if not self._is_layer or not self._seed_slots:
            with self._lock:
                out = self.augment(inputs, training=True)
        else:
            layer = self.augment
            non_trainable = [v.value for v in layer.non_trainable_variables]
            for i, initial in self._seed_slots:
                dtype = layer.non_trainable_variables[i].dtype
                non_trainable[i] = np.array([_derived_seed(initial, key), 0], dtype=dtype)
            trainable = [v.value for v in layer.trainable_variables]
            out = self._fn(trainable, non_trainable, inputs)
        if labels is None:
            return _to_numpy(out, np.float32), None
        out_image, out_labels = out
        return _to_numpy(out_image, np.float32), _to_numpy(out_labels, np.int32)


class VolumeSequence(keras.utils.PyDataset):
    """Batches of a data-set split from the volume cache, for ``model.fit`` on any backend.

    Yields ``(image float32 [B, D, H, W, C], labels int32 [B, D, H, W])`` numpy batches
    (labels a dict with ``aux_outputs``; images alone for a split without labels). See
    the module docstring for the modes, the seeding and the cost of augmentation.

    Keras's ``fit(shuffle=True)`` (its default) also permutes the batch indices of a
    ``PyDataset``, with Python's global ``random``; pass ``shuffle=False`` to ``fit`` and let
    the sequence shuffle (seeded) instead. Keras calls :meth:`on_epoch_end` once more before
    the first epoch of a ``fit`` (after building the model on a first batch), so epoch ``e``
    (0-based) of a fresh ``fit`` reads pass ``e + 1``, with 1 worker or several.

    Args:
        manifest, split, mode, patch_size, batch_size, oversample, cache_dir, preprocessor,
            aux_outputs, patches_per_volume: the split, its preprocessing and its elements,
            as :class:`~tf_explog.data.sampling.SplitSampler` documents them (the two input
            front ends share it); ``patches_per_volume`` patches per case and pass.
        shuffle: new case order every pass (seeded); else manifest order.
        seed: seed of the order, the patch positions and the augmentation (an int >= 0).
        augment: None, True, a dict of ``RandomAffine3D`` arguments, or a callable applied
            to each batch as ``image, labels = augment((image, labels), training=True)``.
        workers: worker threads (or processes) preparing batches ahead (Keras's enqueuer).
        use_multiprocessing: processes instead of threads; not with ``augment`` (Keras ops
            are not fork-safe). Threads suffice: memory-mapped reads and XLA release the GIL.
        max_queue_size: batches prepared ahead with ``workers > 1``.
        repeat: endless: batch ``i`` is batch ``i % len(self)`` of pass ``i // len(self)``
            (for ``fit(steps_per_epoch=...)``); :meth:`on_epoch_end` then changes nothing.
        drop_remainder: drop a last incomplete batch of each pass.
        jit_augment: "auto", True or False: ``jax.jit`` the augmentation (JAX backend).

    Raises:
        InputError: (a ValueError) what :class:`~tf_explog.data.sampling.SplitSampler` raises
            for, and an invalid ``workers``, ``max_queue_size``, ``seed``, ``augment``,
            ``jit_augment`` or ``use_multiprocessing`` with ``augment``.
        ManifestError: the manifest cannot be read or lists missing files.
    """

    def __init__(
        self,
        manifest: Union[Manifest, PathLike],
        split: str = "training",
        mode: str = "volume",
        patch_size: Union[int, Sequence[int]] = (64, 64, 64),
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        oversample: float = 0.33,
        cache_dir: Optional[PathLike] = None,
        preprocessor: Optional[Preprocessor] = None,
        augment: Any = None,
        aux_outputs: int = 0,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        *,
        patches_per_volume: int = 1,
        repeat: bool = False,
        drop_remainder: bool = False,
        jit_augment: Union[str, bool] = "auto",
    ) -> None:
        check_int(workers, "workers", 0)
        check_int(max_queue_size, "max_queue_size")
        super().__init__(workers=int(workers), use_multiprocessing=bool(use_multiprocessing),
                         max_queue_size=int(max_queue_size))
        self.seed = check_int(seed, "seed", 0)  # tf.data accepts any; numpy seeds are >= 0
        if use_multiprocessing and augment not in (None, False):
            raise InputError(
                "use_multiprocessing: not supported with augment (Keras ops on JAX/TensorFlow "
                "are not safe in forked workers); use threads: workers > 1, "
                "use_multiprocessing=False"
            )
        self.sampler = s = SplitSampler(
            manifest, split, mode=mode, batch_size=batch_size, patch_size=patch_size,
            oversample=oversample, cache_dir=cache_dir, preprocessor=preprocessor,
            aux_outputs=aux_outputs, patches_per_volume=patches_per_volume)
        # The sampler's validated settings, under the names this class has always had.
        self.manifest, self.split, self.mode = s.manifest, s.split, s.mode
        self.patch_size, self.batch_size = s.patch_size, s.batch_size
        self.oversample, self.aux_outputs = s.oversample, s.aux_outputs
        self.patches_per_volume, self.pairs = s.patches_per_volume, s.pairs
        self.with_labels, self.preprocessor, self.cache = s.with_labels, s.preprocessor, s.cache
        self.shuffle = bool(shuffle)
        self.repeat = bool(repeat)
        self.drop_remainder = bool(drop_remainder)
        self._augment_fn = build_augmentation(augment, self.seed)
        self.augmenter = (
            BatchAugmenter(self._augment_fn, jit=jit_augment)
            if self._augment_fn is not None else None
        )

        self._elements = len(self.pairs) * self.patches_per_volume
        n = self._elements / self.batch_size
        self._batches = math.floor(n) if self.drop_remainder else math.ceil(n)
        if self._batches < 1:
            raise InputError(
                f"batch_size: {self.batch_size} exceeds the {self._elements} elements of split "
                f"{split!r} with drop_remainder=True"
            )
        self._epoch = 0
        self._entries: dict = {}
        self._orders: dict = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ Keras protocol

    def __len__(self) -> int:
        """Batches per pass over the split."""
        return self._batches

    @property
    def num_batches(self) -> Optional[int]:
        """Batches per epoch for Keras: ``len(self)``, or None (endless) with ``repeat``."""
        return None if self.repeat else self._batches

    def __getitem__(self, index: int):
        """Batch ``index`` of the current pass (of pass ``index // len(self)`` with repeat)."""
        if not is_int(index) or index < 0:
            raise IndexError(f"index: expected an int >= 0, got {index!r}")
        index = int(index)
        if self.repeat:
            epoch, index = divmod(index, self._batches)
        else:
            if index >= self._batches:
                raise IndexError(f"index {index} out of range for {self._batches} batches")
            epoch = self._epoch
        return self.batch(index, epoch)

    def on_epoch_end(self) -> None:
        """Move to the next pass (new order, patches and augmentation) unless ``repeat``."""
        if not self.repeat:
            self._epoch += 1

    # ------------------------------------------------------------------ public helpers

    @property
    def epoch(self) -> int:
        """The current pass number."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the pass number (e.g. to the initial epoch when resuming a run)."""
        self._epoch = check_int(epoch, "epoch", 0)

    def order(self, epoch: int) -> np.ndarray:
        """Case indices (into :attr:`pairs`) in the order of pass ``epoch``."""
        with self._guard:
            cached = self._orders.get(epoch)
        if cached is not None:
            return cached
        n = len(self.pairs)
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch), _ORDER]).permutation(n)
        else:
            order = np.arange(n)
        with self._guard:
            if len(self._orders) > 8:  # a few passes in flight at most
                self._orders.clear()
            self._orders[epoch] = order
        return order

    def batch(self, index: int, epoch: int):
        """Batch ``index`` of pass ``epoch`` (pure function of the arguments and the seed).

        Returns:
            ``(image, labels)`` (labels a dict with ``aux_outputs``), or ``image``.
        """
        order = self.order(epoch)
        n = len(self.pairs)
        start = index * self.batch_size
        stop = min(start + self.batch_size, self._elements)
        images, labels = [], []
        for element in range(start, stop):
            j, position = divmod(element, n)  # patch-major: patch j of every case, then j+1
            case = int(order[position])
            image, lab = self._element(case, j, epoch)
            images.append(image)
            labels.append(lab)
        image = self._stack(images, "image", order, start, stop)
        lab = self._stack(labels, "labels", order, start, stop) if self.with_labels else None
        if self.augmenter is not None:
            image, lab = self.augmenter(image, lab, _derived_seed(self.seed, epoch, _AUGMENT,
                                                                  index))
        if not self.with_labels:
            return image
        return image, self.sampler.targets(lab)

    def entry(self, case: int):
        """The cache entry of case ``case`` (built on first use, then memoised)."""
        e = self._entries.get(case)
        if e is None:
            e = self.sampler.entry(case)
            self._entries[case] = e
        return e

    def warm(self, workers: int = 1) -> int:
        """Decode and preprocess every missing case into the cache now (returns the count)."""
        return self.cache.warm(self.pairs, workers=workers)

    # ------------------------------------------------------------------ internals

    def _element(self, case: int, j: int, epoch: int) -> tuple:
        rng = None
        if self.mode == "patch":
            rng = np.random.default_rng([self.seed, int(epoch), _PATCH, case, j])
        return self.sampler.read(self.entry(case), rng)

    def _stack(self, arrays: list, what: str, order, start: int, stop: int) -> np.ndarray:
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            n = len(self.pairs)
            listing = "; ".join(
                f"{os.path.basename(str(self.pairs[int(order[e % n])][0]))}: {a.shape}"
                for e, a in zip(range(start, stop), arrays)
            )
            raise InputError(
                f"batch_size: volume mode with batch_size > 1 needs equal {what} shapes, got "
                f"{listing}. Set the preprocessor's resize_shape or target_shape, or use "
                "batch_size=1."
            )
        return np.stack(arrays)

    def __getstate__(self) -> dict:
        # Memory maps would be pickled as full copies (spawned workers): reopen them instead.
        state = self.__dict__.copy()
        state["_entries"] = {}
        state["_orders"] = {}
        state["_guard"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._guard = threading.Lock()
