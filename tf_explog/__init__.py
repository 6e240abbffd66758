"""tf_explog: 3D segmentation with the exponential logarithmic loss (Wong et al., MICCAI 2018).

Submodules are imported lazily so that ``import tf_explog.losses`` (and models, layers,
metrics) works where TensorFlow is not installed, e.g. on the JAX backend.
"""

import importlib

__version__ = "0.1.0"

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
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "build_model":
        return importlib.import_module(f"{__name__}.models").build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | {"build_model"})
