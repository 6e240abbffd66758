"""Helpers shared by the test files (imported as ``helpers``: pytest puts tests/ on sys.path).

- ``run_saving_test`` / ``run_precision_test``: the one saving round trip and the one
  mixed-precision check every model and custom layer test uses, after keras-hub's
  ``TestCase.run_model_saving_test`` / ``run_precision_test``.
- ``write_msd_dataset`` / ``write_two_structure_dataset``: tiny NIfTI data sets in the
  Medical Segmentation Decathlon layout (``conftest.py`` turns them into fixtures).
- ``write_run_dir``: a run directory (``checkpoints/best.keras`` + ``run.json``) around a model.
- ``toy_bn_model`` & co: a two-BatchNorm network and its float64 reference statistics, also
  imported by a JAX subprocess (so nothing here imports TensorFlow at module level).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np

# ------------------------------------------------------------------------ saving & precision


def _as_model(obj, inputs, call_kwargs) -> keras.Model:
    """A functional model around a layer, its inputs shaped (and typed) like ``inputs``."""
    if isinstance(obj, keras.Model):
        return obj
    symbolic = keras.tree.map_structure(
        lambda a: keras.Input(tuple(np.shape(a))[1:], dtype=str(np.asarray(a).dtype)), inputs)
    outputs = obj(symbolic, **call_kwargs)
    if isinstance(outputs, tuple):
        outputs = list(outputs)
    return keras.Model(symbolic, outputs)


def _numpy_outputs(outputs) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(outputs)]


def plain_config(obj) -> dict:
    """``obj.get_config()`` as JSON would store it (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj.get_config(), default=str))


def perturb_weights(model: keras.Model, seed: int = 0) -> None:
    """Move every float weight away from its initial value (BatchNorm statistics included,
    variances kept positive), so that a weight that is not saved or not loaded shows."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if not keras.backend.is_float_dtype(variable.dtype):
            continue  # seed-generator states and counters
        value = np.asarray(keras.ops.convert_to_numpy(variable), np.float64)
        value = value * rng.uniform(0.8, 1.2, value.shape)
        if "variance" not in variable.path:
            value = value + rng.normal(0.0, 0.05, value.shape)
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def run_saving_test(obj, inputs, tmp_path: Path, *, call_kwargs: Mapping | None = None,
                    custom_objects: Mapping | None = None, perturb: bool = True,
                    atol: float = 0.0, compile: bool = False) -> keras.Model:
    """Save ``obj`` (a model, or a layer wrapped in a functional model) as ``.keras``, reload it
    and check that nothing was lost.

    Checks: the layer's config survives ``serialize → deserialize``; the reloaded model has
    the same config, the same weights (bit for bit, after `perturb_weights` moved them off
    their initial values) and the same outputs on ``inputs`` (``atol``, exact by default).
    Loads without ``custom_objects`` unless given: the package registers its classes; with
    ``compile`` the reloaded model is compiled as saved (loss and optimizer restored).

    Returns:
        The reloaded model, for checks of the caller's own.
    """
    call_kwargs = dict(call_kwargs or {"training": False})
    if not isinstance(obj, keras.Model):
        config = keras.saving.serialize_keras_object(obj)
        revived = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)
        assert type(revived) is type(obj)
        assert plain_config(revived) == plain_config(obj)
    model = _as_model(obj, inputs, call_kwargs)
    if perturb:
        perturb_weights(model)
    path = Path(tmp_path) / f"{model.name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, custom_objects=custom_objects, compile=compile)
    assert type(loaded) is type(model)
    assert plain_config(loaded) == plain_config(model)
    before, after = model.get_weights(), loaded.get_weights()
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    expected = _numpy_outputs(model(inputs, **call_kwargs))
    got = _numpy_outputs(loaded(inputs, **call_kwargs))
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=0, atol=atol)
    return loaded


# TensorFlow has no float16 MaxPool3D kernel on a CPU: networks run mixed_float16 on a GPU
# (or JAX) only, so the model tests take the policies the backend can run here.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# max |output - float32 output| / max(1, max |float32 output|) allowed under each policy.
PRECISION_TOLERANCE = {"float32": 0.0, "mixed_float16": 1e-2, "mixed_bfloat16": 6e-2}


def run_precision_test(build_fn: Callable[[], Any], inputs, *,
                       policies: Sequence[str] = PRECISIONS, output_dtypes=None,
                       call_kwargs: Mapping | None = None) -> dict[str, list[np.ndarray]]:
    """Build ``build_fn()`` under each global dtype policy and call it on ``inputs``.

    Checks, per policy: every weight is stored in float32 (the variable dtype of all three);
    every layer that owns weights computes in the policy's compute dtype; the outputs have
    ``output_dtypes`` (None: the compute dtype; a string: every output; else one per flat
    output) and are finite; with the float32 build's weights copied in, they are within
    `PRECISION_TOLERANCE` of the float32 outputs. The global policy is restored afterwards.

    Returns:
        ``{policy: flat outputs as NumPy arrays}``.
    """
    call_kwargs = dict(call_kwargs or {"training": False})
    previous = keras.mixed_precision.global_policy()
    results, reference_weights = {}, None
    try:
        for name in policies:
            keras.mixed_precision.set_global_policy(name)
            compute = keras.mixed_precision.global_policy().compute_dtype
            obj = build_fn()
            outputs = obj(inputs, **call_kwargs)
            if reference_weights is None:
                reference_weights = obj.get_weights()
            elif reference_weights:  # (a second call would also advance a seed generator)
                obj.set_weights(reference_weights)
                outputs = obj(inputs, **call_kwargs)
            layers = obj._flatten_layers(include_self=True, recursive=True)
            for layer in layers:
                if layer.weights and getattr(layer, "_dtype_policy", None) is not None:
                    if layer.dtype_policy.name == "float32" and name != "float32":
                        continue  # layers pinned to float32 on purpose (the softmax heads)
                    assert layer.compute_dtype == compute, (name, layer.name)
            for variable in obj.weights:
                if keras.backend.is_float_dtype(variable.dtype):
                    assert keras.backend.standardize_dtype(variable.dtype) == "float32", (
                        name, variable.path)
            flat = keras.tree.flatten(outputs)
            if output_dtypes is None:
                expected = [compute] * len(flat)
            elif isinstance(output_dtypes, str):
                expected = [output_dtypes] * len(flat)
            else:
                expected = list(output_dtypes)
            assert [keras.backend.standardize_dtype(o.dtype) for o in flat] == expected, name
            arrays = [np.asarray(keras.ops.convert_to_numpy(
                keras.ops.cast(o, "float32") if keras.backend.is_float_dtype(o.dtype) else o))
                for o in flat]
            for a in arrays:
                assert np.isfinite(a).all(), name
            results[name] = arrays
            if "float32" in results and name != "float32":
                for a, ref in zip(arrays, results["float32"]):
                    scale = max(1.0, float(np.abs(ref).max()))
                    diff = float(np.abs(a.astype(np.float64) - ref).max())
                    assert diff <= PRECISION_TOLERANCE[name] * scale, (name, diff, scale)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return results


# ------------------------------------------------------------------------------ data sets


def write_msd_dataset(root: Path, training: Sequence[tuple], label_names, *,
                      test: Sequence = (), name: str = "toy", modality: str = "T1",
                      **extra) -> Path:
    """Write a data set in the Medical Segmentation Decathlon layout; return its dataset.json.

    Args:
        training: ``(stem, image, labels, affine)`` per case, written as they are (dtypes
            included) to ``imagesTr/<stem>.nii.gz`` and ``labelsTr/<stem>.nii.gz``.
        label_names: a sequence (index = label) or the ``{"0": name}`` mapping itself.
        test: entries of ``"test"``: a string is written as given; ``(stem, image, labels,
            affine)`` goes to ``imagesTs``/``labelsTs`` as an ``{"image", "label"}`` entry.
        extra: further top-level keys of dataset.json (``numTraining``, ...).
    """
    import nibabel as nib

    root = Path(root)

    def save(folder, stem, array, affine):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(root / folder / f"{stem}.nii.gz"))
        return f"./{folder}/{stem}.nii.gz"

    entries = [{"image": save("imagesTr", stem, image, affine),
                "label": save("labelsTr", stem, labels, affine)}
               for stem, image, labels, affine in training]
    tests = [item if isinstance(item, str) else
             {"image": save("imagesTs", item[0], item[1], item[3]),
              "label": save("labelsTs", item[0], item[2], item[3])}
             for item in test]
    if not isinstance(label_names, Mapping):
        label_names = {str(i): n for i, n in enumerate(label_names)}
    spec = {"name": name, "modality": {"0": modality}, "labels": dict(label_names), **extra,
            "training": entries, "test": tests}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root / "dataset.json"


def write_two_structure_dataset(root: Path, subjects: int = 6, size: int = 32,
                                seed: int = 0) -> Path:
    """A big sphere (label 1) and a small one (label 2) at random places, MSD layout."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).transpose(1, 2, 3, 0)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    cases = []
    for i in range(subjects):
        labels = np.zeros((size,) * 3, np.uint8)
        big = rng.uniform(size * 0.35, size * 0.65, 3)
        labels[np.linalg.norm(grid - big, axis=-1) < size * 0.25] = 1
        small = rng.uniform(size * 0.2, size * 0.8, 3)
        labels[np.linalg.norm(grid - small, axis=-1) < size * 0.09] = 2
        image = np.array([0.0, 2.0, 4.0])[labels] + rng.normal(0, 0.4, labels.shape)
        cases.append((f"case_{i:02d}", image.astype(np.float32), labels, affine))
    return write_msd_dataset(root, cases, ["background", "big", "small"],
                             name="two_structures", numTraining=subjects)


def write_run_dir(root: Path, model, *, label_names: Sequence[str], preprocessor: dict,
                  name: str = "tiny", config: dict | None = None, num_channels: int = 1,
                  fingerprint: str = "0" * 16, seed: int = 0) -> Path:
    """``root/runs/<name>/20260101-000000`` with ``model`` as the best checkpoint and a
    ``run.json`` as training writes it (no final model)."""
    import warnings

    run = Path(root) / "runs" / name / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    with warnings.catch_warnings():
        # Keras' weight saving trips NumPy 2's __array__(copy=...) deprecation: not ours.
        warnings.simplefilter("ignore", DeprecationWarning)
        model.save(run / "checkpoints" / "best.keras")
    info = {
        "config": config if config is not None else {"name": name},
        "base_dir": str(root),
        "fingerprint": fingerprint,
        "seed": seed,
        "label_names": list(label_names),
        "num_channels": num_channels,
        "preprocessor": preprocessor,
        "best_checkpoint": "checkpoints/best.keras",
        "final_model": "checkpoints/final.keras",
    }
    (run / "run.json").write_text(json.dumps(info))
    return run


# ------------------------------------------------- BatchNorm toy network and its reference

BN_EPSILON = 1e-3  # Keras' BatchNormalization default epsilon


def toy_bn_model(noise=0.0, dropout=0.0, seed=0):
    """image -> [noise] -> 1x1 conv -> BN -> ReLU -> [dropout] -> 1x1 conv -> BN."""
    from tf_explog.batchnorm import batchnorm_layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, None, 2))
    x = keras.layers.GaussianNoise(noise)(inputs) if noise else inputs
    x = keras.layers.Conv3D(3, 1, name="c1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(dropout)(x) if dropout else x
    x = keras.layers.Conv3D(2, 1, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    model = keras.Model(inputs, x)
    # Non-trivial gammas/betas and stale moving statistics, as after training.
    for bn in batchnorm_layers(model):
        k = bn.gamma.shape[0]
        bn.gamma.assign(np.linspace(0.5, 2.0, k).astype("float32"))
        bn.beta.assign(np.linspace(-0.3, 0.4, k).astype("float32"))
        bn.moving_mean.assign(np.full(k, 5.0, "float32"))
        bn.moving_variance.assign(np.full(k, 9.0, "float32"))
    return model


def layer_weights(model, name):
    layer = model.get_layer(name)
    return [np.asarray(w, np.float64) for w in layer.get_weights()]


def np_conv1(x, weights):
    kernel, bias = weights
    return x @ kernel.reshape(kernel.shape[-2:]) + bias


def np_bn(a, mean, var, gamma, beta):
    return (a - mean) / np.sqrt(var + BN_EPSILON) * gamma + beta


def bn_batches(rng, sizes):
    # Unequal batch and volume sizes, and shifted means, so the merge of moments matters.
    return [(rng.normal(2.0 + i, 1.0 + 0.5 * i, (b, d, d, d, 2))).astype("float32")
            for i, (b, d) in enumerate(sizes)]


def bn_reference_statistics(model, batches, passes):
    """Population mean/var of bn1's and bn2's inputs, float64, written from the definition."""
    c1, c2 = layer_weights(model, "c1"), layer_weights(model, "c2")
    g1, b1 = layer_weights(model, "bn1")[:2]
    stats = None
    for p in range(passes):
        a1_all, a2_all = [], []
        for x in batches:
            a1 = np_conv1(x.astype(np.float64), c1).reshape(-1, 3)
            if p == 0:  # pass 1 normalises with the batch's own statistics
                m1, v1 = a1.mean(0), a1.var(0)
            else:
                m1, v1 = stats[0]
            h = np.maximum(np_bn(a1, m1, v1, g1, b1), 0)
            a2 = np_conv1(h, c2)
            a1_all.append(a1)
            a2_all.append(a2)
        a1_all, a2_all = np.concatenate(a1_all), np.concatenate(a2_all)
        stats = [(a1_all.mean(0), a1_all.var(0)), (a2_all.mean(0), a2_all.var(0))]
    return stats
