import os

# Quiet TensorFlow's C++ logging and pin the backend: tests that need JAX start a subprocess.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
