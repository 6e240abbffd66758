"""Sliding windows blended on the device equal today's NumPy blending on the host.

``predict_volume(blend="host")`` copies each window's output to NumPy and blends there (the
reference; itself checked against a float64 formula in test_inference.py); the device path
runs every TTA pass and window in one compiled program. Labels must be identical and
probabilities within 1e-5, on odd shapes (padding at the end, and before the volume for
flipped passes), with TTA, with batches of windows whose last one is padded, on TensorFlow
here and on JAX in a subprocess with TensorFlow unimportable.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tf_explog.callbacks import eager_predict, validate_volumes
from tf_explog.inference import InferenceError, predict_volume
from tf_explog.losses import ExpLogLoss
from tf_explog.models import build_model

TINY = dict(filters=(4, 4, 4, 4, 4), encoder_depths=(1,) * 5, decoder_depths=(1,) * 4)

# (shape, window, tta, window_batch): odd sizes on every axis, windows narrower than the
# volume on some axes and clamped to it on others, every flip subset kind.
CASES = [
    ((37, 29, 45), (16, 16, 32), False, 1),
    ((37, 29, 45), (16, 16, 32), True, 3),
    ((21, 40, 17), 16, (0, 2), 2),
    ((33, 19, 26), (32, 16, 16), (1,), 4),
]


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(1)
    return build_model((None, None, None, 1), num_classes=3, seed=0, **TINY)


def _image(shape, seed):
    return np.random.default_rng(seed).normal(size=tuple(shape) + (1,)).astype(np.float32)


@pytest.mark.parametrize("shape, window, tta, window_batch", CASES)
def test_device_blending_equals_host_blending(unet, shape, window, tta, window_batch):
    image = _image(shape, sum(shape))
    kw = dict(window=window, overlap=0.5, tta=tta, window_batch=window_batch)
    host = predict_volume(unet, image, blend="host", **kw)
    device = predict_volume(unet, image, blend="device", **kw)
    labels = predict_volume(unet, image, output="labels", **kw)
    assert device.shape == host.shape == shape + (3,) and device.dtype == np.float32
    np.testing.assert_allclose(device, host, atol=1e-5, rtol=0)
    assert labels.dtype == np.int32 and labels.shape == shape
    np.testing.assert_array_equal(labels, np.argmax(host, axis=-1))


def test_device_blending_sees_new_weights(unet):
    """The compiled program takes the weights as arguments: after an update it uses them."""
    model = build_model((None, None, None, 1), num_classes=3, seed=3, **TINY)
    image = _image((20, 35, 18), 7)
    before = predict_volume(model, image, window=16, tta=(0,))
    for variable in model.trainable_variables:
        variable.assign(variable.value * 1.5)
    after = predict_volume(model, image, window=16, tta=(0,))
    host = predict_volume(model, image, window=16, tta=(0,), blend="host")
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, host, atol=1e-5, rtol=0)


@pytest.mark.parametrize("accumulate, max_error, mean_error, margin", [
    ("int16", 2e-3, 2e-4, 4e-3),  # measured 1.3e-3 / 6e-5 on both backends
    ("float16", 2e-2, 1e-3, 3e-2),  # measured 1.4e-2 / 3e-4
])
def test_half_memory_accumulation_is_close(unet, accumulate, max_error, mean_error, margin):
    image = _image((37, 29, 45), 5)
    kw = dict(window=16, overlap=0.5, tta=True)
    host = predict_volume(unet, image, blend="host", **kw)
    half = predict_volume(unet, image, accumulate=accumulate, **kw)
    error = np.abs(half - host)
    assert error.max() < max_error and error.mean() < mean_error, (error.max(), error.mean())
    top2 = np.sort(host, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > margin  # voxels where no two classes are that close
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.argmax(half, -1)[clear], np.argmax(host, -1)[clear])


def test_int16_refuses_overlaps_that_could_overflow(unet):
    image = _image((64, 64, 64), 6)
    # Steps of 1.6 voxels: 31 windows per axis, up to 11 over a voxel, 11³ × 8 passes.
    with pytest.raises(InferenceError, match="accumulate: 'int16' cannot sum the 10648 window"):
        predict_volume(unet, image, window=16, overlap=0.9, tta=True, accumulate="int16")


def test_tensor_output_stays_a_backend_tensor(unet):
    image = _image((20, 18, 30), 2)
    tensor = predict_volume(unet, image, window=16, output="tensor")
    assert not isinstance(tensor, np.ndarray) and keras.ops.is_tensor(tensor)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tensor),
                               predict_volume(unet, image, window=16, blend="host"), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"blend": "gpu"}, "blend: expected 'device' or 'host'"),
    ({"output": "logits"}, "output: expected"),
    ({"accumulate": "bfloat16"}, "accumulate: expected 'float32', 'float16' or 'int16'"),
    ({"blend": "host", "output": "tensor"}, "blend: 'host' gives NumPy float32 only"),
    ({"blend": "host", "accumulate": "float16"}, "blend: 'host' gives NumPy float32 only"),
    ({"blend": "device", "predict_fn": lambda x: x}, "predict_fn: .*blend='host'"),
])
def test_bad_blending_options(unet, kwargs, match):
    with pytest.raises(InferenceError, match=match):
        predict_volume(unet, np.zeros((16, 16, 16, 1), np.float32), **kwargs)


def test_validation_on_the_device_equals_validation_on_the_host(unet):
    rng = np.random.default_rng(8)
    volumes = [(_image(shape, i), rng.integers(0, 3, shape))
               for i, shape in enumerate([(24, 19, 30), (20, 33, 17)])]
    loss = ExpLogLoss()
    kw = dict(window=(16, 16, 16), tta=(2,), loss=loss)
    device = validate_volumes(unet, volumes, 3, **kw)
    host = validate_volumes(unet, volumes, 3, predict=eager_predict(unet), **kw)
    assert device["dice"] == host["dice"] and device["dice_per_label"] == host["dice_per_label"]
    assert device["loss"] == pytest.approx(host["loss"], abs=1e-5)
    assert device["volumes"] == 2


# JAX, TensorFlow unimportable: the same comparison, results as JSON on the last line.
JAX_SCRIPT = """
import sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTensorFlow())
import json
import keras
import numpy as np
from tf_explog.inference import predict_volume
from tf_explog.models import build_model
keras.utils.set_random_seed(1)
model = build_model((None, None, None, 1), num_classes=3, seed=0, filters=(4,) * 5,
                    encoder_depths=(1,) * 5, decoder_depths=(1,) * 4)
rows = []
for shape, window, tta, batch in [((37, 29, 45), (16, 16, 32), True, 3),
                                  ((21, 40, 17), 16, (0, 2), 2)]:
    image = np.random.default_rng(sum(shape)).normal(size=shape + (1,)).astype("float32")
    kw = dict(window=window, tta=tta, window_batch=batch)
    host = predict_volume(model, image, blend="host", **kw)
    device = predict_volume(model, image, **kw)
    labels = predict_volume(model, image, output="labels", **kw)
    rows.append({"max_diff": float(np.abs(device - host).max()),
                 "labels_equal": bool((labels == host.argmax(-1)).all()),
                 "shape": list(device.shape)})
for variable in model.trainable_variables:  # jax.jit must not have kept the old weights
    variable.assign(variable.value * 1.5)
image = np.random.default_rng(0).normal(size=(20, 35, 18, 1)).astype("float32")
rows.append({"max_diff": float(np.abs(predict_volume(model, image, window=16)
                                      - predict_volume(model, image, window=16,
                                                       blend="host")).max()),
             "labels_equal": True, "shape": [20, 35, 18, 3]})
print(json.dumps({"backend": keras.backend.backend(), "rows": rows,
                  "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.slow
def test_device_blending_on_jax_without_tensorflow():
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["backend"] == "jax" and not out["tensorflow"]
    assert [row["shape"] for row in out["rows"]] == [[37, 29, 45, 3], [21, 40, 17, 3],
                                                     [20, 35, 18, 3]]
    for row in out["rows"]:
        assert row["max_diff"] < 1e-5 and row["labels_equal"], row


def test_one_program_serves_every_volume_shape_on_tensorflow(unet):
    """TensorFlow takes the geometry as tensors: new volume shapes reuse the program."""
    model = build_model((None, None, None, 1), num_classes=3, seed=4, **TINY)
    for i, shape in enumerate([(37, 29, 45), (20, 35, 18), (33, 19, 26)]):
        image = _image(shape, 20 + i)
        np.testing.assert_allclose(predict_volume(model, image, window=16, tta=(1,)),
                                   predict_volume(model, image, window=16, tta=(1,),
                                                  blend="host"), atol=1e-5, rtol=0)
    programs = model.__dict__["_tf_explog_sliding_window"]
    assert len(programs) == (1 if keras.backend.backend() == "tensorflow" else 3)


def test_predict_files_and_the_command_line_take_the_accumulator(tmp_path, unet):
    import nibabel as nib

    from tf_explog.cli import build_parser
    from tf_explog.inference import predict_files

    args = build_parser().parse_args(["predict", "--model", "m", "--input", "i", "--output",
                                      "o", "--accumulate", "int16"])
    assert args.accumulate == "int16"
    image = _image((20, 18, 22), 9)[..., 0]
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "a.nii.gz"))
    written = {}
    for accumulate in ("float32", "int16"):
        path = predict_files(unet, tmp_path / "a.nii.gz", tmp_path / accumulate,
                             progress=False, accumulate=accumulate)[0]
        written[accumulate] = np.asarray(nib.load(str(path)).dataobj)
    # Whole-volume prediction (one window): the fixed point rounds each probability once.
    assert (written["int16"] == written["float32"]).mean() > 0.999
    with pytest.raises(InferenceError, match="accumulate: expected"):
        predict_files(unet, tmp_path / "a.nii.gz", tmp_path / "x", progress=False,
                      accumulate="int8")
    assert not (tmp_path / "x").exists()  # refused before anything was written
