"""BatchNormalization statistics that match inference ("precise BatchNorm").

Keras' ``BatchNormalization`` keeps an exponential moving average of the batch statistics it
saw in training. Two things make those averages wrong for the paper's network at inference:

- the input ``GaussianNoise(σ=1)`` is on in training: on z-scored volumes the first layers
  see about twice the variance they meet at inference (noise, dropout and augmentation are
  off there);
- with a handful of steps per epoch (batch 1, a dozen volumes) the average lags the
  weights by many updates (momentum 0.99: a time constant of 100 steps).

:func:`recalibrate_batchnorm` replaces the moving mean and variance of every trainable
``BatchNormalization`` layer by the statistics of its inputs over clean batches (the
caller's choice; tf_explog passes the training volumes without augmentation), computed with
the rest of the model in inference mode (no noise, no dropout):

    μ_l = (1/N) Σ_x a_l(x),     σ²_l = (1/N) Σ_x (a_l(x) − μ_l)²

over every voxel x of every batch (N voxels in all; per-batch moments are merged exactly, in
float64, with Chan et al.'s pairwise update). This is "PreciseBN" (Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021): population statistics instead of an EMA.

What a layer's input ``a_l`` is computed with differs by pass:

- pass 1 normalises every layer with the statistics of the current batch, as in training
  (the inputs each layer was trained on);
- each further pass runs the model in plain inference mode with the statistics of the pass
  before, so later layers see inputs computed with recalibrated earlier layers. After L
  passes this is the exact layer-by-layer solution (layer l depends only on layers < l).

Cost: ``passes`` forward passes over the batches, in eager mode. Uses ``keras.ops`` only
(TensorFlow or JAX backend); importing this module does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import keras
import numpy as np
from keras import ops
from tf_explog.errors import InputError

__all__ = [
    "batchnorm_layers",
    "recalibrate_batchnorm",
    "batch_statistics",
    "RecalibrationReport",
    "BatchNormRecalibration",
]

Batches = Union[Iterable, Callable[[], Iterable]]


def batchnorm_layers(model: keras.layers.Layer, trainable_only: bool = True) -> list:
    """Every ``BatchNormalization`` layer inside ``model`` (nested layers included).

    Args:
        model: a Keras model or layer.
        trainable_only: leave out frozen layers (``trainable=False``), whose statistics a
            user fixed on purpose (e.g. when fine-tuning).

    Returns:
        The layers, in the order Keras tracks them.
    """
    found = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
             if isinstance(layer, keras.layers.BatchNormalization)]
    return [layer for layer in found if layer.trainable or not trainable_only]


class _Moments:
    """Running count, mean and sum of squared deviations per channel (float64), and the
    running sums of the per-batch means and variances."""

    def __init__(self) -> None:
        self.n = 0
        self.batches = 0
        self.mean: Optional[np.ndarray] = None
        self.m2: Optional[np.ndarray] = None
        self.batch_mean_sum: Optional[np.ndarray] = None
        self.batch_var_sum: Optional[np.ndarray] = None

    def add(self, n: int, mean: np.ndarray, var: np.ndarray) -> None:
        mean = np.asarray(mean, np.float64)
        var = np.asarray(var, np.float64)
        self.batches += 1
        self.batch_mean_sum = mean if self.batch_mean_sum is None else self.batch_mean_sum + mean
        self.batch_var_sum = var if self.batch_var_sum is None else self.batch_var_sum + var
        m2 = var * n
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        # Chan, Golub & LeVeque (1979): exact merge of two groups' moments.
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)

    def estimate(self, statistics: str) -> tuple:
        """``(mean, variance)``: pooled over every voxel ("population"), or the averages of
        the per-batch means and variances ("batch_average")."""
        if statistics == "population":
            return self.mean, self.variance
        return self.batch_mean_sum / self.batches, self.batch_var_sum / self.batches


def _reduction_axes(layer, rank: int) -> list:
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    channel_axes = {a % rank for a in axis}
    return [i for i in range(rank) if i not in channel_axes]


def _broadcast_shape(layer, rank: int) -> list:
    axes = _reduction_axes(layer, rank)
    return [1 if i in axes else -1 for i in range(rank)]


def _normalise(layer, inputs, mean, variance):
    """What ``BatchNormalization.call`` computes, for given statistics (float32 inside)."""
    x = ops.cast(inputs, "float32")
    shape = _broadcast_shape(layer, len(x.shape))
    mean = ops.reshape(ops.cast(mean, "float32"), shape)
    variance = ops.reshape(ops.cast(variance, "float32"), shape)
    out = (x - mean) * ops.rsqrt(variance + layer.epsilon)
    if layer.scale:
        out = out * ops.reshape(ops.cast(layer.gamma, "float32"), shape)
    if layer.center:
        out = out + ops.reshape(ops.cast(layer.beta, "float32"), shape)
    return ops.cast(out, layer.compute_dtype)


@contextlib.contextmanager
def _patched(layers: list, make_call: Callable) -> Iterator[None]:
    """Temporarily replace each layer's ``call`` by ``make_call(layer)`` (eager use only)."""
    for layer in layers:
        layer.call = make_call(layer)
    try:
        yield
    finally:
        for layer in layers:
            # Removing the instance attribute restores the class's own method.
            del layer.call


@contextlib.contextmanager
def batch_statistics(model: keras.layers.Layer) -> Iterator[None]:
    """Within the block, every BatchNormalization of ``model`` normalises with the
    statistics of the batch it receives, also in inference mode; nothing is updated.

    For comparing with population statistics (e.g. in tests). Call the model eagerly inside
    the block (``model(x, training=False)``): a function Keras compiled before (``predict``)
    would not see the change, and one compiled inside would keep it.
    """
    def make_call(layer):
        def call(inputs, training=None, mask=None):
            mean, variance = ops.moments(ops.cast(inputs, "float32"),
                                         axes=_reduction_axes(layer, len(inputs.shape)))
            return _normalise(layer, inputs, mean, variance)
        return call

    with _patched(batchnorm_layers(model, trainable_only=False), make_call):
        yield


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate_batchnorm` did.

    Attributes:
        layers: number of BatchNormalization layers recalibrated.
        batches: batches per pass.
        voxels: positions (batch × spatial) averaged over, per pass.
        passes: forward passes made.
        seconds: wall time.
    """

    layers: int
    batches: int
    voxels: int
    passes: int
    seconds: float


def _iterate(batches: Batches) -> Iterable:
    source = batches() if callable(batches) and not hasattr(batches, "__iter__") else batches
    if isinstance(source, keras.utils.PyDataset):
        return (source[i] for i in range(len(source)))
    return source


def _image_of(element: Any):
    if isinstance(element, dict):
        return element["image"] if "image" in element else next(iter(element.values()))
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def _compile(fn: Callable) -> Callable:
    """The backend's compiler for a pure function of tensors (eager on other backends).

    Compiled, a collecting forward pass costs what ``predict`` costs; eager, it measured 3x
    that at 48³ on the CPU (graph-level kernel fusion is lost op by op). XLA is not forced
    on TensorFlow: on the CPU it is ~10x slower there.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # only reached on the TensorFlow backend

        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax  # only reached on the JAX backend

        return jax.jit(fn)
    return fn


def _collector(model, layers: list, batch_stats: bool) -> Callable:
    """``image -> [(count, mean, variance) of each layer's input]``, compiled once per model.

    The model runs through ``stateless_call`` with its current variable values as arguments,
    so the compiled function never holds stale weights or statistics; BatchNormalization
    calls are patched only while it is traced.
    """
    cache = model.__dict__.setdefault("_tf_explog_bn_collectors", {})
    key = (batch_stats, tuple(id(layer) for layer in layers))
    if key not in cache:
        index = {id(layer): i for i, layer in enumerate(layers)}

        def forward(trainable, non_trainable, image):
            found = [None] * len(layers)

            def make_call(layer):
                def call(inputs, training=None, mask=None):
                    axes = _reduction_axes(layer, len(inputs.shape))
                    mean, variance = ops.moments(ops.cast(inputs, "float32"), axes=axes)
                    count = ops.cast(ops.prod(ops.take(ops.shape(inputs), axes)), "float32")
                    found[index[id(layer)]] = (count, mean, variance)
                    if batch_stats:
                        return _normalise(layer, inputs, mean, variance)
                    return _normalise(layer, inputs, layer.moving_mean,
                                      layer.moving_variance)
                return call

            with _patched(layers, make_call):
                model.stateless_call(trainable, non_trainable, image, training=False)
            zero = ops.zeros((), "float32")
            return [f if f is not None else (zero, zero, zero) for f in found]

        cache[key] = _compile(forward)
    compiled = cache[key]

    def collect(image):
        # Values, not variables: the compiled function is traced once per input shape.
        out = compiled([ops.convert_to_tensor(v.value) for v in model.trainable_variables],
                       [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables],
                       image)
        return [(int(ops.convert_to_numpy(c)), m, v) for c, m, v in out]

    return collect


def recalibrate_batchnorm(
    model: keras.Model,
    batches: Batches,
    *,
    passes: int = 1,
    max_batches: Optional[int] = None,
    statistics: str = "population",
) -> RecalibrationReport:
    """Set every trainable BatchNormalization's moving statistics to population statistics.

    Runs the model eagerly with ``training=False`` (input noise and dropout off) on each
    batch, records the mean and variance of each BatchNormalization input per channel, and
    assigns their population values over all batches (see the module docstring for the
    formula and the meaning of ``passes``). The model's weights are not changed otherwise.

    Args:
        model: a built Keras model.
        batches: an iterable of images ``[B, D, H, W, C]`` or of ``(image, labels)`` tuples
            (NumPy, tensors, a ``tf.data.Dataset``, a ``keras.utils.PyDataset``), or a
            function returning one. It is iterated ``passes`` times, so give something that
            can be iterated again (a list, a dataset, a function) when ``passes > 1``. Use
            clean batches: no augmentation.
        passes: forward passes (≥ 1): 1 normalises with batch statistics during collection,
            each further pass refines with the previous pass's statistics.
        max_batches: stop each pass after this many batches.
        statistics: "population" — mean and variance pooled over every voxel of every batch
            (right when each training batch was a whole volume: the pooled statistics are
            what a training batch saw); "batch_average" — the average of the per-batch means
            and variances (for batch-1 patch training: each patch was normalised by its own
            statistics, whose variance leaves out the spread of the patch means, so the
            pooled variance is too large for every patch).

    Returns:
        A :class:`RecalibrationReport`.

    Raises:
        ValueError: ``passes`` or ``max_batches`` below 1, no batches, or non-finite
            statistics (the model produces NaN/Inf on these batches).
    """
    if statistics not in ("population", "batch_average"):
        raise InputError(f"recalibrate_batchnorm: statistics must be 'population' or "
                         f"'batch_average', got {statistics!r}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise InputError(f"recalibrate_batchnorm: passes must be an integer >= 1, got {passes!r}")
    if max_batches is not None and (isinstance(max_batches, bool)
                                    or not isinstance(max_batches, int) or max_batches < 1):
        raise InputError(f"recalibrate_batchnorm: max_batches must be an integer >= 1 or None, "
                         f"got {max_batches!r}")
    layers = batchnorm_layers(model)
    start = time.perf_counter()
    if not layers:
        return RecalibrationReport(0, 0, 0, 0, 0.0)
    n_batches = voxels = 0
    for pass_index in range(passes):
        collect = _collector(model, layers, batch_stats=pass_index == 0)
        moments = [_Moments() for _ in layers]
        n_batches = voxels = 0
        for element in _iterate(batches):
            if max_batches is not None and n_batches >= max_batches:
                break
            image = ops.convert_to_tensor(_image_of(element))
            for m, (count, mean, variance) in zip(moments, collect(image)):
                m.add(count, ops.convert_to_numpy(mean), ops.convert_to_numpy(variance))
            n_batches += 1
            voxels += int(np.prod(tuple(image.shape)[:-1]))
        if n_batches == 0:
            raise InputError("recalibrate_batchnorm: the batches are empty (nothing to "
                             "estimate the statistics from)")
        for layer, m in zip(layers, moments):
            if m.n == 0:  # not on the path of the model's outputs
                continue
            mean, variance = m.estimate(statistics)
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
                raise InputError(
                    f"recalibrate_batchnorm: layer {layer.path!r} received non-finite "
                    "activations; the model produces NaN/Inf on these batches")
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(variance.astype(np.float32))
    return RecalibrationReport(len(layers), n_batches, voxels, passes,
                               time.perf_counter() - start)


class BatchNormRecalibration(keras.callbacks.Callback):
    """Recalibrates BatchNormalization statistics at the end of epochs and of training.

    Put it first among the callbacks: at ``on_epoch_end`` it runs before the ones that
    validate, checkpoint or log, so they all see the model as it will be used. Pass the
    validation data to :class:`tf_explog.callbacks.InferenceValidation` (after this one)
    rather than to ``fit(validation_data=...)``: Keras validates *before* epoch-end callbacks.

    Args:
        batches: clean batches, see :func:`recalibrate_batchnorm` (re-iterable).
        every: recalibrate every this many epochs (and always at the end of training).
        passes, max_batches, statistics: see :func:`recalibrate_batchnorm`.
        verbose: print one line per recalibration.
    """

    def __init__(self, batches: Batches, every: int = 1, passes: int = 1,
                 max_batches: Optional[int] = None, verbose: bool = False,
                 statistics: str = "population") -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"BatchNormRecalibration: every must be an integer >= 1, "
                             f"got {every!r}")
        self.batches = batches
        self.every = every
        self.passes = passes
        self.statistics = statistics
        self.max_batches = max_batches
        self.verbose = verbose
        self.reports: list = []
        self._stale = False  # weights changed since the last recalibration

    def _run(self) -> None:
        report = recalibrate_batchnorm(self.model, self.batches, passes=self.passes,
                                       max_batches=self.max_batches,
                                       statistics=self.statistics)
        self._stale = False
        self.reports.append(report)
        if self.verbose:
            print(f"[tf_explog] BatchNorm recalibrated: {report.layers} layers, "
                  f"{report.batches} batches, {report.seconds:.1f} s", flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._stale = True

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self._run()
            if logs is not None:
                logs["time_recalibration"] = self.reports[-1].seconds

    def on_train_end(self, logs=None):
        if self._stale:
            self._run()
