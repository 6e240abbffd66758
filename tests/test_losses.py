"""Tests of the exponential logarithmic loss family against an independent NumPy reference."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import run_saving_test
from tf_explog import losses

# ----------------------------------------------------------------------------------------
# Independent float64 reference (written from docs/paper.md §1, shares no code with the package)
# ----------------------------------------------------------------------------------------


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ref_terms(labels, probs, smooth=1.0):
    """Per-sample Dice per label [B, C] and -ln p_true per voxel [B, N], float64."""
    probs = probs.astype(np.float64)
    batch, classes = probs.shape[0], probs.shape[-1]
    p = probs.reshape(batch, -1, classes)
    lab = labels.reshape(batch, -1)
    t = np.eye(classes)[lab]
    dice = (2 * (t * p).sum(1) + smooth) / (t.sum(1) + p.sum(1) + smooth)
    p_true = np.take_along_axis(p, lab[..., None], axis=-1)[..., 0]
    return dice, -np.log(p_true), lab


def ref_explog(labels, probs, gd=0.3, gc=0.3, wd=0.8, wc=0.2, smooth=1.0, cw=None,
               include_background=True):
    dice, nlp, lab = ref_terms(labels, probs, smooth)
    classes = probs.shape[-1]
    w = np.ones(classes) if cw is None else np.asarray(cw, np.float64)
    per_label = (-np.log(dice)) ** gd
    if not include_background:
        per_label = per_label[:, 1:]
    l_dice = per_label.mean(1)
    l_cross = (w[lab] * nlp ** gc).mean(1)
    return float(np.mean(wd * l_dice + wc * l_cross))


def ref_linear_dice(labels, probs, smooth=1.0):
    dice, _, _ = ref_terms(labels, probs, smooth)
    return float(np.mean((1 - dice).mean(1)))


def ref_dice_ce(labels, probs, smooth=1e-5, wd=1.0, wce=1.0, focal_gamma=None, cw=None,
                include_background=False):
    """nnU-Net's Dice + CE (or, with ``focal_gamma``, Dice + focal), float64."""
    dice, nlp, lab = ref_terms(labels, probs, smooth)
    if not include_background:
        dice = dice[:, 1:]
    classes = probs.shape[-1]
    w = np.ones(classes) if cw is None else np.asarray(cw, np.float64)
    if focal_gamma is None:
        voxel = nlp
    else:
        voxel = (1.0 - np.exp(-nlp)) ** focal_gamma * nlp
    return float(np.mean(wd * (1 - dice).mean(1) + wce * (w[lab] * voxel).mean(1)))


def ref_gdl(labels, probs, smooth=1e-5):
    batch, classes = probs.shape[0], probs.shape[-1]
    p = probs.astype(np.float64).reshape(batch, -1, classes)
    t = np.eye(classes)[labels.reshape(batch, -1)]
    out = []
    for b in range(batch):
        vol = t[b].sum(0)
        w = np.zeros(classes)
        w[vol > 0] = 1.0 / vol[vol > 0] ** 2
        w[vol == 0] = w.max()
        num = 2 * (w * (t[b] * p[b]).sum(0)).sum()
        den = (w * (vol + p[b].sum(0))).sum()
        out.append(1 - (num + smooth) / (den + smooth))
    return float(np.mean(out))


def random_case(seed, classes, spatial, batch):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(batch, *spatial, classes))
    labels = rng.integers(0, classes, size=(batch, *spatial))
    probs = np_softmax(logits).astype(np.float32)
    return labels.astype(np.int32), probs, logits.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------

CASES = [
    # classes, spatial, batch, gamma, with class weights
    (2, (6, 5, 4), 1, 0.3, False),
    (2, (6, 5, 4), 3, 1.0, True),
    (5, (8, 8, 8), 1, 2.0, False),
    (5, (8, 8, 8), 3, 0.3, True),
    (20, (8, 6, 10), 1, 1.0, True),
    (20, (8, 6, 10), 3, 0.3, False),
    (20, (4, 4, 4), 3, 2.0, True),
]


@pytest.mark.parametrize("classes,spatial,batch,gamma,weighted", CASES)
def test_exp_log_matches_numpy_reference(classes, spatial, batch, gamma, weighted):
    labels, probs, _ = random_case(classes * 7 + batch, classes, spatial, batch)
    cw = list(np.linspace(0.5, 3.0, classes)) if weighted else None
    loss = losses.ExpLogLoss(gamma_dice=gamma, gamma_cross=gamma, class_weights=cw)
    got = float(loss(labels, probs))
    want = ref_explog(labels, probs, gd=gamma, gc=gamma, cw=cw)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("classes,spatial,batch,gamma,weighted", CASES[:4])
def test_single_term_losses_match_reference(classes, spatial, batch, gamma, weighted):
    labels, probs, _ = random_case(100 + classes, classes, spatial, batch)
    cw = list(np.linspace(1.0, 2.0, classes)) if weighted else None
    np.testing.assert_allclose(
        float(losses.LogDiceLoss(gamma=gamma)(labels, probs)),
        ref_explog(labels, probs, gd=gamma, wd=1.0, wc=0.0), rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.WeightedCrossEntropy(gamma=gamma, class_weights=cw)(labels, probs)),
        ref_explog(labels, probs, gc=gamma, wd=0.0, wc=1.0, cw=cw), rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.LinearDiceLoss()(labels, probs)), ref_linear_dice(labels, probs),
        rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.GeneralizedDiceLoss()(labels, probs)), ref_gdl(labels, probs),
        rtol=1e-5)


def test_include_background_false_drops_label_zero_from_dice_mean():
    labels, probs, _ = random_case(3, 4, (5, 5, 5), 2)
    got = float(losses.ExpLogLoss(include_background=False)(labels, probs))
    np.testing.assert_allclose(
        got, ref_explog(labels, probs, include_background=False), rtol=1e-5)


def test_generalized_dice_with_absent_label_uses_largest_finite_weight():
    labels, probs, _ = random_case(4, 3, (6, 6, 6), 1)
    labels[labels == 2] = 1  # label 2 absent
    np.testing.assert_allclose(
        float(losses.GeneralizedDiceLoss()(labels, probs)), ref_gdl(labels, probs),
        rtol=1e-5)


def test_hand_worked_case():
    # Four voxels, labels [0, 0, 1, 1], p(label 1) = [0.1, 0.2, 0.6, 0.9].
    # Dice_0 = (2(0.9+0.8)+1)/(2+2.2+1) = 4.4/5.2;  Dice_1 = (2(0.6+0.9)+1)/(2+1.8+1) = 4/4.8
    # gamma=1: L_dice = (ln(5.2/4.4) + ln(4.8/4))/2 = 0.1746878207
    #          L_cross = -(ln .9 + ln .8 + ln .6 + ln .9)/4 = 0.2361725516
    #          L_exp = 0.8 L_dice + 0.2 L_cross = 0.1869847669
    # gamma=0.3: L_dice = 0.5923680615, L_cross = 0.6183322614, L_exp = 0.5975609015
    # gamma=0.3, class weights (1, 3): L_cross = (0.105^.3 + 0.223^.3 + 3(0.511^.3 + 0.105^.3))/4
    #          = 1.2816268106
    p1 = np.array([0.1, 0.2, 0.6, 0.9], np.float32)
    probs = np.stack([1 - p1, p1], -1).reshape(1, 4, 1, 1, 2)
    labels = np.array([0, 0, 1, 1], np.int32).reshape(1, 4, 1, 1)
    one = losses.ExpLogLoss(gamma_dice=1, gamma_cross=1)
    np.testing.assert_allclose(float(one(labels, probs)), 0.186984766902641, rtol=1e-6)
    np.testing.assert_allclose(float(losses.ExpLogLoss()(labels, probs)),
                               0.5975609015165437, rtol=1e-6)
    np.testing.assert_allclose(float(losses.LogDiceLoss()(labels, probs)),
                               0.1746878207285604, rtol=1e-6)
    np.testing.assert_allclose(
        float(losses.WeightedCrossEntropy(gamma=0.3, class_weights=[1, 3])(labels, probs)),
        1.2816268105861892, rtol=1e-6)


def test_perfect_prediction_is_exactly_zero():
    labels = np.zeros((2, 8, 8, 8), np.int32)
    labels[:, 2:5, 2:5, 2:5] = 1
    labels[1, 6, 6, 6] = 2
    probs = np.eye(3, dtype=np.float32)[labels]
    assert float(losses.ExpLogLoss()(labels, probs)) == 0.0
    # from saturated logits: no visible floor either (< 1e-3 required, in fact ~0)
    assert float(losses.ExpLogLoss(from_logits=True)(labels, probs * 200 - 100)) < 1e-6


# ----------------------------------------------------------------------------------------
# Equivalent inputs
# ----------------------------------------------------------------------------------------


def test_sparse_onehot_and_logits_agree():
    labels, probs, logits = random_case(9, 5, (6, 7, 8), 2)
    loss = losses.ExpLogLoss(class_weights=[1, 2, 3, 4, 5])
    sparse = float(loss(labels, probs))
    sparse1 = float(loss(labels[..., None], probs))
    onehot = float(loss(np.eye(5, dtype=np.float32)[labels], probs))
    from_logits = float(losses.ExpLogLoss(class_weights=[1, 2, 3, 4, 5], from_logits=True)(
        labels, logits))
    np.testing.assert_allclose([sparse1, onehot, from_logits], sparse, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Numerics: finite values and gradients in degenerate cases, under every dtype policy
# ----------------------------------------------------------------------------------------


def degenerate_cases(shape=(1, 8, 8, 8), classes=4):
    base = np.zeros(shape, np.int32)
    base[:, 2:6, 2:6, 2:6] = 1
    base[:, 0:2, 0:2, 0:2] = 2  # label 3 absent everywhere
    perfect_logits = np.eye(classes, dtype=np.float32)[base] * 200 - 100
    wrong_logits = np.eye(classes, dtype=np.float32)[(base + 1) % classes] * 200 - 100
    background = np.zeros(shape, np.int32)
    return {
        "perfect": (base, perfect_logits),
        "saturated_wrong": (base, wrong_logits),
        "absent_label": (base, np.random.default_rng(0).normal(size=perfect_logits.shape)
                         .astype(np.float32)),
        "all_background": (background, np.eye(classes, dtype=np.float32)[background] * 200
                           - 100),
    }


@pytest.fixture
def policy(request):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(old)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"],
                         indirect=True)
@pytest.mark.parametrize("case", sorted(degenerate_cases()))
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_finite_value_and_gradient(policy, case, name):
    labels, logits = degenerate_cases()[case]
    compute = keras.DTypePolicy(policy).compute_dtype
    # gamma < 1 is where naive implementations produce NaN.
    kwargs = {"exp_log": {}, "log_dice": {"gamma": 0.3},
              "weighted_cross_entropy": {"gamma": 0.3}}.get(name, {})
    for from_logits in (True, False):
        z = tf.Variable(tf.cast(logits, compute))
        loss = losses.get(name, from_logits=from_logits, **kwargs)
        with tf.GradientTape() as tape:
            y_pred = z if from_logits else tf.nn.softmax(z, axis=-1)
            value = loss(labels, y_pred)
        grad = tape.gradient(value, z)
        assert value.dtype == tf.float32
        assert np.isfinite(float(value)), (name, case, from_logits)
        assert np.all(np.isfinite(tf.cast(grad, tf.float32).numpy())), (name, case, from_logits)
        if case == "perfect" and name != "generalized_dice":
            if from_logits:  # -ln p from log-softmax is exactly 0: no floor is added
                assert float(value) < 1e-3
            else:
                # A float32 softmax may give p = 1 - 1 ulp, and (-ln p)^0.3 turns 6e-8 into
                # 7e-3: compare with the float64 reference on the same probabilities.
                probs = tf.cast(y_pred, tf.float32).numpy()
                ref = {"exp_log": lambda: ref_explog(labels, probs),
                       "log_dice": lambda: ref_explog(labels, probs, gd=0.3, wd=1, wc=0),
                       "weighted_cross_entropy": lambda: ref_explog(labels, probs, gc=0.3,
                                                                    wd=0, wc=1),
                       "linear_dice": lambda: ref_linear_dice(labels, probs),
                       "dice_ce": lambda: ref_dice_ce(labels, probs),
                       "dice_focal": lambda: ref_dice_ce(labels, probs, focal_gamma=2.0),
                       }[name]()
                assert float(value) == pytest.approx(ref, rel=0.05, abs=1e-5)

    # gradient w.r.t. probabilities that are exactly one-hot / exactly zero
    probs = tf.Variable(tf.cast(tf.one_hot(labels, logits.shape[-1]), compute))
    loss = losses.get(name, **kwargs)
    with tf.GradientTape() as tape:
        value = loss(labels, probs)
    grad = tf.cast(tape.gradient(value, probs), tf.float32).numpy()
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("where", ["everywhere", "one_voxel"])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_non_finite_predictions_give_a_non_finite_loss(name, from_logits, where):
    # A broken network must not look perfect: NaN in, NaN out (an earlier version returned
    # 0 here, and a NaN training run logged loss 0.0).
    labels, logits = degenerate_cases()["perfect"]
    bad = logits.copy() if from_logits else np_softmax(logits).astype(np.float32)
    if where == "everywhere":
        bad[...] = np.nan
    else:
        bad[0, 3, 3, 3, :] = np.nan
    value = losses.get(name, from_logits=from_logits)(labels, bad)
    assert not np.isfinite(float(value))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.slow
def test_128_cube_twenty_labels_low_precision_input(policy):
    # 128^3 voxels x 20 labels: float16 sums would overflow (max 65504); losses compute in
    # float32 whatever the input dtype.
    compute = keras.DTypePolicy(policy).compute_dtype
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 20, size=(1, 128, 128, 128)).astype(np.int32)
    labels[labels == 19] = 0  # one absent label
    z = tf.Variable(tf.cast(rng.normal(size=(1, 128, 128, 128, 20)), compute))
    with tf.GradientTape() as tape:
        value = losses.ExpLogLoss(from_logits=True)(labels, z)
    grad = tape.gradient(value, z)
    assert np.isfinite(float(value))
    assert bool(tf.reduce_all(tf.math.is_finite(tf.cast(grad, tf.float32))))


# ----------------------------------------------------------------------------------------
# Class weights
# ----------------------------------------------------------------------------------------


def test_class_weights_from_frequencies():
    # w_k = sqrt(sum f / f_k): sum = 100 -> sqrt(100/90), sqrt(100/9), sqrt(100/1)
    np.testing.assert_allclose(losses.class_weights_from_frequencies([90, 9, 1]),
                               [1.0540925533894598, 3.3333333333333335, 10.0])
    # scale invariant: fractions give the same weights
    np.testing.assert_allclose(losses.class_weights_from_frequencies([0.9, 0.09, 0.01]),
                               [1.0540925533894598, 3.3333333333333335, 10.0])
    # a label of frequency 0 gets the largest weight of the present labels
    np.testing.assert_allclose(losses.class_weights_from_frequencies([75, 0, 25]),
                               [np.sqrt(100 / 75), 2.0, 2.0])


@pytest.mark.parametrize("freqs,match", [
    ([1, -1, 2], "frequencies"),
    ([0, 0], "all zero"),
    ([[1, 2]], "1-D"),
    ([1, float("nan")], "finite"),
])
def test_class_weights_from_frequencies_errors(freqs, match):
    with pytest.raises(ValueError, match=match):
        losses.class_weights_from_frequencies(freqs)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctor,match", [
    (lambda: losses.ExpLogLoss(gamma_dice=-0.3), "gamma_dice"),
    (lambda: losses.ExpLogLoss(gamma_cross=-1), "gamma_cross"),
    (lambda: losses.ExpLogLoss(w_dice=-0.8), "w_dice"),
    (lambda: losses.ExpLogLoss(w_cross=float("inf")), "w_cross"),
    (lambda: losses.ExpLogLoss(class_weights=[1, -2]), "class_weights"),
    (lambda: losses.ExpLogLoss(smooth=0), "smooth"),
    (lambda: losses.LogDiceLoss(gamma=-1), "gamma"),
    (lambda: losses.WeightedCrossEntropy(class_weights=[[1, 2]]), "class_weights"),
    (lambda: losses.GeneralizedDiceLoss(weight_type="cubic"), "weight_type"),
    (lambda: losses.get("focal"), "Unknown loss"),
])
def test_bad_arguments(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_class_weights_length_mismatch_names_both_sizes():
    labels, probs, _ = random_case(0, 3, (4, 4, 4), 1)
    with pytest.raises(ValueError, match=r"class_weights.*2 entries.*3 classes"):
        losses.ExpLogLoss(class_weights=[1, 2])(labels, probs)


@pytest.mark.parametrize("labels_shape", [(1, 4, 4, 5), (1, 4, 4, 4, 2), (4, 4, 4)])
def test_shape_mismatch_names_shapes(labels_shape):
    probs = np.full((1, 4, 4, 4, 3), 1 / 3, np.float32)
    labels = np.zeros(labels_shape, np.int32)
    with pytest.raises(ValueError, match=r"shapes do not match.*\(1, 4, 4, 4, 3\)"):
        losses.ExpLogLoss()(labels, probs)


# ----------------------------------------------------------------------------------------
# Keras integration
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_get_config_round_trip(name):
    kwargs = {"exp_log": dict(gamma_dice=0.5, gamma_cross=2.0, w_dice=0.7, w_cross=0.3,
                              class_weights=[1.0, 2.5], from_logits=True, smooth=2.0),
              "log_dice": dict(gamma=0.3, include_background=False),
              "weighted_cross_entropy": dict(gamma=0.3, class_weights=[1.0, 4.0]),
              "linear_dice": dict(smooth=0.5),
              "generalized_dice": dict(weight_type="simple"),
              "dice_ce": dict(w_dice=0.5, w_ce=2.0, smooth=1.0, class_weights=[1.0, 3.0]),
              "dice_focal": dict(gamma=0.5, w_focal=3.0, include_background=True)}[name]
    loss = losses.get(name, **kwargs)
    config = loss.get_config()
    json.dumps(config)
    for key, value in kwargs.items():
        assert config[key] == value
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == config


def tiny_model(classes=2):
    inputs = keras.Input((16, 16, 16, 1))
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv3D(classes, 1, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def two_label_volumes(n=4, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.indices((16, 16, 16)).transpose(1, 2, 3, 0)
    labels, images = [], []
    for _ in range(n):
        centre = rng.uniform(5, 11, size=3)
        lab = (np.linalg.norm(grid - centre, axis=-1) < 3.5).astype(np.int32)
        labels.append(lab)
        images.append((lab * 2.0 + rng.normal(scale=0.5, size=lab.shape))[..., None])
    return np.stack(images).astype(np.float32), np.stack(labels)


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    x, y = two_label_volumes()
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=losses.ExpLogLoss(class_weights=[1.0, 5.0]))
    history = model.fit(x, y, batch_size=2, epochs=30, verbose=0)
    losses_seen = history.history["loss"]
    assert losses_seen[-1] < 0.6 * losses_seen[0]


def test_model_with_loss_saves_and_loads_without_custom_objects(tmp_path):
    model = tiny_model(3)
    loss = losses.ExpLogLoss(class_weights=[1.0, 2.0, 3.0], gamma_dice=0.5)
    model.compile(optimizer="adam", loss=loss)
    x = two_label_volumes(n=1)[0]
    restored = run_saving_test(model, x, tmp_path, compile=True)
    assert isinstance(restored.loss, losses.ExpLogLoss)
    assert restored.loss.get_config() == loss.get_config()


# ----------------------------------------------------------------------------------------
# JAX backend
# ----------------------------------------------------------------------------------------

JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    from tf_explog import losses
    assert keras.backend.backend() == "jax", keras.backend.backend()
    data = np.load(sys.argv[1])
    out = {}
    for name in sorted(losses.LOSSES):
        for from_logits in (False, True):
            y_pred = data["logits"] if from_logits else data["probs"]
            out[f"{name}/{from_logits}"] = float(
                losses.get(name, from_logits=from_logits)(data["labels"], y_pred))
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_same_values_under_jax_backend_without_tensorflow(tmp_path):
    labels, probs, logits = random_case(5, 5, (6, 6, 6), 2)
    probs = tf.nn.softmax(logits).numpy()
    np.savez(tmp_path / "case.npz", labels=labels, probs=probs, logits=logits)
    script = tmp_path / "run_jax.py"
    script.write_text(JAX_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "case.npz")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jax_values = json.loads(result.stdout.strip().splitlines()[-1])
    assert jax_values.pop("tensorflow_imported") is False
    for key, value in jax_values.items():
        name, from_logits = key.split("/")
        y_pred = logits if from_logits == "True" else probs
        tf_value = float(losses.get(name, from_logits=from_logits == "True")(labels, y_pred))
        np.testing.assert_allclose(value, tf_value, rtol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------------------
# Soft targets for auxiliary heads (labels averaged over f^3 blocks)
# ----------------------------------------------------------------------------------------


def np_block_mean_one_hot(labels, classes, f):
    """[B, D, H, W] ids -> [B, D/f, H/f, W/f, C] mean one-hot of each f^3 block, float64."""
    b, d, h, w = labels.shape
    t = np.eye(classes)[labels]
    return t.reshape(b, d // f, f, h // f, f, w // f, f, classes).mean(axis=(2, 4, 6))


def ref_explog_soft(t, probs, gd=0.3, gc=0.3, wd=0.8, wc=0.2, smooth=1.0, cw=None):
    """The paper's formulas with soft targets t (float64): delta -> t in Dice, and the
    cross term as the expectation over each voxel's target distribution."""
    probs = probs.astype(np.float64)
    batch, classes = probs.shape[0], probs.shape[-1]
    p = probs.reshape(batch, -1, classes)
    t = t.reshape(batch, -1, classes)
    dice = (2 * (t * p).sum(1) + smooth) / (t.sum(1) + p.sum(1) + smooth)
    w = np.ones(classes) if cw is None else np.asarray(cw, np.float64)
    l_dice = ((-np.log(dice)) ** gd).mean(1)
    l_cross = (t * w * (-np.log(p)) ** gc).sum(-1).mean(1)
    return float(np.mean(wd * l_dice + wc * l_cross))


@pytest.mark.parametrize("factor", [2, 4])
def test_soft_target_loss_matches_numpy(factor):
    rng = np.random.default_rng(7)
    classes, size = 4, 16
    labels = rng.integers(0, 3, size=(2, size, size, size)).astype(np.int32)
    labels[0, 5, 6, 7] = 3  # a one-voxel structure
    coarse = size // factor
    probs = np_softmax(rng.normal(scale=2.0, size=(2, coarse, coarse, coarse, classes)))
    probs = probs.astype(np.float32)
    cw = [0.5, 1.0, 2.0, 8.0]
    t = np_block_mean_one_hot(labels, classes, factor)
    value = losses.ExpLogLoss(class_weights=cw, downsample_labels=factor)(labels, probs)
    assert float(value) == pytest.approx(ref_explog_soft(t, probs, cw=cw), rel=1e-5)
    # the same targets given directly (soft, one row per coarse voxel)
    direct = losses.ExpLogLoss(class_weights=cw)(t.astype(np.float32), probs)
    assert float(direct) == pytest.approx(float(value), rel=1e-6)
    for name, ref in (("log_dice", ref_explog_soft(t, probs, gd=1.0, wd=1, wc=0)),
                      ("weighted_cross_entropy", ref_explog_soft(t, probs, gc=1.0, wd=0,
                                                                 wc=1))):
        got = losses.get(name, downsample_labels=factor)(labels, probs)
        assert float(got) == pytest.approx(ref, rel=1e-5)


def test_downsampled_targets_keep_every_structure_volume():
    labels = np.zeros((1, 16, 16, 16), np.int32)
    labels[0, 3, 5, 9] = 2  # one voxel: every-8th-voxel subsampling would lose it
    labels[0, 8:12, 8:12, 8:12] = 1
    for factor in (2, 4, 8):
        t = keras.ops.convert_to_numpy(losses.downsample_targets(labels, 3, factor))
        assert t.shape == (1, 16 // factor, 16 // factor, 16 // factor, 3)
        np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
        counts = t.reshape(-1, 3).sum(0) * factor**3
        np.testing.assert_allclose(counts, [16**3 - 65, 64, 1], rtol=1e-6)
    for f in (2, 4, 8):  # what the strided pyramid did: the one-voxel structure vanished
        assert 2 not in labels[0, ::f, ::f, ::f]


def test_dense_one_hot_equals_sparse_labels_with_weights():
    labels, probs, _ = random_case(3, 5, (6, 6, 6), 2)
    one_hot = np.eye(5, dtype=np.float32)[labels]
    loss = losses.ExpLogLoss(class_weights=[1, 2, 3, 4, 5])
    assert float(loss(one_hot, probs)) == pytest.approx(float(loss(labels, probs)), rel=1e-6)


def test_deep_supervision_losses_downsample_per_level():
    base = losses.ExpLogLoss(gamma_dice=1.0, class_weights=[1.0, 2.0])
    out = losses.deep_supervision_losses(base, 3)
    assert list(out) == ["segmentation", "aux_1", "aux_2", "aux_3"]
    assert out["segmentation"] is base
    for k in (1, 2, 3):
        config = out[f"aux_{k}"].get_config()
        assert config["downsample_labels"] == 2**k
        assert config["gamma_dice"] == 1.0 and config["class_weights"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="downsample_labels"):
        losses.ExpLogLoss(downsample_labels=0)


# ----------------------------------------------------------------------------------------
# Compound losses beyond the paper: nnU-Net's Dice + CE, Dice + focal
# ----------------------------------------------------------------------------------------

COMPOUND_CASES = [
    # (loss name, kwargs, reference kwargs)
    ("dice_ce", {}, {}),
    ("dice_ce", {"w_dice": 0.3, "w_ce": 2.0, "smooth": 1.0, "include_background": True,
                 "class_weights": [0.5, 2.0, 4.0]},
     {"wd": 0.3, "wce": 2.0, "smooth": 1.0, "include_background": True,
      "cw": [0.5, 2.0, 4.0]}),
    ("dice_focal", {}, {"focal_gamma": 2.0}),
    ("dice_focal", {"gamma": 0.5, "w_focal": 3.0, "class_weights": [1.0, 1.0, 9.0]},
     {"focal_gamma": 0.5, "wce": 3.0, "cw": [1.0, 1.0, 9.0]}),
    ("dice_focal", {"gamma": 0.0}, {"focal_gamma": 0.0}),  # gamma 0: Dice + CE
]


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("name,kwargs,ref_kwargs", COMPOUND_CASES)
def test_compound_losses_match_float64_reference(name, kwargs, ref_kwargs, from_logits):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=(2, 6, 5, 4)).astype(np.int32)
    labels[1][labels[1] == 2] = 0  # label 2 absent from the second sample
    logits = rng.normal(scale=2.0, size=labels.shape + (3,)).astype(np.float32)
    probs = np_softmax(logits.astype(np.float64))
    expected = ref_dice_ce(labels, probs, **{"smooth": 1e-5, **ref_kwargs})
    y_pred = logits if from_logits else probs.astype(np.float32)
    value = float(losses.get(name, from_logits=from_logits, **kwargs)(labels, y_pred))
    assert value == pytest.approx(expected, rel=1e-5)


def test_dice_focal_with_gamma_zero_is_dice_ce_and_focal_down_weights_easy_voxels():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(1, 8, 8, 8)).astype(np.int32)
    logits = rng.normal(size=labels.shape + (4,)).astype(np.float32)
    ce = float(losses.DiceCELoss(from_logits=True)(labels, logits))
    focal0 = float(losses.DiceFocalLoss(gamma=0.0, from_logits=True)(labels, logits))
    focal2 = float(losses.DiceFocalLoss(gamma=2.0, from_logits=True)(labels, logits))
    assert focal0 == pytest.approx(ce, rel=1e-6)
    assert focal2 < focal0  # (1 - p)^2 < 1 wherever p > 0
