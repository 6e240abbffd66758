"""The serving clients: gRPC against the exported SavedModel, served by an in-process gRPC
server that implements TF Serving's PredictionService (real channels, real message limits),
and the REST request helpers."""

import json
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tf_explog.export import export_saved_model
from tf_explog.models import build_model
from tf_explog.serving import (
    make_predict_request,
    parse_predict_response,
    predict_grpc,
    predict_request_json,
    predict_url,
)

CLASSES = 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An exported model, and a local server answering Predict with its signatures."""
    root = tmp_path_factory.mktemp("serving")
    model = build_model(num_classes=CLASSES, filters=(4, 4, 4, 4, 4),
                        encoder_depths=(1,) * 5, decoder_depths=(1,) * 4, seed=0)
    version = export_saved_model(model, root, "tiny")
    loaded = tf.saved_model.load(str(version))

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            fn = loaded.signatures[request.model_spec.signature_name or "serving_default"]
            out = fn(image=tf.constant(tf.make_ndarray(request.inputs["image"])))
            wanted = list(request.output_filter) or list(out)
            response = predict_pb2.PredictResponse()
            for name in wanted:
                response.outputs[name].CopyFrom(tf.make_tensor_proto(out[name].numpy()))
            return response

    limit = 1 << 30  # TF Serving accepts up to 2 GiB; gRPC's own default is 4 MB
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[
        ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", loaded
    server.stop(None)


def test_grpc_labels_match_the_saved_model(served):
    target, loaded = served
    image = np.random.default_rng(0).normal(size=(21, 18, 17)).astype(np.float32)
    out = predict_grpc(image, "tiny", target)
    assert set(out) == {"labels"}  # output_filter: labels only by default
    direct = loaded.signatures["serving_default"](image=tf.constant(image[None, ..., None]))
    np.testing.assert_array_equal(out["labels"], direct["labels"].numpy())
    assert out["labels"].shape == (1, 21, 18, 17) and out["labels"].dtype == np.int32


def test_labels_signature_and_response_sizes(served):
    target, loaded = served
    assert set(loaded.signatures) == {"serving_default", "labels"}
    assert set(loaded.signatures["labels"].structured_outputs) == {"labels"}
    image = np.zeros((32, 32, 32), np.float32)
    both = make_predict_request(image, "tiny", output_filter=None)
    labels_only = make_predict_request(image, "tiny", signature="labels")
    full = parse_predict_response(prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(target)).Predict(both))
    assert full["probabilities"].shape == (1, 32, 32, 32, CLASSES)
    np.testing.assert_allclose(full["probabilities"].sum(-1), 1.0, rtol=1e-5)
    assert labels_only.model_spec.signature_name == "labels"
    assert predict_request_json(image, signature="labels").startswith(
        '{"signature_name":"labels"')


def test_the_4mb_grpc_default_is_raised_for_volumes(served):
    """48³ with probabilities is 9 MB of response: gRPC's default client refuses it, the
    helper's limits let it through."""
    target, _ = served
    image = np.zeros((48, 48, 48), np.float32)
    request = make_predict_request(image, "tiny", output_filter=None)
    with grpc.insecure_channel(target) as channel:  # gRPC defaults: 4 MB receive
        with pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    out = predict_grpc(image, "tiny", target, output_filter=None)
    assert out["probabilities"].nbytes > 4 << 20


# ------------------------------------------------------------------------------- REST


def test_predict_request_json_hand_worked():
    body = json.loads(predict_request_json(np.array([[[[1.5], [2]]]])))
    assert body == {"signature_name": "serving_default",
                    "instances": [{"image": [[[[1.5], [2.0]]]]}]}
    batch = np.arange(2 * 1 * 1 * 2 * 1, dtype=np.int16).reshape(2, 1, 1, 2, 1)
    body = json.loads(predict_request_json(batch, signature="other"))
    assert body["signature_name"] == "other"
    assert body["instances"] == [{"image": [[[[0.0], [1.0]]]]}, {"image": [[[[2.0], [3.0]]]]}]
    # [D, H, W] is one channel.
    assert json.loads(predict_request_json(np.zeros((1, 1, 2))))["instances"] == [
        {"image": [[[[0.0], [0.0]]]]}
    ]


def test_predict_request_json_bad_input():
    with pytest.raises(ValueError, match="image: expected"):
        predict_request_json(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        predict_request_json(np.array([[[np.nan]]]))
    with pytest.raises(ValueError, match="real numbers"):
        predict_request_json(np.array([[["a"]]]))
    with pytest.raises(ValueError, match="signature"):
        predict_request_json(np.zeros((1, 1, 1)), signature="")


def test_predict_url():
    assert predict_url("tiny") == "http://localhost:8501/v1/models/tiny:predict"
    assert predict_url("tiny", "srv", 9000, version=2) == \
        "http://srv:9000/v1/models/tiny/versions/2:predict"
