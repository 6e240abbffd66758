"""Data path: NIfTI I/O and geometry, preprocessing, manifests, synthetic phantoms, tf.data.

Only ``pipeline`` needs TensorFlow; it is imported lazily so the rest works without it.
"""

import importlib

_SUBMODULES = {"nifti", "preprocess", "synthetic", "manifest", "cache", "pipeline", "pydataset",
               "core", "sampling", "label_synthesis", "layout"}
_LAZY = {
    "split_volumes": "core",
    "clean_batches": "core",
    "SplitVolumes": "core",
    "invert_labels": "preprocess",
    "SplitSampler": "sampling",
    "make_dataset": "pipeline",
    "VolumeSequence": "pydataset",
    "Manifest": "manifest",
    "Preprocessor": "preprocess",
    "load_volume": "nifti",
    "save_like": "nifti",
    "label_frequencies": "manifest",
    "generate_dataset": "synthetic",
    "synthesize_from_label_maps": "label_synthesis",
    "init_dataset": "layout",
    "check_dataset": "layout",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
