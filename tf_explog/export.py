"""SavedModel export for TensorFlow Serving.

:func:`export_saved_model` writes a trained segmentation model (a run directory, a ``.keras``
file or a ``keras.Model``) in the layout TF Serving watches, ``BASE/NAME/VERSION/``, with one
signature, ``serving_default``:

- input ``image``: float32 ``[batch, D, H, W, channels]``; batch and spatial sizes dynamic,
  ``channels`` fixed (the training channel count);
- output ``labels``: int32 ``[batch, D, H, W]``, the argmax, mapped back to the original label
  values when the training preprocessor had a ``label_map``;
- output ``probabilities``: float32 ``[batch, D, H, W, K]``, the softmax of the
  ``"segmentation"`` head (auxiliary heads are not exposed).

Inside the graph: a channel-count assertion and a rank check, the training preprocessor's
percentile clipping and intensity normalisation ("zscore" over the whole volume,
"zscore_nonzero" over its non-zero voxels, or none; per volume and channel, statistics in
float64 as :class:`tf_explog.data.preprocess.Preprocessor` computes them), padding at the end
of each spatial axis to a multiple of 16 (the network pools 4 times) and cropping back.

Not in the graph: reorientation and resampling. Clients send volumes already in canonical RAS
orientation at the training grid (spacing, cube padding, resize): ``assets/metadata.json`` says
which, with the label names, the preprocessor, the package version and the training config's
hash. Padding added in the graph has the raw value ``preprocessor.pad_value`` and is
normalised with the statistics of the voxels sent, which exclude it.

Serve it with TF Serving's Docker image (REST on port 8501)::

    docker run -p 8501:8501 -v $PWD/saved_models/NAME:/models/NAME -e MODEL_NAME=NAME \\
        tensorflow/serving
    curl -d @request.json http://localhost:8501/v1/models/NAME:predict

where ``request.json`` is :func:`predict_request_json`'s output (row format:
``{"signature_name": "serving_default", "instances": [{"image": [...]}]}``; the response is
``{"predictions": [{"labels": [...], "probabilities": [...]}]}``, one entry per volume).

This module needs TensorFlow (SavedModel is TensorFlow's format).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf
from tf_explog.errors import InputError
from tf_explog.files import remove_stale_temporaries
from tf_explog.geometry import spatial_divisor
from tf_explog.labels import SEGMENTATION
from tf_explog.serving import LABELS_SIGNATURE, SIGNATURE, check_model_name, check_version

__all__ = [
    "export_saved_model",
    "normalize_graph",
    "read_metadata",
    "ExportError",
    "SIGNATURE",
    "LABELS_SIGNATURE",
    "METADATA_FILE",
]

METADATA_FILE = "metadata.json"
METADATA_FORMAT = 1
ORIENTATION = "RAS"

_EPS_STD = 1e-8  # as Preprocessor: a flat channel is centred, not scaled
_UNSET = object()

PathLike = Union[str, os.PathLike]


class ExportError(InputError):
    """A model, run directory or export option is unusable; the message names it."""


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def export_saved_model(
    model_or_run_dir: Union[keras.Model, PathLike],
    base_dir: PathLike = "saved_models",
    name: Optional[str] = None,
    version: Optional[int] = None,
    *,
    checkpoint: str = "best",
    preprocessor: Any = None,
    normalization: Any = _UNSET,
    label_names: Optional[Sequence[str]] = None,
    pad_multiple: Optional[int] = None,
) -> Path:
    """Export a segmentation model as a TF Serving SavedModel, ``base_dir/name/version/``.

    The SavedModel is written to a hidden temporary directory beside the version directory
    (TF Serving ignores non-numeric names) and renamed into place, so a watching server never
    sees a partial export. An existing version is never overwritten.

    Args:
        model_or_run_dir: a run directory (``run.json`` + checkpoints, see
            :class:`tf_explog.runs.Run`), a ``.keras`` file, or a ``keras.Model``
            whose input is ``[batch, None, None, None, C]``.
        base_dir: the model base path TF Serving is pointed at (parent of ``name``).
        name: model name (the ``MODEL_NAME`` of TF Serving); default: the run's config name,
            the ``.keras`` file's stem or the Keras model's name.
        version: positive integer version; default: one more than the largest existing one
            (1 for a new model).
        checkpoint: for run directories, "best" (``run.json`` "best_checkpoint") or "final"
            ("final_model").
        preprocessor: a :class:`~tf_explog.data.preprocess.Preprocessor` or its dict; default:
            the run's (``run.json`` "preprocessor"), else ``Preprocessor()`` (z-score).
        normalization: overrides the preprocessor's: "zscore", "zscore_nonzero" or None.
        label_names: one name per class; default: the run's, else ``"label_0"``, ... .
        pad_multiple: spatial sizes are padded to a multiple of this in the graph; default:
            the product of the model's pooling/stride factors (16 for the paper network).

    Returns:
        The version directory (``base_dir/name/version``).

    Raises:
        FileNotFoundError: a missing run directory, ``run.json`` or checkpoint.
        FileExistsError: ``version`` was given and already exists.
        ExportError: an unreadable model, inconsistent run metadata or a bad option.
    """
    source = _resolve_source(model_or_run_dir, checkpoint)
    model = source["model"]
    channels, num_classes = _model_io(model, source["what"])
    from tf_explog.models import non_finite_weights

    bad = non_finite_weights(model)
    if bad:
        raise ExportError(f"{source['what']}: {len(bad)} weight tensor(s) hold NaN/Inf "
                          f"(first: {bad[0]}); a broken model is not exported")

    pre = _resolve_preprocessor(preprocessor, source["info"].get("preprocessor"), normalization)
    names = _resolve_label_names(label_names, source["info"].get("label_names"), num_classes,
                                 source["what"])
    run_channels = source["info"].get("num_channels")
    if run_channels is not None and int(run_channels) != channels:
        raise ExportError(
            f"{source['what']}: run.json num_channels={run_channels} but the model takes "
            f"{channels} input channel(s)"
        )
    label_values = _label_values(pre.label_map, num_classes, source["what"])
    multiple = spatial_divisor(model) if pad_multiple is None else _check_multiple(pad_multiple)

    name = source["default_name"] if name is None else name
    try:
        check_model_name(name)
    except InputError as err:
        raise ExportError(str(err)) from None
    if version is not None:
        try:
            version = check_version(version)
        except InputError as err:
            raise ExportError(str(err)) from None
    model_dir = Path(base_dir) / name
    if version is not None and (model_dir / str(version)).exists():
        raise FileExistsError(
            f"{model_dir / str(version)}: version {version} of model {name!r} already exists; "
            "exported versions are never overwritten (omit version to use the next one)"
        )

    metadata = _metadata(
        source=source, name=name, channels=channels, num_classes=num_classes, pre=pre,
        label_names=names, label_values=label_values, multiple=multiple,
    )
    module = _ServingModule(model, channels=channels, pre=pre, label_values=label_values,
                            multiple=multiple)

    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(model_dir)  # left by an export that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{os.getpid()}-", dir=model_dir))
    try:
        with tempfile.TemporaryDirectory(prefix="tf_explog_meta_") as meta_dir:
            meta_path = Path(meta_dir) / METADATA_FILE
            meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")
            # A tracked Asset is copied into <export>/assets/ by tf.saved_model.save.
            module.metadata = tf.saved_model.Asset(str(meta_path))
            tf.saved_model.save(
                module, str(tmp), signatures={
                    SIGNATURE: module.serve.get_concrete_function(),
                    LABELS_SIGNATURE: module.serve_labels.get_concrete_function()})
        # mkdtemp makes a private (0700) directory; a server running as another user must
        # be able to read the version directory.
        os.chmod(tmp, 0o755)
        return _move_into_place(tmp, model_dir, version)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_metadata(export_dir: PathLike) -> dict:
    """The ``assets/metadata.json`` of an exported version directory.

    Raises:
        FileNotFoundError: no metadata file in ``export_dir/assets``.
    """
    path = Path(export_dir) / "assets" / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no export metadata (is {export_dir} an exported version directory?)"
        )
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# The served graph
# ----------------------------------------------------------------------------------------------


class _ServingModule(tf.Module):
    """Holds the model's variables, the metadata asset and the ``serving_default`` function."""

    def __init__(self, model: keras.Model, *, channels: int, pre,
                 label_values: Optional[list], multiple: int) -> None:
        super().__init__(name="tf_explog_serving")
        normalization = pre.normalization
        clip = None if pre.clip_percentiles is None else tuple(pre.clip_percentiles)
        pad_value = float(pre.pad_value)
        table = None if label_values is None else np.asarray(label_values, np.int32)

        def serve(image):
            shape = tf.shape(image)
            # Loaded signatures (and TF Serving) do not check the declared shape: check here.
            check = tf.debugging.Assert(
                tf.equal(shape[-1], channels),
                [f"image: expected float32 [batch, D, H, W, C] with C = {channels} "
                 "channel(s); got shape", shape],
                name="check_channels",
            )
            with tf.control_dependencies([check]):
                image = tf.identity(image)
            # tf.rank of a static-rank placeholder is folded away; EnsureShape checks at run time.
            image = tf.ensure_shape(image, [None, None, None, None, channels], name="image")
            size = tf.shape(image)[1:4]
            padded = (size + multiple - 1) // multiple * multiple
            pad = tf.stack([tf.zeros([3], tf.int32), padded - size], axis=1)
            pad = tf.concat([tf.zeros([1, 2], tf.int32), pad, tf.zeros([1, 2], tf.int32)], 0)

            x = tf.cast(image, tf.float64)
            inside = tf.ones_like(x, dtype=tf.bool)
            if multiple > 1:
                x = tf.pad(x, pad, constant_values=pad_value)
                inside = tf.pad(inside, pad, constant_values=False)
            x = normalize_graph(x, inside, normalization, clip)

            # tf.pad with dynamic amounts forgets the channel count; without it Keras' conv
            # falls back to an XLA-compiled kernel, which TF Serving builds may lack.
            x = tf.ensure_shape(tf.cast(x, tf.float32), [None, None, None, None, channels])
            out = model(x, training=False)
            if isinstance(out, Mapping):
                out = out[SEGMENTATION]
            elif isinstance(out, (list, tuple)):
                out = out[0]
            probs = tf.cast(out, tf.float32)[:, : size[0], : size[1], : size[2], :]
            labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
            if table is not None:
                labels = tf.gather(tf.constant(table), labels)
            return {"labels": labels, "probabilities": probs}

        spec = tf.TensorSpec([None, None, None, None, channels], tf.float32, name="image")
        self.serve = tf.function(serve, input_signature=[spec])
        # Labels only: a REST answer at 128³ is 8 MB of ids instead of 176 MB with the
        # probabilities (REST has no output_filter; gRPC clients may use either).
        self.serve_labels = tf.function(lambda image: {"labels": serve(image)["labels"]},
                                        input_signature=[spec])
        # Track the tf.Variables the traced graph captures (as keras.export.ExportArchive
        # does), not the Keras model or its keras.Variable wrappers: the SavedModel then holds
        # no Keras objects, and TF1-style loaders (TF Serving, saved_model_cli run) find every
        # captured variable in the graph.
        self.graph_variables = list(self.serve.get_concrete_function().variables)


def normalize_graph(x: tf.Tensor, inside: tf.Tensor, normalization: Optional[str],
                    clip_percentiles: Optional[Sequence[float]] = None) -> tf.Tensor:
    """In-graph intensity normalisation per volume and channel, as ``Preprocessor`` does it.

    With ``mask`` = all voxels ("zscore", None) or the non-zero voxels ("zscore_nonzero") and
    ``stats`` = ``mask & inside``: optionally clip ``mask`` voxels to the ``clip_percentiles``
    of the ``stats`` voxels (linear interpolation, as ``np.percentile``), then
    ``x[mask] = (x[mask] - mean) / std`` with the population mean and std of the (clipped)
    ``stats`` voxels; ``std <= 1e-8`` counts as 1; a channel with no ``stats`` voxel is left
    unchanged.

    Args:
        x: float ``[B, D, H, W, C]`` (float64 recommended: the statistics of large volumes).
        inside: bool, same shape: the voxels sent by the client (False on in-graph padding).
        normalization: "zscore", "zscore_nonzero" or None.
        clip_percentiles: ``(low, high)`` in [0, 100], or None.

    Returns:
        The normalised ``x``, same dtype.
    """
    if normalization not in (None, "zscore", "zscore_nonzero"):
        raise InputError(
            f"normalization: expected 'zscore', 'zscore_nonzero' or None, got {normalization!r}"
        )
    if normalization is None and clip_percentiles is None:
        return x
    mask = tf.not_equal(x, 0) if normalization == "zscore_nonzero" else tf.ones_like(inside)
    stats = tf.logical_and(mask, inside)
    axes = [1, 2, 3]
    count = tf.reduce_sum(tf.cast(stats, x.dtype), axis=axes, keepdims=True)
    present = count > 0
    if clip_percentiles is not None:
        lo, hi = _percentiles(x, stats, clip_percentiles)
        clipped = tf.minimum(tf.maximum(x, lo), hi)
        x = tf.where(tf.logical_and(mask, present), clipped, x)
    if normalization is None:
        return x
    n = tf.maximum(count, 1)
    zero = tf.zeros_like(x)
    mean = tf.reduce_sum(tf.where(stats, x, zero), axis=axes, keepdims=True) / n
    # Two-pass variance, as np.std.
    var = tf.reduce_sum(tf.where(stats, tf.square(x - mean), zero), axis=axes, keepdims=True) / n
    std = tf.sqrt(var)
    std = tf.where(tf.logical_and(present, std > _EPS_STD), std, tf.ones_like(std))
    mean = tf.where(present, mean, tf.zeros_like(mean))
    return tf.where(mask, (x - mean) / std, x)


def _percentiles(x: tf.Tensor, stats: tf.Tensor, q: Sequence[float]):
    """Per (volume, channel) percentiles of the ``stats`` voxels, ``[B, 1, 1, 1, C]`` each."""
    rows = tf.transpose(x, [0, 4, 1, 2, 3])
    keep = tf.transpose(stats, [0, 4, 1, 2, 3])
    b, c = tf.shape(rows)[0], tf.shape(rows)[1]
    rows = tf.reshape(rows, [b, c, -1])
    keep = tf.reshape(keep, [b, c, -1])
    # Excluded voxels sort last, so the first n entries are the sorted statistics voxels.
    big = tf.fill(tf.shape(rows), tf.constant(np.inf, rows.dtype))
    ordered = tf.sort(tf.where(keep, rows, big), axis=-1)
    n = tf.reduce_sum(tf.cast(keep, tf.int32), axis=-1, keepdims=True)  # [B, C, 1]
    last = tf.maximum(n - 1, 0)
    out = []
    for p in q:
        pos = tf.cast(last, rows.dtype) * (float(p) / 100.0)
        below = tf.cast(tf.floor(pos), tf.int32)
        above = tf.minimum(below + 1, last)
        frac = pos - tf.cast(below, rows.dtype)
        v0 = tf.gather(ordered, below, batch_dims=2)
        v1 = tf.gather(ordered, above, batch_dims=2)
        # Channels with no voxel give inf here; the caller leaves them untouched.
        value = tf.where(frac > 0, v0 + (v1 - v0) * frac, v0)
        out.append(tf.reshape(tf.transpose(value, [0, 2, 1]), [b, 1, 1, 1, c]))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# Sources, options, metadata
# ----------------------------------------------------------------------------------------------


def _resolve_source(obj: Any, checkpoint: str) -> dict:
    """Model, run info, description and default name from a model, ``.keras`` file or run dir."""
    if isinstance(obj, keras.Model):
        return {"model": obj, "info": {}, "what": f"Keras model {obj.name!r}",
                "default_name": obj.name, "kind": "keras_model", "path": None}
    if not isinstance(obj, (str, os.PathLike)):
        raise ExportError(
            "model_or_run_dir: expected a keras.Model, a .keras file or a run directory, "
            f"got {type(obj).__name__}"
        )
    path = Path(obj)
    if path.is_file() or path.suffix == ".keras":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        return {"model": _load_model(path), "info": {}, "what": str(path),
                "default_name": path.stem, "kind": "keras_file", "path": str(path.resolve())}

    from tf_explog.runs import Run

    run = Run.open(path)  # RunNotFoundError (a FileNotFoundError) for a missing dir/run.json
    if run.failed:
        raise ExportError(f"{path}: this run failed ({run.failed_file}); export one of "
                          "its checkpoints explicitly if you are sure it is sound")
    if checkpoint not in ("best", "final"):
        raise ExportError(f"checkpoint: expected 'best' or 'final', got {checkpoint!r}")
    model_path = run.checkpoint(checkpoint)
    info = run.info
    config = info.get("config") if isinstance(info.get("config"), Mapping) else {}
    default_name = config.get("name") or path.resolve().parent.name
    return {"model": _load_model(model_path), "info": info, "what": str(path),
            "default_name": default_name, "kind": "run_dir", "path": str(path.resolve()),
            "checkpoint": str(model_path.relative_to(run.path))}


def _load_model(path: Path) -> keras.Model:
    """The inference loader (custom objects registered), its errors as `ExportError`."""
    from tf_explog.errors import InferenceError, ModelNotFoundError
    from tf_explog.inference import load_keras_model

    from tf_explog.folding import fold_batchnorm

    try:
        # Served with BatchNorm folded into the convolutions (same outputs, less work).
        return fold_batchnorm(load_keras_model(path))
    except ModelNotFoundError:
        raise
    except InferenceError as err:
        raise ExportError(str(err)) from err


def _model_io(model: keras.Model, what: str) -> tuple:
    """``(channels, num_classes)`` of a single-input segmentation model with dynamic sizes."""
    if len(model.inputs) != 1:
        raise ExportError(f"{what}: expected one input (the image), got {len(model.inputs)}")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 5 or shape[-1] is None:
        raise ExportError(
            f"{what}: expected an input [batch, D, H, W, C] with a known C, got {shape}"
        )
    if any(s is not None for s in shape[1:4]):
        raise ExportError(
            f"{what}: input spatial sizes must be dynamic (None) for serving, got {shape}; "
            "rebuild it with input_shape=(None, None, None, C) and copy the weights"
        )
    outputs = model.output
    if isinstance(outputs, Mapping):
        if SEGMENTATION not in outputs:
            raise ExportError(f"{what}: no output named {SEGMENTATION!r} (has {sorted(outputs)})")
        out = outputs[SEGMENTATION]
    elif isinstance(outputs, (list, tuple)):
        out = outputs[0]
    else:
        out = outputs
    out_shape = tuple(out.shape)
    if len(out_shape) != 5 or out_shape[-1] is None:
        raise ExportError(
            f"{what}: expected a segmentation output [batch, D, H, W, K], got {out_shape}"
        )
    return int(shape[-1]), int(out_shape[-1])


def _resolve_preprocessor(preprocessor: Any, from_run: Any, normalization: Any):
    from tf_explog.data.preprocess import Preprocessor

    src = preprocessor if preprocessor is not None else from_run
    try:
        if src is None:
            pre = Preprocessor()
        elif isinstance(src, Preprocessor):
            pre = src
        else:
            pre = Preprocessor.from_dict(src)
        if normalization is not _UNSET:
            pre = dataclasses.replace(pre, normalization=normalization)
    except ValueError as err:
        where = "preprocessor" if preprocessor is not None else "run.json 'preprocessor'"
        raise ExportError(f"{where}: {err}") from None
    return pre


def _resolve_label_names(given, from_run, num_classes: int, what: str) -> list:
    names = given if given is not None else from_run
    if names is None:
        return [f"label_{i}" for i in range(num_classes)]
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise ExportError(f"label_names: expected a list of strings, got {names!r}")
    names = list(names)
    if len(names) != num_classes:
        raise ExportError(
            f"{what}: {len(names)} label names {names} for a model with {num_classes} classes"
        )
    return names


def _label_values(label_map: Optional[Mapping], num_classes: int, what: str) -> Optional[list]:
    """Original label value of each class id (``labels`` output), or None without a map."""
    if label_map is None:
        return None
    from tf_explog.data.nifti import LabelMap

    lm = LabelMap.coerce(label_map)
    # Same rule as invert_label_map: an id maps back to the first value it lists; 0 -> 0.
    table = {0: 0}
    table.update({k: v[0] for k, v in lm.mapping.items()})
    missing = [i for i in range(num_classes) if i not in table]
    if missing:
        raise ExportError(
            f"{what}: the label map {lm.to_dict()} has no original value for class id(s) "
            f"{missing} of a {num_classes}-class model"
        )
    return [int(table[i]) for i in range(num_classes)]


def _check_multiple(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ExportError(f"pad_multiple: expected a positive integer, got {value!r}")
    return int(value)


def _existing_versions(model_dir: Path) -> list:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def _move_into_place(tmp: Path, model_dir: Path, version: Optional[int]) -> Path:
    """Rename the finished export to its version directory (the next free one when None)."""
    while True:
        v = version if version is not None else max(_existing_versions(model_dir), default=0) + 1
        final = model_dir / str(v)
        # os.rename would silently replace an *empty* directory: check first.
        if final.exists():
            if version is not None:
                raise FileExistsError(
                    f"{final}: version {v} already exists; exported versions are never overwritten"
                )
            continue  # another export took it meanwhile: take the next one
        try:
            os.rename(tmp, final)
        except OSError:
            if version is not None or not final.exists():
                raise
            continue
        return final


def _metadata(*, source: dict, name: str, channels: int, num_classes: int, pre,
              label_names: list, label_values: Optional[list], multiple: int) -> dict:
    import tf_explog

    info = source["info"]
    spacing = pre.target_spacing
    if spacing == "min":
        spacing_note = "isotropic, at the smallest voxel size of each input volume"
    elif spacing is None:
        spacing_note = "the input's own spacing (not resampled in training)"
    else:
        spacing = [float(s) for s in spacing]
        spacing_note = "mm per canonical (RAS) axis"
    return {
        "format": METADATA_FORMAT,
        "model_name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tf_explog_version": tf_explog.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "config_fingerprint": info.get("fingerprint"),
        "seed": info.get("seed"),
        "source": {k: source.get(k) for k in ("kind", "path", "checkpoint") if source.get(k)},
        "labels_only_signature": LABELS_SIGNATURE,
        "signature": {
            "name": SIGNATURE,
            "inputs": {"image": {"dtype": "float32", "shape": [-1, -1, -1, -1, channels]}},
            "outputs": {
                "labels": {"dtype": "int32", "shape": [-1, -1, -1, -1]},
                "probabilities": {"dtype": "float32", "shape": [-1, -1, -1, -1, num_classes]},
            },
        },
        "input_channels": channels,
        "num_classes": num_classes,
        "label_names": label_names,
        # Value written in `labels` for each class id (original values when a label map was used).
        "label_values": label_values if label_values is not None else list(range(num_classes)),
        "orientation": ORIENTATION,
        "spacing": spacing,
        "spacing_note": spacing_note,
        "client_preprocessing": {
            "note": "not in the graph: reorient to RAS and apply these geometry steps before "
                    "sending (tf_explog.data.preprocess.Preprocessor.forward does them)",
            "orientation": ORIENTATION,
            "target_spacing": spacing,
            "crop_foreground": pre.crop_foreground,
            "crop_threshold": pre.crop_threshold,
            "crop_method": pre.crop_method,
            "crop_margin_mm": pre.crop_margin,
            "pad_to_cube": pre.pad_to_cube,
            "resize_shape": None if pre.resize_shape is None else list(pre.resize_shape),
            "target_shape": None if pre.target_shape is None else list(pre.target_shape),
            "image_order": pre.image_order,
        },
        "in_graph": {
            "normalization": pre.normalization,
            "clip_percentiles": (None if pre.clip_percentiles is None
                                 else list(pre.clip_percentiles)),
            "statistics": "per volume and channel, over the voxels sent (non-zero ones for "
                          "zscore_nonzero), float64",
            "pad_multiple": multiple,
            "pad_value": float(pre.pad_value),
            "padding": "at the end of each spatial axis, cropped from the outputs",
        },
        "normalization": pre.normalization,
        "preprocessor": pre.to_dict(),
    }
