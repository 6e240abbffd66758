"""SavedModel export for TF Serving (tf_explog.export).

References are computed here in NumPy float64 (normalisation, padding, label values) and with
the Keras model itself; the served graph is exercised by ``saved_model_cli`` and by a fresh
Python process in which only TensorFlow can be imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from tf_explog.export import (  # noqa: E402
    ExportError,
    export_saved_model,
    normalize_graph,
    read_metadata,
)
from tf_explog.models import build_model  # noqa: E402
from helpers import write_run_dir  # noqa: E402

VENV_BIN = Path(sys.executable).parent
LABEL_NAMES = ["background", "ventricle", "thalamus"]
LABEL_MAP = {"1": [10], "2": [20, 21]}
LABEL_VALUES = np.array([0, 10, 20])  # class id -> original value (first listed)
CLIP = (1.0, 99.0)
CHANNELS = 2


def tiny_model(channels=CHANNELS, num_classes=3, input_shape=None):
    keras.utils.set_random_seed(0)
    model = build_model(
        input_shape or (None, None, None, channels), num_classes,
        filters=(4, 4, 4, 4, 4), encoder_depths=(1, 1, 1, 1, 1), decoder_depths=(1, 1, 1, 1),
        seed=3,
    )
    # Sharper logits so that an untrained model predicts every class somewhere.
    head = model.get_layer("segmentation_logits")
    head.kernel.assign(head.kernel * 20.0)
    return model


def assert_labels_match(labels, expected_probs, values=None, tol=1e-5):
    """``labels`` equal the argmax of ``expected_probs`` (mapped through ``values``) wherever
    the top-2 margin exceeds ``tol``, the probability tolerance; near-ties (float32 rounding
    may go either way there) must be one of the two top classes and rare."""
    top2 = np.argsort(expected_probs, axis=-1)[..., -2:]
    ordered = np.take_along_axis(expected_probs, top2, axis=-1)
    clear = ordered[..., 1] - ordered[..., 0] > tol
    values = np.arange(expected_probs.shape[-1]) if values is None else np.asarray(values)
    np.testing.assert_array_equal(labels[clear], values[top2[..., 1]][clear])
    for label, pair in zip(labels[~clear], values[top2[~clear]]):
        assert label in pair
    assert (~clear).mean() < 1e-3


def make_run_dir(root: Path, model) -> Path:
    return write_run_dir(
        root, model, name="tiny", label_names=LABEL_NAMES, num_channels=CHANNELS,
        fingerprint="0123456789abcdef", seed=7,
        preprocessor={"normalization": "zscore_nonzero", "clip_percentiles": list(CLIP),
                      "label_map": LABEL_MAP, "target_spacing": [1.0, 1.0, 1.0]})


def sample_image(shape, seed, channels=CHANNELS):
    """Positive intensities with a zero margin (background for "zscore_nonzero")."""
    rng = np.random.default_rng(seed)
    img = (rng.normal(100.0, 25.0, size=(*shape, channels)) * np.arange(1, channels + 1))
    img[:3] = 0.0
    img[:, -2:] = 0.0
    return img.astype(np.float32)


def ref_normalize(vol, normalization, clip=None):
    """Per-channel clipping + z-scoring of one [D, H, W, C] volume, float64 (as the paper's
    preprocessing is documented): statistics over all or non-zero voxels."""
    out = vol.astype(np.float64).copy()
    means, stds = [], []
    for c in range(out.shape[-1]):
        ch = out[..., c]
        mask = ch != 0 if normalization == "zscore_nonzero" else np.ones(ch.shape, bool)
        vals = ch[mask]
        if clip is not None:
            lo, hi = np.percentile(vals, clip)
            vals = np.clip(vals, lo, hi)
        mean, std = vals.mean(), vals.std()
        std = std if std > 1e-8 else 1.0
        ch[mask] = (vals - mean) / std
        means.append(mean)
        stds.append(std)
    return out, np.array(means), np.array(stds)


def pad_end(vol, multiple, value):
    pads = [(0, -n % multiple) for n in vol.shape[:3]] + [(0, 0)]
    if np.ndim(value) == 0:
        return np.pad(vol, pads, constant_values=value)
    return np.stack([np.pad(vol[..., c], pads[:3], constant_values=value[c])
                     for c in range(vol.shape[-1])], axis=-1)


def keras_reference(model, volumes, normalization, clip, pad_value=0.0):
    """Normalise in NumPy, pad at the end to 16, run the Keras model, crop back."""
    probs = []
    for vol in volumes:
        norm, mean, std = ref_normalize(vol, normalization, clip)
        if normalization == "zscore":
            fill = (pad_value - mean) / std  # raw padding, normalised like every voxel
        else:
            fill = 0.0  # zero padding is outside the non-zero mask: stays 0
        padded = pad_end(norm, 16, fill).astype(np.float32)
        p = keras.ops.convert_to_numpy(model(padded[None], training=False))[0]
        probs.append(p[: vol.shape[0], : vol.shape[1], : vol.shape[2]])
    return np.stack(probs)


def tree_hash(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = tiny_model()
    run = make_run_dir(root, model)
    base = root / "saved_models"
    path = export_saved_model(run, base)
    return {"root": root, "model": model, "run": run, "base": base, "path": path}


TF_ONLY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np

    # Keras is installed here, and `import tensorflow` imports keras.src.optimizers when it
    # can: block it (and the package) to prove the SavedModel needs TensorFlow alone. A None
    # entry in sys.modules makes `import keras` raise ImportError.
    BLOCKED = ("keras", "tf_keras", "tf_explog")
    for name in BLOCKED:
        sys.modules[name] = None
    import tensorflow as tf

    export_dir, in_dir, out_file = sys.argv[1:4]
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    result, errors = {}, {}
    for key in ("cube", "odd"):
        out = serve(image=tf.constant(np.load(f"{in_dir}/{key}.npy")))
        result[key + "_labels"] = out["labels"].numpy()
        result[key + "_probabilities"] = out["probabilities"].numpy()
    for key in ("channels", "rank"):
        try:
            serve(image=tf.constant(np.load(f"{in_dir}/bad_{key}.npy")))
            errors[key] = None
        except Exception as err:
            errors[key] = type(err).__name__ + ": " + str(err)
    np.savez(out_file, **result)
    mods = sorted({m.split(".")[0] for m, mod in list(sys.modules.items()) if mod is not None}
                  & set(BLOCKED))
    print(json.dumps({"imported": mods, "errors": errors}))
    """
)


@pytest.fixture(scope="module")
def tf_only(exported, tmp_path_factory):
    work = tmp_path_factory.mktemp("tf_only")
    inputs = {
        "cube": sample_image((32, 32, 32), 0)[None],
        "odd": np.stack([sample_image((37, 41, 29), 1), 0.5 * sample_image((37, 41, 29), 2)]),
        "bad_channels": np.ones((1, 16, 16, 16, CHANNELS + 1), np.float32),
        "bad_rank": np.ones((16, 16, 16, CHANNELS), np.float32),
    }
    for key, value in inputs.items():
        np.save(work / f"{key}.npy", value)
    (work / "run.py").write_text(TF_ONLY_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run(
        [sys.executable, str(work / "run.py"), str(exported["path"]), str(work),
         str(work / "out.npz")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    outputs = dict(np.load(work / "out.npz"))
    return {"inputs": inputs, "report": report, "outputs": outputs}


# ------------------------------------------------------------------------------- layout, CLI


def test_layout_and_metadata(exported):
    path = exported["path"]
    assert path == exported["base"] / "tiny" / "1"
    assert (path / "saved_model.pb").is_file()
    assert (path / "variables" / "variables.index").is_file()
    meta = json.loads((path / "assets" / "metadata.json").read_text())
    assert meta == read_metadata(path)
    assert meta["label_names"] == LABEL_NAMES
    assert meta["label_values"] == [0, 10, 20]
    assert meta["input_channels"] == CHANNELS and meta["num_classes"] == 3
    assert meta["orientation"] == "RAS"
    assert meta["spacing"] == [1.0, 1.0, 1.0]
    assert meta["normalization"] == "zscore_nonzero"
    assert meta["in_graph"]["pad_multiple"] == 16
    assert meta["in_graph"]["clip_percentiles"] == list(CLIP)
    assert meta["config_fingerprint"] == "0123456789abcdef"
    assert meta["preprocessor"]["label_map"] == LABEL_MAP
    import tf_explog

    assert meta["tf_explog_version"] == tf_explog.__version__
    # No staging directory is left beside the version.
    assert sorted(p.name for p in (exported["base"] / "tiny").iterdir()) == ["1"]


def test_no_xla_only_kernels(exported):
    # Keras' conv falls back to an XLA-compiled kernel when the channel count is unknown;
    # TF Serving builds without XLA could not run such a graph.
    assert b"_XlaMustCompile" not in (exported["path"] / "saved_model.pb").read_bytes()


@pytest.mark.slow
def test_saved_model_cli_show(exported):
    proc = subprocess.run(
        [str(VENV_BIN / "saved_model_cli"), "show", "--all", "--dir", str(exported["path"])],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    start = text.index("signature_def['serving_default']")
    block = text[start: text.index("Method name is", start)]
    assert "inputs['image']" in block
    assert f"shape: (-1, -1, -1, -1, {CHANNELS})" in block
    assert "outputs['labels']" in block and "DT_INT32" in block
    assert "outputs['probabilities']" in block and "shape: (-1, -1, -1, -1, 3)" in block
    signatures = [line for line in text.splitlines() if line.startswith("signature_def[")]
    assert sorted(s for s in signatures if "__saved_model_init_op" not in s) == [
        "signature_def['labels']:", "signature_def['serving_default']:"
    ]
    labels_block = text[text.index("signature_def['labels']"):]
    labels_block = labels_block[:labels_block.index("Method name")]
    assert "outputs['labels']" in labels_block and "probabilities" not in labels_block


@pytest.mark.slow
def test_saved_model_cli_run(exported, tmp_path):
    image = sample_image((21, 16, 18), 5)[None]
    np.save(tmp_path / "x.npy", image)
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(VENV_BIN / "saved_model_cli"), "run", "--dir", str(exported["path"]),
         "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"image={tmp_path / 'x.npy'}", "--outdir", str(out)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = np.load(out / "labels.npy")
    probs = np.load(out / "probabilities.npy")
    assert labels.shape == (1, 21, 16, 18) and labels.dtype == np.int32
    assert probs.shape == (1, 21, 16, 18, 3) and probs.dtype == np.float32
    assert set(np.unique(labels)) <= {0, 10, 20}
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------- TF-only serving


def test_loads_with_tensorflow_alone(tf_only):
    assert tf_only["report"]["imported"] == []


@pytest.mark.parametrize("key", ["cube", "odd"])
def test_served_outputs_match_keras(exported, tf_only, key):
    image = tf_only["inputs"][key]
    labels = tf_only["outputs"][f"{key}_labels"]
    probs = tf_only["outputs"][f"{key}_probabilities"]
    assert labels.shape == image.shape[:4] and labels.dtype == np.int32
    assert probs.shape == (*image.shape[:4], 3) and probs.dtype == np.float32
    expected = keras_reference(exported["model"], image, "zscore_nonzero", CLIP)
    # The served graph has BatchNorm folded into the convolutions (tf_explog.folding):
    # float32 rounding moves probabilities by up to ~2e-5 against the unfolded model.
    np.testing.assert_allclose(probs, expected, atol=5e-5, rtol=0)
    assert_labels_match(labels, expected, LABEL_VALUES)
    # Every class is predicted somewhere (the comparison is not vacuous).
    assert set(np.unique(labels)) == {0, 10, 20}


def test_wrong_channel_count_raises(tf_only):
    err = tf_only["report"]["errors"]["channels"]
    assert err is not None and err.startswith("InvalidArgumentError")
    assert f"with C = {CHANNELS} channel(s)" in err


def test_wrong_rank_raises(tf_only):
    err = tf_only["report"]["errors"]["rank"]
    assert err is not None and err.startswith("InvalidArgumentError")
    assert "[16,16,16,2]" in err and "[?,?,?,?,2]" in err


# ------------------------------------------------------------------------------- versions


def test_second_export_is_version_2_and_leaves_1_untouched(exported):
    v1 = exported["base"] / "tiny" / "1"
    before = tree_hash(v1)
    stat_before = (v1 / "saved_model.pb").stat().st_mtime_ns
    v2 = export_saved_model(exported["run"], exported["base"])
    assert v2 == exported["base"] / "tiny" / "2"
    assert (v2 / "assets" / "metadata.json").is_file()
    with pytest.raises(FileExistsError, match="version 1"):
        export_saved_model(exported["run"], exported["base"], version=1)
    assert tree_hash(v1) == before
    assert (v1 / "saved_model.pb").stat().st_mtime_ns == stat_before
    assert sorted(p.name for p in (exported["base"] / "tiny").iterdir()) == ["1", "2"]


# ------------------------------------------------------------------------------- Keras model input


def test_keras_model_object_defaults_to_zscore(tmp_path):
    model = tiny_model(channels=1, num_classes=2)
    path = export_saved_model(model, tmp_path, name="plain", version=3)
    assert path == tmp_path / "plain" / "3"
    meta = read_metadata(path)
    assert meta["normalization"] == "zscore"
    assert meta["label_names"] == ["label_0", "label_1"]
    assert meta["label_values"] == [0, 1]
    assert meta["config_fingerprint"] is None
    image = sample_image((20, 17, 16), 9, channels=1)[None]
    out = tf.saved_model.load(str(path)).signatures["serving_default"](image=tf.constant(image))
    expected = keras_reference(model, image, "zscore", None)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5, rtol=0)
    assert_labels_match(out["labels"].numpy(), expected)


# ------------------------------------------------------------------------------- normalisation


def test_normalize_graph_matches_training_preprocessor():
    from tf_explog.data.preprocess import Preprocessor

    rng = np.random.default_rng(4)
    vol = rng.gamma(2.0, 30.0, size=(9, 8, 7, 3)).astype(np.float32)
    vol[:2] = 0.0
    vol[..., 2] = 0.0  # an all-zero channel stays as it is
    for normalization in ("zscore", "zscore_nonzero"):
        pre = Preprocessor(normalization=normalization, clip_percentiles=(2.0, 97.5))
        expected, _, _ = pre.forward(vol)
        got = normalize_graph(tf.constant(vol[None], tf.float64),
                              tf.ones((1, *vol.shape), tf.bool), normalization, (2.0, 97.5))
        np.testing.assert_allclose(got.numpy()[0], expected, atol=1e-5, rtol=0)


def test_normalize_graph_hand_worked():
    # One channel [0, 0, 2, 4] (+ a padded voxel 0): non-zero mean 3, std 1 -> [0, 0, -1, 1].
    x = tf.constant(np.array([0, 0, 2, 4, 0], np.float64).reshape(1, 5, 1, 1, 1))
    inside = tf.constant(np.array([1, 1, 1, 1, 0], bool).reshape(1, 5, 1, 1, 1))
    got = normalize_graph(x, inside, "zscore_nonzero").numpy().ravel()
    np.testing.assert_allclose(got, [0, 0, -1, 1, 0])
    # zscore over the 4 voxels sent: mean 1.5, std sqrt(2.75); the padded one is transformed too.
    got = normalize_graph(x, inside, "zscore").numpy().ravel()
    s = np.sqrt(2.75)
    np.testing.assert_allclose(got, [-1.5 / s, -1.5 / s, 0.5 / s, 2.5 / s, -1.5 / s])
    # A flat channel is centred, not scaled; clipping at the 25/75th percentiles of [1, 2, 3, 9]
    # (1.75 and 4.5) gives [1.75, 2, 3, 4.5].
    flat = tf.constant(np.full((1, 2, 1, 1, 1), 5.0))
    np.testing.assert_allclose(normalize_graph(flat, tf.ones_like(flat, tf.bool), "zscore")
                               .numpy().ravel(), [0, 0])
    y = tf.constant(np.array([1, 2, 3, 9], np.float64).reshape(1, 4, 1, 1, 1))
    got = normalize_graph(y, tf.ones_like(y, tf.bool), None, (25, 75)).numpy().ravel()
    np.testing.assert_allclose(got, [1.75, 2, 3, 4.5])


# ------------------------------------------------------------------------------- errors


def test_missing_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        export_saved_model(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run.json"):
        export_saved_model(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_model(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ExportError, match="broken.keras: could not load the Keras model"):
        export_saved_model(bad, tmp_path / "out")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.keras").write_bytes(b"garbage")
    (run / "run.json").write_text(json.dumps({"best_checkpoint": "checkpoints/best.keras"}))
    with pytest.raises(ExportError, match="best.keras: could not load"):
        export_saved_model(run, tmp_path / "out")
    (run / "run.json").write_text(json.dumps({"best_checkpoint": "checkpoints/best.keras",
                                              "final_model": "checkpoints/final.keras"}))
    with pytest.raises(FileNotFoundError, match="final_model"):
        export_saved_model(run, tmp_path / "out", checkpoint="final")


def test_bad_options(tmp_path):
    model = tiny_model(channels=1, num_classes=2)
    with pytest.raises(ExportError, match="name"):
        export_saved_model(model, tmp_path, name="a/b")
    with pytest.raises(ExportError, match="version"):
        export_saved_model(model, tmp_path, name="m", version=0)
    with pytest.raises(ExportError, match="2 classes"):
        export_saved_model(model, tmp_path, name="m", label_names=["a", "b", "c"])
    with pytest.raises(ExportError, match="normalization"):
        export_saved_model(model, tmp_path, name="m", normalization="minmax")
    with pytest.raises(ExportError, match="dynamic"):
        export_saved_model(tiny_model(channels=1, input_shape=(16, 16, 16, 1)), tmp_path)
    with pytest.raises(ExportError, match="class id"):
        export_saved_model(tiny_model(channels=1, num_classes=3), tmp_path, name="m",
                           preprocessor={"label_map": {"2": [7]}})
    assert not any(tmp_path.rglob("saved_model.pb"))
