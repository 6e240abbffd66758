"""Clients for a model exported by `tf_explog.export` and served by TF Serving, and the
serving conventions both sides share (signature names, model names, versions).

REST (port 8501): :func:`predict_request_json` builds the body, :func:`predict_url` the URL.

gRPC (port 8500) is the efficient path for volumes: tensors travel as binary protos. Two
limits matter at this size:

- gRPC's default message limit is 4 MB; a 128³ float32 request is 8 MB and the full answer
  (labels int32 + 20-class probabilities float32) 176 MB. :func:`predict_grpc` raises the
  client's limits (``max_message_bytes``), and asks only for ``labels`` by default
  (``output_filter``): 8 MB at 128³. TF Serving itself accepts messages up to 2 GiB.
- The SavedModel also has a ``labels`` signature with only that output, for REST clients
  (REST has no ``output_filter``): ``{"signature_name": "labels", "instances": [...]}``
  (see :func:`predict_request_json`), answered at port 8501.

The gRPC client needs ``tensorflow-serving-api`` (``pip install tf-explog[serving]``),
imported only when a gRPC function is called; the rest is NumPy only.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from tf_explog.errors import InputError

__all__ = ["make_predict_request", "parse_predict_response", "predict_grpc",
           "predict_request_json", "predict_url", "check_model_name", "check_version",
           "SIGNATURE", "LABELS_SIGNATURE", "DEFAULT_MAX_MESSAGE_BYTES"]

SIGNATURE = "serving_default"
#: A second signature with the ``labels`` output only (small answers, REST included).
LABELS_SIGNATURE = "labels"
# TF Serving puts the model name in URLs and only loads numeric version directories.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: Client-side gRPC message limit used by :func:`predict_grpc` (gRPC's own default: 4 MB).
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


def check_model_name(name: Any) -> str:
    """``name`` if TF Serving can serve a model under it (it goes into URLs)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(
            f"name: expected letters, digits, '.', '_' or '-' (not starting with '.', '_' or "
            f"'-'), got {name!r}"
        )
    return name


def check_version(version: Any) -> int:
    """``version`` as an int if it is a positive integer (TF Serving's version folders)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise InputError(f"version: expected a positive integer, got {version!r}")
    return int(version)


# ----------------------------------------------------------------------------------------------
# REST
# ----------------------------------------------------------------------------------------------


def predict_request_json(image: Any, signature: str = SIGNATURE) -> str:
    """The JSON body of a TF Serving REST predict request for an exported model.

    Row ("instances") format, one instance per volume::

        {"signature_name": "serving_default", "instances": [{"image": [[[[...]]]]}]}

    POST it to ``http://HOST:8501/v1/models/<name>:predict`` (see :func:`predict_url`); the
    answer is ``{"predictions": [{"labels": ..., "probabilities": ...}, ...]}``. Volumes must
    already be canonical (RAS) at the training grid (``assets/metadata.json``); normalisation
    happens in the served graph. Values are sent as float32.

    Args:
        image: ``[D, H, W]`` (one channel), ``[D, H, W, C]`` (one volume) or
            ``[B, D, H, W, C]`` (a batch of equally sized volumes), real numbers.
        signature: the signature name.

    Returns:
        The request body (compact JSON).

    Raises:
        ValueError: wrong rank, non-numeric or non-finite values, an empty signature name.
    """
    if not isinstance(signature, str) or not signature:
        raise InputError(f"signature: expected a non-empty string, got {signature!r}")
    arr = np.asarray(image)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer)
                                     or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"image: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., np.newaxis]
    if arr.ndim == 4:
        arr = arr[np.newaxis]
    if arr.ndim != 5 or 0 in arr.shape:
        raise InputError(
            "image: expected [D, H, W], [D, H, W, C] or [B, D, H, W, C] with no empty axis, "
            f"got shape {np.shape(image)}"
        )
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError("image: contains NaN or Inf, which JSON cannot carry")
    body = {"signature_name": signature, "instances": [{"image": vol.tolist()} for vol in arr]}
    return json.dumps(body, separators=(",", ":"))


def predict_url(name: str, host: str = "localhost", port: int = 8501,
                version: Optional[int] = None) -> str:
    """TF Serving's REST predict URL: ``http://HOST:PORT/v1/models/NAME[/versions/V]:predict``."""
    check_model_name(name)
    path = f"/v1/models/{name}"
    if version is not None:
        path += f"/versions/{check_version(version)}"
    return f"http://{host}:{int(port)}{path}:predict"


# ----------------------------------------------------------------------------------------------
# gRPC
# ----------------------------------------------------------------------------------------------


def _apis():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as err:
        raise InputError("tensorflow-serving-api is not installed: pip install "
                         "'tf-explog[serving]' (or tensorflow-serving-api)") from err
    return predict_pb2, prediction_service_pb2_grpc


def _batch(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[..., np.newaxis]
    if arr.ndim == 4:
        arr = arr[np.newaxis]
    if arr.ndim != 5:
        raise InputError(f"image: expected [D, H, W], [D, H, W, C] or [B, D, H, W, C], got "
                         f"shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"image: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError("image: contains NaN or Inf")
    return arr


def make_predict_request(image, model_name: str, *, signature: str = SIGNATURE,
                         output_filter: Optional[Sequence[str]] = ("labels",),
                         version: Optional[int] = None):
    """A ``PredictRequest`` for one volume (or a batch of equally sized ones).

    Args:
        image: canonical (RAS) volume at the training grid, ``[D, H, W(, C)]`` or
            ``[B, D, H, W, C]``; normalisation and padding happen in the served graph.
        model_name: TF Serving's model name.
        signature: "serving_default" (labels and probabilities) or "labels".
        output_filter: outputs to return (None: all of the signature's).
        version: a model version (None: the latest).
    """
    import tensorflow as tf

    predict_pb2, _ = _apis()
    if not model_name:
        raise InputError("model_name: expected the served model's name")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(_batch(image)))
    if output_filter:
        request.output_filter.extend(list(output_filter))
    return request


def parse_predict_response(response) -> dict:
    """``{output name: NumPy array}`` from a ``PredictResponse``."""
    import tensorflow as tf

    return {name: tf.make_ndarray(tensor) for name, tensor in response.outputs.items()}


def predict_grpc(image, model_name: str, target: str = "localhost:8500", *,
                 signature: str = SIGNATURE,
                 output_filter: Optional[Sequence[str]] = ("labels",),
                 version: Optional[int] = None, timeout: float = 300.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel_options: Iterable = ()) -> Mapping[str, np.ndarray]:
    """Segment a volume with a TF Serving model over gRPC.

    Example::

        from tf_explog.serving import predict_grpc
        labels = predict_grpc(volume, "demo", "localhost:8500")["labels"][0]

    Args:
        image, model_name, signature, output_filter, version: see
            :func:`make_predict_request`.
        target: ``host:port`` of TF Serving's gRPC port.
        timeout: seconds.
        max_message_bytes: the client's send and receive limit.
        channel_options: more gRPC channel options.

    Returns:
        ``{"labels": int32 [B, D, H, W], ...}`` (the outputs asked for).
    """
    import grpc

    _, service = _apis()
    request = make_predict_request(image, model_name, signature=signature,
                                   output_filter=output_filter, version=version)
    options = [("grpc.max_send_message_length", int(max_message_bytes)),
               ("grpc.max_receive_message_length", int(max_message_bytes)),
               *channel_options]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = service.PredictionServiceStub(channel)
        return parse_predict_response(stub.Predict(request, timeout=timeout))
