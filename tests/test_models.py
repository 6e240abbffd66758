"""Tests of tf_explog.models / tf_explog.layers: the network of Wong et al. (2018), Fig. 1."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import plain_config, run_precision_test, run_saving_test
from tf_explog.layers import Block, LinearUpsampling3D, SpatialSizeCheck
from tf_explog.metrics import PerLabelDice
from tf_explog.models import aux_loss_weights, build_model, output_names

ROOT = Path(__file__).resolve().parents[1]


def paper_parameter_count(in_channels, num_classes):
    """Count the Fig. 1 network's parameters by hand, from the architecture alone.

    Conv3D: k³·c_in·c_out kernel + c_out bias; BatchNorm: 4 per channel (γ, β, moving
    mean, moving variance). Block(n, k) on c input channels: a 1³ shortcut conv + BN, and k
    3³ convs each followed by BN.
    """

    def conv(k, c_in, c_out):
        return k**3 * c_in * c_out + c_out

    def block(c_in, n, k):
        total = conv(1, c_in, n) + 4 * n
        for i in range(k):
            total += conv(3, c_in if i == 0 else n, n) + 4 * n
        return total

    encoder = (
        block(in_channels, 12, 1)
        + block(12, 24, 2)
        + block(24, 48, 3)
        + block(48, 96, 3)
        + block(96, 192, 3)
    )
    # Decoder input = upsampled coarser output concatenated with the same-level skip.
    decoder = (
        block(192 + 96, 96, 3)
        + block(96 + 48, 48, 3)
        + block(48 + 24, 24, 2)
        + block(24 + 12, 12, 1)
    )
    head = conv(1, 96 + 48 + 24 + 12, num_classes)
    return encoder + decoder + head


def test_parameter_count_matches_paper():
    assert paper_parameter_count(1, 20) == 4_994_036  # the number the paper's network has
    model = build_model()
    assert model.count_params() == 4_994_036
    # Any channel count and label count: still exactly the architecture.
    other = build_model((None, None, None, 3), num_classes=7)
    assert other.count_params() == paper_parameter_count(3, 7)


def test_aux_heads_add_only_their_1x1_convs():
    model = build_model((32, 32, 32, 1), num_classes=5, aux_outputs=True)
    # aux_1, aux_2, aux_3 sit on the 24-, 48- and 96-channel decoder outputs.
    extra = sum(c * 5 + 5 for c in (24, 48, 96))
    assert model.count_params() == paper_parameter_count(1, 5) + extra


@pytest.mark.parametrize("aux", [False, True, 2])
def test_output_names_shapes_dtypes(aux):
    x = np.random.default_rng(0).normal(size=(1, 32, 16, 32, 2)).astype("float32")
    models = {}

    def build():
        keras.utils.set_random_seed(0)
        model = build_model((32, 16, 32, 2), num_classes=4, aux_outputs=aux)
        models[keras.mixed_precision.global_policy().name] = model
        return model

    # TensorFlow has no float16 MaxPool3D on a CPU: mixed_float16 is checked on JAX
    # (tests/test_folding.py). Softmax outputs are float32 under every policy.
    outputs = run_precision_test(build, x, policies=("float32", "mixed_bfloat16"),
                                 output_dtypes="float32")
    n_aux = {False: 0, True: 3, 2: 2}[aux]
    expected = ["segmentation"] + [f"aux_{k}" for k in range(1, n_aux + 1)]
    for policy_name, model in models.items():
        assert output_names(model) == expected
        if n_aux == 0:
            assert model.output_names == ["segmentation"]
        names = sorted(expected) if n_aux else expected  # dict outputs flatten sorted by key
        for name, out in zip(names, outputs[policy_name]):
            f = 1 if name == "segmentation" else 2 ** int(name.split("_")[1])
            assert out.shape == (1, 32 // f, 16 // f, 32 // f, 4), name
            np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
        # The convolutions really run in the policy's compute dtype.
        block = model.get_layer("enc_block_1")
        assert block.compute_dtype == ("bfloat16" if policy_name == "mixed_bfloat16"
                                       else "float32")
        assert block.convs[0].compute_dtype == block.compute_dtype
        assert block.convs[0].kernel.dtype == "float32"


def test_aux_loss_weights():
    assert aux_loss_weights(0) == {"segmentation": 1.0}
    w = aux_loss_weights(3)
    assert list(w) == ["segmentation", "aux_1", "aux_2", "aux_3"]
    np.testing.assert_allclose([w[k] for k in w], [8 / 15, 4 / 15, 2 / 15, 1 / 15])
    with pytest.raises(ValueError, match="n_aux"):
        aux_loss_weights(-1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shape=(24, 32, 32, 1)), r"input_shape=\(24, 32, 32, 1\).*divisible by 16"),
        (dict(input_shape=(None, 40, None, 1)), r"size 40 on axis 1"),
        (dict(input_shape=(32, 32, 32, None)), r"channel count"),
        (dict(input_shape=(32, 32, 1)), r"\(D, H, W, C\)"),
        (dict(num_classes=1), r"num_classes"),
        (dict(aux_outputs=4), r"aux_outputs"),
        (dict(encoder_depths=(1, 2, 3)), r"encoder_depths"),
        (dict(dropout=1.0), r"dropout"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_three_level_network_needs_multiples_of_4():
    model = build_model((12, 12, 12, 1), num_classes=3, filters=(4, 8, 16),
                        encoder_depths=(1, 1, 1), decoder_depths=(1, 1))
    assert tuple(model.output.shape) == (None, 12, 12, 12, 3)


def test_block_config_round_trip_and_bad_args():
    block = Block(8, 2, bn_momentum=0.9, name="b")
    clone = Block.from_config(block.get_config())
    assert (clone.filters, clone.depth, clone.bn_momentum, clone.name) == (8, 2, 0.9, "b")
    with pytest.raises(ValueError, match="depth"):
        Block(8, 0)


def test_keras_round_trip_identical_predictions(tmp_path):
    model = build_model((16, 16, 16, 1), num_classes=4, aux_outputs=1)
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 16, 1)).astype("float32")
    # The helper moves every weight (BatchNorm statistics included) off its initial value,
    # so loading them is tested; no custom_objects: the classes are registered.
    loaded = run_saving_test(model, x, tmp_path)
    assert sorted(loaded(x, training=False)) == ["aux_1", "segmentation"]
    assert loaded.count_params() == model.count_params()
    assert isinstance(loaded.get_layer("dec_block_2"), Block)


# Every custom layer of tf_explog/layers.py (RandomAffine3D: tests/test_augmentation.py), on
# an input it accepts: (build, input shape).
LAYERS = {
    "block": (lambda: Block(5, 2, bn_momentum=0.9, name="block"), (2, 16, 16, 8, 3)),
    "size_check": (lambda: SpatialSizeCheck(8, name="size_check"), (1, 16, 8, 24, 2)),
    "upsampling": (lambda: LinearUpsampling3D(4, name="upsampling"), (1, 4, 2, 3, 2)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_custom_layer_saves_and_loads(name, tmp_path):
    build, shape = LAYERS[name]
    x = np.random.default_rng(5).normal(size=shape).astype("float32")
    layer = build()
    loaded = run_saving_test(layer, x, tmp_path)
    again = loaded.get_layer(name)
    assert type(again) is type(layer) and plain_config(again) == plain_config(layer)
    if name == "size_check":
        assert again.divisor == 8
        with pytest.raises(ValueError, match="multiples of 8"):
            again(np.zeros((1, 16, 12, 24, 2), "float32"))
    if name == "upsampling":
        assert loaded.output.shape == (None, 16, 8, 12, 2)


@pytest.mark.parametrize("name", LAYERS)
def test_custom_layer_under_mixed_precision(name):
    build, shape = LAYERS[name]
    x = np.random.default_rng(6).normal(size=shape).astype("float32")
    # Output in the compute dtype (float16 / bfloat16), within rounding of float32's.
    run_precision_test(build, x)


@pytest.mark.slow
def test_aux_model_trains_with_dict_losses():
    rng = np.random.default_rng(2)
    n, size, classes = 2, 16, 3
    labels = np.zeros((n, size, size, size), "int32")
    labels[:, 4:12, 4:12, 4:12] = 1
    labels[:, 6:9, 6:9, 6:9] = 2
    images = (labels[..., None] + 0.3 * rng.normal(size=labels.shape + (1,))).astype("float32")
    model = build_model((size, size, size, 1), num_classes=classes, aux_outputs=True,
                        noise_std=0.0)
    names = output_names(model)
    targets = {"segmentation": labels}
    for k in (1, 2, 3):
        f = 2**k
        targets[f"aux_{k}"] = labels[:, ::f, ::f, ::f]  # strided nearest downsampling
    model.compile(
        optimizer=keras.optimizers.Nadam(1e-3),
        loss={name: "sparse_categorical_crossentropy" for name in names},
        loss_weights=aux_loss_weights(3),
        metrics={"segmentation": [PerLabelDice(classes, name="seg_dice")]},
        # Eager: tracing this 4-output graph costs ~30 s on the shared 2-core CPU; the
        # graph path of compile/fit/evaluate is exercised in tests/test_metrics.py.
        run_eagerly=True,
    )
    history = model.fit(images, targets, batch_size=1, epochs=1, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    for key in ("loss", "segmentation_loss", "aux_1_loss", "aux_3_loss", "seg_dice",
                "seg_dice_1", "seg_dice_2"):
        assert key in logs and np.isfinite(logs[key]), (key, logs)


@pytest.mark.slow
def test_forward_and_train_step_under_jax_without_tensorflow():
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import keras
        from tf_explog.models import build_model
        from tf_explog.metrics import PerLabelDice
        # A 3-level variant of the same code (Block, heads, metric, loss): JAX compiles every
        # initializer shape with XLA, and the 5-level network takes ~60 s to build on 2 cores.
        model = build_model((16, 16, 16, 1), num_classes=3, filters=(4, 8, 16),
                            encoder_depths=(1, 2, 1), decoder_depths=(2, 1), aux_outputs=True)
        x = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)).astype("float32")
        y = model(x, training=False)
        labels = np.zeros((1, 16, 16, 16), "int32"); labels[:, 4:12, 4:12, 4:12] = 1
        try:
            from tf_explog.losses import ExpLogLoss
            loss = ExpLogLoss()
        except ImportError:
            loss = "sparse_categorical_crossentropy"
        model.compile("nadam", loss={k: loss for k in y},
                      metrics={"segmentation": [PerLabelDice(3)]})
        targets = {"segmentation": labels}
        targets["aux_1"] = labels[:, ::2, ::2, ::2]
        logs = model.train_on_batch(x, targets, return_dict=True)
        print(json.dumps({
            "backend": keras.backend.backend(),
            "shapes": {k: list(v.shape) for k, v in y.items()},
            "dtypes": {k: str(v.dtype) for k, v in y.items()},
            "loss": float(logs["loss"]),
            "dice_keys": sorted(k for k in logs if k.startswith("dice")),
            "tensorflow_imported": "tensorflow" in sys.modules,
        }))
        """
    )
    # Cheaper XLA compiles: this checks portability, not speed.
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "jax"
    assert out["tensorflow_imported"] is False
    assert out["shapes"]["segmentation"] == [1, 16, 16, 16, 3]
    assert out["shapes"]["aux_1"] == [1, 8, 8, 8, 3]
    assert set(out["dtypes"].values()) == {"float32"}
    assert np.isfinite(out["loss"])
    assert out["dice_keys"] == ["dice", "dice_1", "dice_2"]


def test_random_affine_is_reexported_lazily():
    augmentation = pytest.importorskip("tf_explog.augmentation")
    import tf_explog.layers

    assert tf_explog.layers.RandomAffine3D is augmentation.RandomAffine3D


@pytest.mark.slow
def test_import_tf_explog_is_enough_to_load_a_saved_model(tmp_path):
    """A fresh interpreter that only imports tf_explog loads a model with custom layers."""
    import subprocess
    import sys

    model = build_model(num_classes=3, filters=(4, 4, 4, 4, 4), encoder_depths=(1,) * 5,
                        decoder_depths=(1,) * 4)
    path = tmp_path / "m.keras"
    model.save(str(path))
    script = ("import keras, numpy as np, tf_explog\n"
              f"m = keras.saving.load_model({str(path)!r})\n"
              "print(m.predict(np.zeros((1, 16, 16, 16, 1), 'float32'), verbose=0).shape)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1, 16, 16, 16, 3)" in result.stdout


def test_sizes_not_multiple_of_16_get_a_clear_error():
    from tf_explog.errors import InputError

    model = build_model(num_classes=3, filters=(4, 4, 4, 4, 4), encoder_depths=(1,) * 5,
                        decoder_depths=(1,) * 4)
    with pytest.raises(InputError, match=r"20 \(axis 1\).*multiples of 16.*pad"):
        model.predict(np.zeros((1, 20, 16, 16, 1), "float32"), verbose=0)
    assert model.predict(np.zeros((1, 16, 32, 16, 1), "float32"), verbose=0).shape == (
        1, 16, 32, 16, 3)
