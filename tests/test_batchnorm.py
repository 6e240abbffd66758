"""BatchNorm recalibration: population statistics checked against NumPy, and what they fix."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import (bn_batches, bn_reference_statistics, layer_weights, np_bn, np_conv1,
                     toy_bn_model)
from tf_explog.batchnorm import (BatchNormRecalibration, _Moments, batch_statistics,
                                 batchnorm_layers, recalibrate_batchnorm)

REPO = Path(__file__).resolve().parents[1]
@pytest.mark.parametrize("passes", [1, 2])
def test_statistics_match_a_numpy_reference(passes):
    rng = np.random.default_rng(0)
    batches = bn_batches(rng, [(2, 4), (1, 6), (3, 3)])
    model = toy_bn_model()
    report = recalibrate_batchnorm(model, batches, passes=passes)
    expected = bn_reference_statistics(model, batches, passes)
    for name, (mean, var) in zip(("bn1", "bn2"), expected):
        got = layer_weights(model, name)
        np.testing.assert_allclose(got[2], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[3], var, rtol=1e-4, atol=1e-5)
    assert report.layers == 2 and report.batches == 3 and report.passes == passes
    assert report.voxels == 2 * 64 + 216 + 3 * 27


def test_noise_and_dropout_are_off_while_collecting():
    rng = np.random.default_rng(1)
    batches = bn_batches(rng, [(2, 4), (2, 4)])
    noisy = toy_bn_model(noise=1.0, dropout=0.5)
    recalibrate_batchnorm(noisy, batches)
    (mean, var), _ = bn_reference_statistics(noisy, batches, 1)
    got = layer_weights(noisy, "bn1")
    # With the noise (std 1) on, the variance of bn1's input would be larger.
    np.testing.assert_allclose(got[3], var, rtol=1e-4)
    np.testing.assert_allclose(got[2], mean, rtol=1e-4, atol=1e-5)


def test_moments_merge_equals_direct_float64():
    rng = np.random.default_rng(2)
    groups = [rng.normal(1e3, s, (n, 4)) for n, s in ((5, 1.0), (50, 3.0), (1, 0.0), (7, 2.0))]
    m = _Moments()
    for g in groups:
        m.add(len(g), g.mean(0), g.var(0))
    everything = np.concatenate(groups)
    np.testing.assert_allclose(m.mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.variance, everything.var(0), rtol=1e-9)


def test_batch_statistics_context_normalises_with_the_batch():
    rng = np.random.default_rng(3)
    x = bn_batches(rng, [(1, 5)])[0]
    model = toy_bn_model()
    c1 = layer_weights(model, "c1")
    g1, b1 = layer_weights(model, "bn1")[:2]
    a1 = np_conv1(x.astype(np.float64), c1).reshape(-1, 3)
    h = np.maximum(np_bn(a1, a1.mean(0), a1.var(0), g1, b1), 0)
    a2 = np_conv1(h, layer_weights(model, "c2"))
    g2, b2 = layer_weights(model, "bn2")[:2]
    expected = np_bn(a2, a2.mean(0), a2.var(0), g2, b2).reshape(x.shape[:-1] + (2,))
    with batch_statistics(model):
        got = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # ...and nothing is left patched or updated afterwards.
    after = keras.ops.convert_to_numpy(model(x, training=False))
    assert not np.allclose(after, expected, atol=1e-2)
    np.testing.assert_allclose(layer_weights(model, "bn1")[2], 5.0)


def test_frozen_layers_are_left_alone():
    model = toy_bn_model()
    model.get_layer("bn1").trainable = False
    recalibrate_batchnorm(model, bn_batches(np.random.default_rng(4), [(1, 4)]))
    np.testing.assert_allclose(layer_weights(model, "bn1")[2], 5.0)
    assert not np.allclose(layer_weights(model, "bn2")[2], 5.0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_low_precision_policies(policy):
    rng = np.random.default_rng(5)
    batches = bn_batches(rng, [(1, 4), (1, 4)])
    reference = toy_bn_model()
    recalibrate_batchnorm(reference, batches)
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = toy_bn_model()
        recalibrate_batchnorm(model, batches)
    finally:
        keras.config.set_dtype_policy(old)
    for name in ("bn1", "bn2"):
        got, want = layer_weights(model, name), layer_weights(reference, name)
        assert np.all(np.isfinite(got[2])) and np.all(np.isfinite(got[3]))
        # bf16 keeps ~3 significant digits of the activations
        np.testing.assert_allclose(got[3], want[3], rtol=0.05)
        np.testing.assert_allclose(got[2], want[2], rtol=0.05, atol=0.05)


def test_bad_arguments_and_empty_batches():
    model = toy_bn_model()
    with pytest.raises(ValueError, match="passes"):
        recalibrate_batchnorm(model, [], passes=0)
    with pytest.raises(ValueError, match="empty"):
        recalibrate_batchnorm(model, [])
    nan = np.full((1, 3, 3, 3, 2), np.nan, "float32")
    with pytest.raises(ValueError, match="non-finite"):
        recalibrate_batchnorm(model, [nan])
    with pytest.raises(ValueError, match="every"):
        BatchNormRecalibration([], every=0)


def test_paper_network_with_aux_heads_and_a_function_of_batches():
    from tf_explog.models import build_model

    model = build_model(num_classes=3, filters=(4, 4, 4, 4, 4), encoder_depths=(1,) * 5,
                        decoder_depths=(1,) * 4, aux_outputs=2, seed=0)
    rng = np.random.default_rng(6)
    volumes = [rng.normal(size=(1, 16, 16, 16, 1)).astype("float32") for _ in range(2)]
    report = recalibrate_batchnorm(model, lambda: iter(volumes), passes=2)
    assert report.layers == len(batchnorm_layers(model)) == 2 * 5 + 2 * 4
    for bn in batchnorm_layers(model):
        var = np.asarray(bn.moving_variance)
        assert np.all(np.isfinite(var)) and not np.allclose(var, 1.0)


# ----------------------------------------------------------------------------------------
# What it fixes: a short fit with the paper's input noise sigma = 1
# ----------------------------------------------------------------------------------------


def two_blob_volumes(n, size=32, seed=0):
    """z-scored images of a big and a small blob (labels 1, 2) on background."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).transpose(1, 2, 3, 0)
    out = []
    for _ in range(n):
        labels = np.zeros((size,) * 3, np.int32)
        labels[np.linalg.norm(grid - rng.uniform(12, 20, 3), axis=-1) < 8] = 1
        labels[np.linalg.norm(grid - rng.uniform(6, 26, 3), axis=-1) < 3.5] = 2
        image = np.array([0.0, 1.0, 2.0])[labels] + rng.normal(0, 0.3, labels.shape)
        image = ((image - image.mean()) / image.std()).astype("float32")[..., None]
        out.append((image, labels))
    return out


def inference_dice(model, volumes, batch_stats=False):
    from tf_explog.callbacks import dice_from_counts

    tp, ps, ts = np.zeros(3), np.zeros(3), np.zeros(3)
    for image, labels in volumes:
        if batch_stats:
            with batch_statistics(model):
                probs = model(image[None], training=False)
        else:
            probs = model(image[None], training=False)
        pred = np.argmax(keras.ops.convert_to_numpy(probs)[0], -1)
        tp += np.bincount(labels[labels == pred], minlength=3)
        ps += np.bincount(pred.ravel(), minlength=3)
        ts += np.bincount(labels.ravel(), minlength=3)
    return dice_from_counts(tp, ps, ts)[0]


@pytest.fixture(scope="module")
def noisy_fit():
    """The paper network (narrow), noise sigma 1, momentum 0.99, 8 epochs of 6 volumes."""
    from tf_explog.losses import ExpLogLoss
    from tf_explog.models import build_model

    volumes = two_blob_volumes(6)
    x = np.stack([v[0] for v in volumes])
    y = np.stack([v[1] for v in volumes])

    def fit(callbacks):
        keras.utils.set_random_seed(0)
        model = build_model(num_classes=3, filters=(8, 8, 16, 16, 16),
                            encoder_depths=(1,) * 5, decoder_depths=(1,) * 4, noise_std=1.0,
                            dropout=0.0, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(5e-3), loss=ExpLogLoss())
        model.fit(x, y, batch_size=1, epochs=8, verbose=0, shuffle=False,
                  callbacks=callbacks(volumes))
        return model

    plain = fit(lambda v: [])
    recalibrated = fit(lambda v: [BatchNormRecalibration([img[None] for img, _ in v])])
    return volumes, plain, recalibrated


@pytest.mark.slow
def test_recalibrated_inference_matches_batch_statistics(noisy_fit):
    volumes, plain, recalibrated = noisy_fit
    batch = inference_dice(recalibrated, volumes, batch_stats=True)
    inference = inference_dice(recalibrated, volumes)
    ema = inference_dice(plain, volumes)
    print(f"batch-stats Dice {batch:.3f}, recalibrated {inference:.3f}, EMA {ema:.3f}")
    assert batch > 0.5, "the fit did not learn the blobs"
    assert abs(inference - batch) < 0.05
    # Without recalibration, Keras' moving averages are far off after 48 steps.
    assert inference - ema > 0.1


@pytest.mark.slow
def test_recalibration_on_the_jax_backend(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import numpy as np, keras
        from helpers import toy_bn_model, bn_batches, bn_reference_statistics, layer_weights
        from tf_explog.batchnorm import recalibrate_batchnorm
        assert keras.backend.backend() == "jax"
        batches = bn_batches(np.random.default_rng(0), [(2, 4), (1, 6)])
        model = toy_bn_model()
        recalibrate_batchnorm(model, batches, passes=2)
        expected = bn_reference_statistics(model, batches, 2)
        for name, (mean, var) in zip(("bn1", "bn2"), expected):
            np.testing.assert_allclose(layer_weights(model, name)[3], var, rtol=1e-4, atol=1e-5)
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        print("ok")
    """)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(REPO))
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _Block())
    """))
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{REPO}"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_batch_average_statistics_against_numpy():
    """One BatchNorm on the input: "population" pools every voxel, "batch_average" averages
    the per-batch means and variances (what batch-1 patch training normalised with)."""
    import keras

    from tf_explog.batchnorm import recalibrate_batchnorm

    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, size=(1, 4, 4, 4, 2)).astype("float32")
               for loc, scale in ((0.0, 1.0), (5.0, 2.0), (-3.0, 0.5))]
    inputs = keras.Input((4, 4, 4, 2))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    stacked = np.concatenate([b.reshape(-1, 2) for b in batches]).astype(np.float64)
    per_mean = np.array([b.reshape(-1, 2).astype(np.float64).mean(0) for b in batches])
    per_var = np.array([b.reshape(-1, 2).astype(np.float64).var(0) for b in batches])
    bn = model.layers[-1]
    recalibrate_batchnorm(model, batches)
    np.testing.assert_allclose(bn.moving_mean.numpy(), stacked.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), stacked.var(0), rtol=1e-5)
    recalibrate_batchnorm(model, batches, statistics="batch_average")
    np.testing.assert_allclose(bn.moving_mean.numpy(), per_mean.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), per_var.mean(0), rtol=1e-5)
    # the two differ by the spread of the batch means (here large)
    assert np.all(stacked.var(0) > per_var.mean(0) + 1.0)
    with pytest.raises(ValueError, match="statistics"):
        recalibrate_batchnorm(model, batches, statistics="median")
