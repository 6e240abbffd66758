"""BatchNorm folded into the convolutions: the formula against NumPy, folded and unfolded
models agree in inference mode (float32 and mixed precision), saving, and where it is used."""

import numpy as np
import pytest

from helpers import run_saving_test
from tf_explog.folding import fold_batchnorm, folded_conv_weights, is_folded
from tf_explog.layers import Block
from tf_explog.models import build_model

TINY = dict(filters=(8, 8, 16, 16, 16), encoder_depths=(1, 2, 1, 1, 1),
            decoder_depths=(1, 1, 2, 1))


def trained_like(model, seed=0):
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        path = w.path
        if "moving_mean" in path:
            w.assign(rng.normal(0, 0.5, w.shape))
        elif "moving_variance" in path:
            w.assign(rng.uniform(0.3, 3.0, w.shape))
        elif "gamma" in path:
            w.assign(rng.uniform(0.5, 1.5, w.shape))
        elif "beta" in path:
            w.assign(rng.normal(0, 0.3, w.shape))
    return model


def test_fold_formula_matches_conv_then_bn_by_hand():
    """A 1x1x1 conv is a matrix product: check W', b' on points against conv -> BN in NumPy."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(1, 1, 1, 3, 4))
    bias = rng.normal(size=4)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    mean, var, eps = rng.normal(size=4), rng.uniform(0.1, 2, 4), 1e-3
    x = rng.normal(size=(10, 3))
    conv = x @ kernel[0, 0, 0] + bias
    expected = gamma * (conv - mean) / np.sqrt(var + eps) + beta
    k, b = folded_conv_weights(kernel, bias, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(x @ k[0, 0, 0] + b, expected, rtol=1e-12, atol=1e-12)
    # no bias and no gamma/beta (scale=False, center=False)
    k, b = folded_conv_weights(kernel, None, None, None, mean, var, eps)
    np.testing.assert_allclose(x @ k[0, 0, 0] + b, (x @ kernel[0, 0, 0] - mean)
                               / np.sqrt(var + eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aux_outputs", [0, 2])
def test_folded_model_gives_the_same_inference_outputs(aux_outputs):
    model = trained_like(build_model(num_classes=5, aux_outputs=aux_outputs, seed=0, **TINY))
    folded = fold_batchnorm(model)
    assert is_folded(folded) and not is_folded(model)
    bn_params = sum(int(np.prod(w.shape)) for w in model.weights if "bn" in w.path)
    assert bn_params > 0 and not any("bn" in w.path for w in folded.weights)
    # the conv biases already exist (use_bias), so folding removes exactly the BN weights
    assert folded.count_params() == model.count_params() - bn_params
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 32, 1)).astype("float32")
    a, b = model(x, training=False), folded(x, training=False)
    if aux_outputs:
        assert set(a) == set(b)
        pairs = [(np.asarray(a[k]), np.asarray(b[k])) for k in a]
    else:
        pairs = [(np.asarray(a), np.asarray(b))]
    for ya, yb in pairs:
        np.testing.assert_allclose(yb, ya, atol=2e-5)
        assert (ya.argmax(-1) == yb.argmax(-1)).mean() > 0.999
    assert fold_batchnorm(folded) is folded  # folding twice changes nothing


MIXED = """
import json, sys
import numpy as np, keras
from tf_explog.folding import fold_batchnorm
from tf_explog.layers import Block
out = {}
for policy in ("mixed_float16", "mixed_bfloat16"):
    keras.config.set_dtype_policy(policy)
    model = build(keras.utils.set_random_seed(0))
    folded = fold_batchnorm(model)
    x = np.random.default_rng(3).normal(size=(1, 16, 16, 16, 1)).astype("float32")
    a = np.asarray(model(x, training=False), "float64")
    b = np.asarray(folded(x, training=False), "float64")
    out[policy] = {"max_diff": float(np.max(np.abs(a - b))), "finite": bool(np.isfinite(b).all()),
                   "head": folded.layers[-1].dtype_policy.name,
                   "blocks": sorted({l.dtype_policy.name for l in folded.layers
                                     if isinstance(l, Block)}),
                   "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_folding_under_mixed_precision_on_jax():
    """TensorFlow has no float16 MaxPool3D on a CPU, so this runs on JAX (as on the GPU)."""
    import inspect
    import json
    import os
    import subprocess
    import sys
    import textwrap

    helper = textwrap.dedent(inspect.getsource(trained_like))
    build = ("from tf_explog.models import build_model\n" + helper +
             "def build(_):\n    return trained_like(build_model(num_classes=4, seed=0, "
             "filters=(8, 8, 16), encoder_depths=(1, 2, 1), decoder_depths=(1, 1)))\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", build + MIXED], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for policy, tolerance in (("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)):
        row = out[policy]
        assert row["finite"] and row["head"] == "float32" and row["blocks"] == [policy], row
        assert row["max_diff"] < tolerance and row["argmax_agree"] > 0.99, (policy, row)


def test_folded_model_saves_and_loads(tmp_path):
    folded = fold_batchnorm(trained_like(build_model(num_classes=3, seed=0, **TINY)))
    x = np.random.default_rng(4).normal(size=(1, 16, 16, 16, 1)).astype("float32")
    again = run_saving_test(folded, x, tmp_path)
    assert is_folded(again)
