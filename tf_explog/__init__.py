"""tf_explog: 3D segmentation with the exponential logarithmic loss (Wong et al., MICCAI 2018).

Importing the package imports Keras and registers the package's custom objects; the other
submodules are imported lazily, and nothing here imports TensorFlow, so ``import tf_explog``
(and losses, models, layers, metrics) works where TensorFlow is not installed, e.g. on the
JAX backend.
"""

import importlib
import os as _os
import sys as _sys

__version__ = "0.1.0"

if "tensorflow" not in _sys.modules:
    # TensorFlow turns its oneDNN CPU kernels on by itself only where the CPU has
    # AVX512-VNNI/BF16 or AMX. On a 2-core AMD EPYC with AVX2 only, turning them on made a
    # 48^3 training step of the paper network 4.7x faster (1.93 s -> 0.41 s). A value the
    # user set is kept; it must be set before TensorFlow is imported to matter.
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Importing the package registers every custom Keras object (layers, losses, metrics,
# augmentation), so `import tf_explog; keras.saving.load_model("best.keras")` works without
# custom_objects. These modules need Keras only (never TensorFlow itself), but Keras imports
# TensorFlow when it is its backend, whose C++ start-up lines (oneDNN, CUDA, CPU features)
# bypass TF_CPP_MIN_LOG_LEVEL: on a plain terminal they are dropped during this import
# (TF_EXPLOG_NATIVE_LOGS=1 keeps them; notebooks and captured streams are left alone).
from tf_explog.console import NativeLogFilter as _NativeLogFilter  # noqa: E402

with _NativeLogFilter(enabled=_sys.stderr is _sys.__stderr__
                      and not _os.environ.get("TF_EXPLOG_NATIVE_LOGS")):
    from tf_explog import augmentation as _augmentation  # noqa: E402,F401
    from tf_explog import layers as _layers  # noqa: E402,F401
    from tf_explog import losses as _losses  # noqa: E402,F401
    from tf_explog import metrics as _metrics  # noqa: E402,F401

_SUBMODULES = {
    "losses",
    "metrics",
    "layers",
    "models",
    "data",
    "training",
    "inference",
    "export",
    "evaluation",
    "experiments",
    "config",
    "augmentation",
    "builders",
    "batchnorm",
    "callbacks",
    "errors",
    "plots",
    "folding",
    "comparison",
    "runs",
    "summaries",
    "serving",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "build_model":
        return importlib.import_module(f"{__name__}.models").build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | {"build_model"})
