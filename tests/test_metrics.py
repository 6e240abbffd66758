"""Tests of tf_explog.metrics.PerLabelDice against hand-worked cases and NumPy float64."""

import keras
import numpy as np
import pytest

from tf_explog.metrics import PerLabelDice


def numpy_dice(labels, pred_ids, num_classes, first=1, weights=None):
    """Reference epoch Dice 2·ΣTP/(ΣP+ΣT) per label, float64; absent → 1.0, mean over present."""
    labels = np.asarray(labels).ravel()
    pred_ids = np.asarray(pred_ids).ravel()
    if weights is None:
        w = np.ones(labels.shape, np.float64)
    else:
        w = np.asarray(weights, np.float64).ravel()
    per_label, present = {}, []
    for c in range(first, num_classes):
        tp = np.sum(w * ((labels == c) & (pred_ids == c)))
        denom = np.sum(w * (labels == c)) + np.sum(w * (pred_ids == c))
        per_label[c] = 2.0 * tp / denom if denom > 0 else 1.0
        if denom > 0:
            present.append(per_label[c])
    mean = float(np.mean(present)) if present else 1.0
    return mean, per_label


def as_floats(result):
    return {k: float(v) for k, v in result.items()}


def one_hot(ids, num_classes):
    return np.eye(num_classes, dtype="float32")[ids]


def test_hand_worked_case():
    # 4 voxels, 4 labels; label 3 appears nowhere.
    labels = np.array([[0, 1, 1, 2]])
    pred = one_hot(np.array([[0, 1, 2, 2]]), 4)
    # label 1: TP 1, |T| 2, |P| 1 → 2/3;  label 2: TP 1, |T| 1, |P| 2 → 2/3;  label 3: absent → 1.
    metric = PerLabelDice(4)
    metric.update_state(labels, pred)
    out = as_floats(metric.result())
    assert set(out) == {"dice", "dice_1", "dice_2", "dice_3"}
    np.testing.assert_allclose([out["dice_1"], out["dice_2"], out["dice_3"]],
                               [2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(out["dice"], 2 / 3)  # label 3 left out of the mean
    with_bg = PerLabelDice(4, include_background=True)
    with_bg.update_state(labels, pred)
    out = as_floats(with_bg.result())
    np.testing.assert_allclose(out["dice_0"], 1.0)  # TP 1, |T| 1, |P| 1
    np.testing.assert_allclose(out["dice"], (1 + 2 / 3 + 2 / 3) / 3)


def test_nothing_seen_and_all_background_are_nan_free():
    metric = PerLabelDice(3)
    out = as_floats(metric.result())
    assert out == {"dice": 1.0, "dice_1": 1.0, "dice_2": 1.0}
    metric.update_state(np.zeros((1, 4, 4, 4), "int32"), one_hot(np.zeros((1, 4, 4, 4), int), 3))
    assert as_floats(metric.result()) == {"dice": 1.0, "dice_1": 1.0, "dice_2": 1.0}


@pytest.mark.parametrize("include_background", [False, True])
def test_random_volumes_against_numpy(include_background):
    rng = np.random.default_rng(0)
    num_classes = 5
    labels = rng.integers(0, num_classes, size=(2, 8, 8, 8))
    logits = rng.normal(size=(2, 8, 8, 8, num_classes)).astype("float32")
    # Make label 4 absent from ground truth and prediction to exercise that rule too.
    labels[labels == 4] = 0
    logits[..., 4] = -50.0
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    metric = PerLabelDice(num_classes, include_background=include_background)
    metric.update_state(labels, probs)
    out = as_floats(metric.result())
    first = 0 if include_background else 1
    mean, per_label = numpy_dice(labels, probs.argmax(-1), num_classes, first)
    np.testing.assert_allclose(out["dice"], mean, rtol=1e-6)
    for c, value in per_label.items():
        np.testing.assert_allclose(out[f"dice_{c}"], value, rtol=1e-6)
    assert per_label[4] == 1.0
    assert ("dice_0" in out) == include_background


def test_accumulation_equals_concatenation_and_reset():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(3, 6, 6, 6))
    probs = rng.random(size=(3, 6, 6, 6, 4)).astype("float32")
    split = PerLabelDice(4)
    split.update_state(labels[:1], probs[:1])
    split.update_state(labels[1:], probs[1:])
    whole = PerLabelDice(4)
    whole.update_state(labels, probs)
    a, b = as_floats(split.result()), as_floats(whole.result())
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
    # Epoch Dice is not the mean of per-batch Dice: check it is the pooled one.
    mean, _ = numpy_dice(labels, probs.argmax(-1), 4)
    np.testing.assert_allclose(a["dice"], mean, rtol=1e-6)
    split.reset_state()
    assert as_floats(split.result())["dice"] == 1.0


def test_label_formats_ignored_ids_and_sample_weight():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(2, 5, 5, 5))
    probs = rng.random(size=(2, 5, 5, 5, 3)).astype("float32")
    expected = numpy_dice(labels, probs.argmax(-1), 3)
    for y_true in (labels, labels[..., None], one_hot(labels, 3)):
        metric = PerLabelDice(3)
        metric.update_state(y_true, probs)
        np.testing.assert_allclose(as_floats(metric.result())["dice"], expected[0], rtol=1e-6)
    # An id outside 0..C-1 (e.g. 255 = unlabelled) counts in neither ΣT nor ΣP nor TP.
    marked = labels.copy()
    marked[:, 0] = 255
    keep = np.ones(labels.shape)
    keep[:, 0] = 0
    metric = PerLabelDice(3)
    metric.update_state(marked, probs)
    ref_mean, ref = numpy_dice(labels, probs.argmax(-1), 3, weights=keep)
    out = as_floats(metric.result())
    np.testing.assert_allclose([out["dice_1"], out["dice_2"]], [ref[1], ref[2]], rtol=1e-6)
    # Voxel weights.
    weights = rng.random(size=labels.shape).astype("float32")
    metric = PerLabelDice(3)
    metric.update_state(labels, probs, sample_weight=weights)
    ref_mean, _ = numpy_dice(labels, probs.argmax(-1), 3, weights=weights)
    np.testing.assert_allclose(as_floats(metric.result())["dice"], ref_mean, rtol=1e-5)


def test_label_names_and_errors():
    metric = PerLabelDice(3, label_names=["background", "Left Hippocampus", "csf/ventricle"])
    metric.update_state(np.zeros((1, 2, 2, 2), "int32"), one_hot(np.zeros((1, 2, 2, 2), int), 3))
    assert set(metric.result()) == {"dice", "dice_Left_Hippocampus", "dice_csf_ventricle"}
    with pytest.raises(ValueError, match="num_classes"):
        PerLabelDice(1)
    with pytest.raises(ValueError, match="label_names"):
        PerLabelDice(3, label_names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        PerLabelDice(3, label_names=["bg", "a b", "a_b"])
    with pytest.raises(ValueError, match="y_pred"):
        PerLabelDice(3).update_state(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 2, 4)))
    with pytest.raises(ValueError, match="y_true"):
        PerLabelDice(3).update_state(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 2, 3)))


def test_serialization_round_trip():
    metric = PerLabelDice(4, label_names=["bg", "a", "b", "c"], include_background=True,
                          from_logits=True, name="val_seg")
    clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(clone, PerLabelDice)
    assert clone.get_config() == metric.get_config()


def _tiny_model(num_classes):
    inputs = keras.Input((8, 8, 8, 2))
    logits = keras.layers.Conv3D(num_classes, 1)(inputs)
    return keras.Model(inputs, keras.layers.Softmax(name="segmentation")(logits))


def test_evaluate_and_fit_logs_flatten_the_dict():
    rng = np.random.default_rng(3)
    num_classes = 3
    x = rng.normal(size=(4, 8, 8, 8, 2)).astype("float32")
    y = rng.integers(0, num_classes, size=(4, 8, 8, 8))
    keras.utils.set_random_seed(0)
    model = _tiny_model(num_classes)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  metrics=[PerLabelDice(num_classes, label_names=["bg", "wm", "gm"])])
    logs = model.evaluate(x, y, batch_size=2, return_dict=True, verbose=0)
    assert {"loss", "dice", "dice_wm", "dice_gm"} <= set(logs)
    assert all(isinstance(v, float) for v in logs.values())
    # Over both batches of the evaluation, against NumPy on the model's own predictions.
    mean, per_label = numpy_dice(y, model.predict(x, verbose=0).argmax(-1), num_classes)
    np.testing.assert_allclose(logs["dice"], mean, rtol=1e-5)
    np.testing.assert_allclose([logs["dice_wm"], logs["dice_gm"]], [per_label[1], per_label[2]],
                               rtol=1e-5)
    history = model.fit(x, y, batch_size=2, epochs=1, validation_data=(x, y), verbose=0)
    assert {"dice", "dice_wm", "val_dice", "val_dice_gm"} <= set(history.history)
