"""Packaging for tf_explog (distribution name ``tf-explog``)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "tf_explog" / "__init__.py").read_text()
).group(1)

setup(
    name="tf-explog",
    version=VERSION,
    description=(
        "3D segmentation with the exponential logarithmic loss "
        "(Wong et al., MICCAI 2018) for TensorFlow/Keras"
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    # train_configs/ ships inside the package as tf_explog.train_configs, so `tf-explog demo`
    # (and tf_explog.config.packaged_config) work from a non-editable install too.
    packages=find_packages(include=["tf_explog", "tf_explog.*"]) + ["tf_explog.train_configs"],
    package_dir={"tf_explog.train_configs": "train_configs"},
    package_data={"tf_explog.train_configs": ["*.yaml", "*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21",
        "keras>=3.15",
        "numpy",
        "nibabel",
        "scipy",
        # Otsu threshold for the head crop (tf_explog.data.preprocess.head_mask).
        "scikit-image",
        # TensorFlow 2.21 no longer pulls TensorBoard in; keras.callbacks.TensorBoard needs it.
        "tensorboard",
        "PyYAML",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "pytest",
            # The JAX backend is how GPU checks run, and the tests prove the losses agree on it.
            "jax[cpu]",
            "nbclient",
            "nbformat",
            "ipykernel",
            # The gRPC client (tf_explog.serving) is tested against an in-process server.
            "tensorflow-serving-api",
        ],
        "jax": ["jax"],
        # GPUs (Linux, NVIDIA driver installed): CUDA and cuDNN come as pip wheels.
        "gpu": ["tensorflow[and-cuda]>=2.21"],
        "jax-gpu": ["jax[cuda12]"],
        "jax-cuda13": ["jax[cuda13]"],
        # Opens examples/quickstart.ipynb (`make notebook`).
        "notebook": ["notebook", "ipykernel"],
        "serving": ["tensorflow-serving-api"],
    },
    entry_points={"console_scripts": ["tf-explog=tf_explog.cli:main"]},
)
