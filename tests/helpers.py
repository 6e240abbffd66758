"""Helpers shared by the test files (imported as ``helpers``: pytest puts tests/ on sys.path).

- ``write_msd_dataset`` / ``write_two_structure_dataset``: tiny NIfTI data sets in the
  Medical Segmentation Decathlon layout (``conftest.py`` turns them into fixtures).
- ``write_run_dir``: a run directory (``checkpoints/best.keras`` + ``run.json``) around a model.
- ``toy_bn_model`` & co: a two-BatchNorm network and its float64 reference statistics, also
  imported by a JAX subprocess (so nothing here imports TensorFlow at module level).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import keras
import numpy as np

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
