import os

# Quiet TensorFlow's C++ logging and pin the backend: tests that need JAX start a subprocess.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# As tf_explog/__init__.py does (oneDNN CPU kernels, ~4x faster on AVX2-only CPUs); set
# here too because keras (and so TensorFlow) may be imported before tf_explog.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
