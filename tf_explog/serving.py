"""Clients for a model exported by `tf_explog.export` and served by TF Serving.

gRPC (port 8500) is the efficient path for volumes: tensors travel as binary protos. Two
limits matter at this size:

- gRPC's default message limit is 4 MB; a 128³ float32 request is 8 MB and the full answer
  (labels int32 + 20-class probabilities float32) 176 MB. :func:`predict_grpc` raises the
  client's limits (``max_message_bytes``), and asks only for ``labels`` by default
  (``output_filter``): 8 MB at 128³. TF Serving itself accepts messages up to 2 GiB.
- The SavedModel also has a ``labels`` signature with only that output, for REST clients
  (REST has no ``output_filter``): ``{"signature_name": "labels", "instances": [...]}``
  (see `tf_explog.export.predict_request_json`), answered at port 8501.

Needs ``tensorflow-serving-api`` (``pip install tf-explog[serving]``), imported only when a
function here is called.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from tf_explog.errors import InputError

__all__ = ["make_predict_request", "parse_predict_response", "predict_grpc",
           "DEFAULT_MAX_MESSAGE_BYTES"]

#: Client-side gRPC message limit used by :func:`predict_grpc` (gRPC's own default: 4 MB).
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


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


def make_predict_request(image, model_name: str, *, signature: str = "serving_default",
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
                 signature: str = "serving_default",
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
