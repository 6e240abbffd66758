import os

import pytest

# Quiet TensorFlow's C++ logging and pin the backend: tests that need JAX start a subprocess.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# As tf_explog/__init__.py does (oneDNN CPU kernels, ~4x faster on AVX2-only CPUs); set
# here too because keras (and so TensorFlow) may be imported before tf_explog.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Shared data sets (the writers are in helpers.py, importable by subprocesses too). Session
# fixtures are written once and must not be modified by a test: copy them first.


@pytest.fixture(scope="session")
def two_structure_dataset(tmp_path_factory):
    """dataset.json of 6 cases of 32³ (a big and a small sphere, labels 1 and 2)."""
    from helpers import write_two_structure_dataset

    return write_two_structure_dataset(tmp_path_factory.mktemp("two_structures"))


@pytest.fixture(scope="session")
def msd_dataset(tmp_path_factory):
    """Factory: ``msd_dataset(training, label_names, *, folder=None, test=(), name="toy",
    **extra)`` writes `helpers.write_msd_dataset` (``(stem, image, labels, affine)`` cases)
    into a fresh folder (named ``folder``, else ``name``); returns its dataset.json."""
    from helpers import write_msd_dataset

    def make(training, label_names, *, folder=None, **kwargs):
        root = tmp_path_factory.mktemp(folder or kwargs.get("name", "toy"))
        return write_msd_dataset(root, training, label_names, **kwargs)

    return make
