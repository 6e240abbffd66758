"""Tests for tf_explog.augmentation (RandomAffine3D / random_affine_3d).

References are independent: np.rot90, NumPy slicing, and scipy.ndimage.affine_transform fed
with matrices built here in float64 from the documented convention.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy import ndimage

from helpers import run_precision_test, run_saving_test
from tf_explog.augmentation import RandomAffine3D, apply_affine_3d, random_affine_3d

REPO = Path(__file__).resolve().parents[1]


def _labels(shape=(24, 24, 24), seed=0):
    """Nested blobs: a few labelled regions with smooth boundaries."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    labels = np.zeros(shape, np.int32)
    for k in range(1, 5):
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        radius = rng.uniform(0.15, 0.3) * min(shape)
        labels[np.linalg.norm(grid - centre, axis=-1) < radius] = k
    return labels


def _np(x):
    return None if x is None else keras.ops.convert_to_numpy(x)


def _rot(axis, deg):
    """+deg about `axis` turns axis+1 towards axis+2 (module convention), float64."""
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    m = np.eye(3)
    i, j = (axis + 1) % 3, (axis + 2) % 3
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def test_identity_transform_is_exact():
    labels = _labels()[None]
    image = np.random.default_rng(1).normal(size=labels.shape + (2,)).astype("float32")
    layer = RandomAffine3D(rotation=0.0, shift=0.0, zoom=1.0, probability=1.0, seed=0)
    out, out_labels = layer((image, labels), training=True)
    np.testing.assert_array_equal(_np(out), image)
    np.testing.assert_array_equal(_np(out_labels), labels)
    # Through the resampling path directly too (no where() short cut there).
    out, out_labels = apply_affine_3d(image, labels, np.eye(3)[None], np.zeros((1, 3)))
    np.testing.assert_array_equal(_np(out), image)
    np.testing.assert_array_equal(_np(out_labels), labels)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("deg, k", [(90.0, 1), (-90.0, -1)])
def test_rotation_by_90_equals_np_rot90(axis, deg, k):
    rng = np.random.default_rng(axis)
    labels = rng.integers(0, 7, size=(2, 16, 16, 16)).astype("int32")
    image = rng.normal(size=(2, 16, 16, 16, 1)).astype("float32")
    layer = RandomAffine3D(rotation=(deg, deg), rotation_axes=(axis,), shift=0.0, zoom=1.0,
                           probability=1.0, seed=0)
    out, out_labels = layer((image, labels), training=True)
    plane = ((axis + 1) % 3 + 1, (axis + 2) % 3 + 1)  # +1: batch axis
    np.testing.assert_array_equal(_np(out_labels), np.rot90(labels, k, axes=plane))
    np.testing.assert_allclose(_np(out), np.rot90(image, k, axes=plane), atol=1e-4)


def test_shift_matches_numpy_slicing():
    labels = _labels((16, 16, 16))[None]
    image = labels[..., None].astype("float32") * 1.5
    # 0.25 × 16 = 4 voxels along every axis: out[i] = in[i - 4], background before.
    out, out_labels = random_affine_3d(image, labels, seed=0, rotation=0.0, shift=(0.25, 0.25),
                                       zoom=1.0, probability=1.0)
    expected = np.zeros_like(labels)
    expected[:, 4:, 4:, 4:] = labels[:, :-4, :-4, :-4]
    np.testing.assert_array_equal(_np(out_labels), expected)
    np.testing.assert_allclose(_np(out)[..., 0], expected * 1.5, atol=1e-5)


def test_general_transform_matches_scipy_affine_transform():
    shape = (16, 20, 24)
    rng = np.random.default_rng(3)
    image = ndimage.gaussian_filter(rng.normal(size=shape), 1.5).astype("float32")
    labels = _labels(shape, seed=3)
    deg, zoom, frac = 20.0, 1.1, 0.125
    out, out_labels = random_affine_3d(
        image[None, ..., None], labels[None], seed=1, rotation=(deg, deg),
        rotation_axes="all", shift=(frac, frac), zoom=(zoom, zoom), probability=1.0,
    )
    # Forward map x_out = R2 R1 R0 z (x_in - c) + c + s, sampled as x_in = M x_out + b.
    fwd = _rot(2, deg) @ _rot(1, deg) @ _rot(0, deg) * zoom
    m = np.linalg.inv(fwd)
    c = (np.array(shape) - 1) / 2.0
    s = frac * np.array(shape)
    b = c - m @ (c + s)
    # Outside the volume: its background, i.e. its minimum (the default fill_value).
    ref = ndimage.affine_transform(image.astype(np.float64), m, offset=b, order=1,
                                   mode="grid-constant", cval=float(image.min()))
    ref_labels = ndimage.affine_transform(labels, m, offset=b, order=0,
                                          mode="grid-constant", cval=0)
    np.testing.assert_allclose(_np(out)[0, ..., 0], ref, atol=1e-4)
    agree = np.mean(_np(out_labels)[0] == ref_labels)
    assert agree >= 0.999, agree
    assert 0.3 < np.mean(ref_labels == labels) < 0.99  # the transform did something


@pytest.mark.parametrize("dtype", ["int32", "uint8"])
def test_image_and_labels_stay_aligned(dtype):
    labels = np.stack([_labels(seed=s) for s in range(3)]).astype(dtype)
    image = labels.astype("float32")[..., None]
    layer = RandomAffine3D(rotation_axes="all", probability=1.0, seed=11)
    out, out_labels = layer((image, labels), training=True)
    out, out_labels = _np(out)[..., 0], _np(out_labels)
    assert out_labels.dtype == np.dtype(dtype) and out.dtype == np.float32
    assert not np.array_equal(out_labels, labels)
    assert set(np.unique(out_labels)) <= set(np.unique(labels)) | {0}
    for b in range(len(labels)):
        lab = out_labels[b]
        interior = ndimage.maximum_filter(lab, 3) == ndimage.minimum_filter(lab, 3)
        assert interior.mean() > 0.5
        agree = np.mean(np.rint(out[b])[interior] == lab[interior])
        assert agree >= 0.99, (b, agree)


def test_probability_zero_and_inference_are_identity():
    labels = _labels()[None].repeat(2, 0)
    image = np.random.default_rng(0).normal(size=labels.shape + (1,)).astype("float32")
    never = RandomAffine3D(probability=0.0, seed=0)
    out, out_labels = never((image, labels), training=True)
    np.testing.assert_array_equal(_np(out), image)
    np.testing.assert_array_equal(_np(out_labels), labels)
    always = RandomAffine3D(probability=1.0, seed=0)
    out, out_labels = always((image, labels), training=False)
    np.testing.assert_array_equal(_np(out), image)
    np.testing.assert_array_equal(_np(out_labels), labels)
    # Image-only call.
    np.testing.assert_array_equal(_np(always(image, training=False)), image)
    assert _np(always(image, training=True)).shape == image.shape


def test_probability_fraction_and_per_element_transforms():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(6, 6, 6, 1)).astype("float32")
    image = np.repeat(vol[None], 400, axis=0)
    out = _np(RandomAffine3D(probability=0.5, seed=4)(image, training=True))
    changed = np.array([not np.array_equal(o, vol) for o in out])
    assert 0.4 < changed.mean() < 0.6, changed.mean()
    distinct = {o.tobytes() for o in out[changed]}
    assert len(distinct) == changed.sum()  # each element has its own transform


def test_seeding():
    labels = _labels()[None]
    image = labels[..., None].astype("float32")
    a = RandomAffine3D(probability=1.0, seed=5)
    b = RandomAffine3D(probability=1.0, seed=5)
    first = _np(a((image, labels))[1])
    np.testing.assert_array_equal(first, _np(b((image, labels))[1]))
    assert not np.array_equal(first, _np(a((image, labels))[1]))  # the generator advances
    # An int seed in the function is stateless: the same transform each call.
    f1 = _np(random_affine_3d(image, labels, seed=9, probability=1.0)[1])
    f2 = _np(random_affine_3d(image, labels, seed=9, probability=1.0)[1])
    np.testing.assert_array_equal(f1, f2)


def test_unbatched_volume():
    labels = _labels()
    image = labels[..., None].astype("float32")
    out, out_labels = random_affine_3d(image, labels, seed=2, probability=1.0)
    assert tuple(out.shape) == image.shape and tuple(out_labels.shape) == labels.shape
    # Labels with a trailing channel axis keep it, and match the 3D-label result.
    _, with_channel = random_affine_3d(image, labels[..., None], seed=2, probability=1.0)
    np.testing.assert_array_equal(_np(with_channel)[..., 0], _np(out_labels))


def test_get_config_round_trip_and_saved_model(tmp_path):
    layer = RandomAffine3D(rotation=(-10.0, 25.0), rotation_axes=(0, 2), shift=0.1,
                           zoom=(0.9, 1.3), probability=0.7, seed=3, interpolation="nearest",
                           name="aug")
    config = layer.get_config()
    for key, value in [("rotation", [-10.0, 25.0]), ("rotation_axes", [0, 2]),
                       ("shift", 0.1), ("zoom", [0.9, 1.3]), ("probability", 0.7),
                       ("seed", 3), ("interpolation", "nearest"), ("name", "aug")]:
        assert config[key] == value, key
    clone = RandomAffine3D.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, RandomAffine3D) and restored.get_config() == config

    labels = _labels((16, 16, 16))[None]
    image = labels[..., None].astype("float32")
    loaded = run_saving_test(RandomAffine3D(seed=1, rotation=20.0, name="aug"),
                             [image, labels], tmp_path)  # no custom_objects: registered
    assert isinstance(loaded.get_layer("aug"), RandomAffine3D)
    assert loaded.get_layer("aug").rotation == 20.0
    out = loaded.predict([image, labels], verbose=0)  # inference: identity
    np.testing.assert_array_equal(out[1], labels)


def test_mixed_precision_keeps_the_input_dtypes():
    """Geometry runs in float32 under every policy: the image stays float32 (as given), the
    labels integer, and the transform is the same as under float32."""
    labels = _labels((16, 16, 16))[None]
    image = (labels[..., None] * 2.0).astype("float32")
    outputs = run_precision_test(lambda: RandomAffine3D(seed=4, probability=1.0),
                                 (image, labels), output_dtypes=["float32", "int32"],
                                 call_kwargs={"training": True})
    moved = outputs["float32"][1]
    assert (moved != labels).mean() > 0.01  # the transform did something
    for name in ("mixed_float16", "mixed_bfloat16"):
        np.testing.assert_array_equal(outputs[name][1], moved)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rotation": -5.0}, "rotation"),
        ({"rotation": (10.0, 5.0)}, "rotation"),
        ({"rotation_axes": (3,)}, "rotation_axes"),
        ({"rotation_axes": (1, 1)}, "rotation_axes"),
        ({"shift": "x"}, "shift"),
        ({"zoom": (0.0, 1.2)}, "zoom"),
        ({"zoom": (1.2, 0.8)}, "zoom"),
        ({"probability": 1.5}, "probability"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomAffine3D(**kwargs)


def test_bad_inputs():
    layer = RandomAffine3D(seed=0)
    with pytest.raises(ValueError, match="image"):
        layer(np.zeros((8, 8, 8), "float32"))
    with pytest.raises(ValueError, match="share"):
        layer((np.zeros((1, 8, 8, 8, 1), "float32"), np.zeros((1, 8, 8, 9), "int32")))
    with pytest.raises(ValueError, match="labels"):
        layer((np.zeros((1, 8, 8, 8, 1), "float32"), np.zeros((1, 8, 8), "int32")))
    with pytest.raises(ValueError, match="seed"):
        random_affine_3d(np.zeros((8, 8, 8, 1), "float32"), seed="abc")


def test_tf_data_map_before_and_after_batching():
    import tensorflow as tf

    labels = np.repeat(_labels((16, 16, 16))[None], 4, axis=0)
    image = labels[..., None].astype("float32")
    layer = RandomAffine3D(probability=1.0, seed=7)
    ds = tf.data.Dataset.from_tensor_slices((image, labels))
    per_volume = ds.map(lambda x, y: layer((x, y), training=True)).batch(4)
    per_batch = ds.batch(3).map(lambda x, y: layer((x, y), training=True))
    for pipeline, sizes in ((per_volume, [4]), (per_batch, [3, 1])):
        batches = list(pipeline)
        assert [int(b[0].shape[0]) for b in batches] == sizes
        imgs = np.concatenate([b[0].numpy() for b in batches])
        labs = np.concatenate([b[1].numpy() for b in batches])
        assert imgs.dtype == np.float32 and labs.dtype == np.int32
        assert imgs.shape == image.shape and labs.shape == labels.shape
        # Identical inputs, a different transform per element.
        assert len({lab.tobytes() for lab in labs}) == 4
        assert set(np.unique(labs)) <= set(np.unique(labels))
    # A second epoch draws new transforms.
    again = np.concatenate([b[1].numpy() for b in per_volume])
    assert not np.array_equal(again, labs)


@pytest.mark.slow
def test_jax_backend_in_subprocess():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import keras
        from tf_explog.augmentation import RandomAffine3D, random_affine_3d
        assert keras.backend.backend() == "jax", keras.backend.backend()
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 5, size=(2, 16, 16, 16)).astype("int32")
        image = labels.astype("float32")[..., None]
        layer = RandomAffine3D(rotation=(90.0, 90.0), rotation_axes=(1,), shift=0.0,
                               zoom=1.0, probability=1.0, seed=0)
        out, out_labels = layer((image, labels), training=True)
        assert np.array_equal(np.asarray(out_labels), np.rot90(labels, 1, axes=(3, 1)))
        assert np.allclose(np.asarray(out)[..., 0], np.rot90(labels, 1, axes=(3, 1)),
                           atol=1e-4)
        import jax
        fn = jax.jit(lambda x, y: random_affine_3d(x, y, seed=3, probability=1.0))
        a, b = fn(image, labels)
        assert a.shape == image.shape and b.dtype == labels.dtype
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        print("JAX-OK")
        """
    )
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "JAX-OK" in proc.stdout, proc.stderr[-3000:]


def test_fill_is_the_background_of_a_z_scored_volume():
    # A z-scored scan: the head is bright, the air around it is far below 0 (the mean).
    shape = (16, 16, 16)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    head = np.linalg.norm(grid - 7.5, axis=-1) < 6
    raw = np.where(head, 100.0, 0.0) + np.random.default_rng(0).normal(0, 1, shape)
    image = ((raw - raw.mean()) / raw.std()).astype("float32")[None, ..., None]
    background = float(image.min())
    assert background < -0.5  # not the mean intensity
    labels = head.astype("int32")[None]
    out, out_labels = random_affine_3d(image, labels, seed=0, rotation=0.0,
                                       shift=(0.5, 0.5), zoom=1.0, probability=1.0)
    out, out_labels = _np(out)[0, ..., 0], _np(out_labels)[0]
    # Shifted by 8 voxels: the first 8 slices of every axis came from outside the volume.
    outside = np.zeros(shape, bool)
    outside[:8] = outside[:, :8] = outside[:, :, :8] = True
    np.testing.assert_allclose(out[outside], background, atol=1e-5)
    assert np.all(out_labels[outside] == 0)
    # fill_value=0.0 gives the old behaviour (the mean intensity)
    out0, _ = random_affine_3d(image, labels, seed=0, rotation=0.0, shift=(0.5, 0.5),
                               zoom=1.0, probability=1.0, fill_value=0.0)
    np.testing.assert_allclose(_np(out0)[0, ..., 0][outside], 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="fill_value"):
        RandomAffine3D(fill_value="mean")
