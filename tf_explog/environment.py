"""What a run was computed with: software versions and the device, for ``run.json``.

- :func:`device_description` names what the Keras backend trains on ("GPU: NVIDIA H100 80GB
  HBM3" or "CPU: AMD EPYC 7B13, 2 cores"), for the run's first console line and ``run.json``.
- :func:`environment` adds the versions of the package, Keras, the backend, NumPy and Python.
- :func:`command_line` is the command that started the process, as one shell line.

TensorFlow or JAX is imported only when it is the Keras backend (the backend has loaded it
anyway); nothing here fails when a library is absent: it says "not installed".
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

import keras

__all__ = ["command_line", "cpu_name", "device_description", "environment", "tool_command"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what `platform` knows)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return name or "unknown CPU"


def _accelerators() -> list:
    """Names of the accelerators the Keras backend sees (empty: it trains on the CPU)."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            names = []
            for gpu in tf.config.list_physical_devices("GPU"):
                details = tf.config.experimental.get_device_details(gpu) or {}
                names.append(str(details.get("device_name") or gpu.name))
            return names
        if backend == "jax":
            import jax

            return [str(d.device_kind) for d in jax.devices() if d.platform != "cpu"]
    except Exception:  # a broken driver must not stop a run from recording itself
        return []
    return []


def device_description(accelerators: Optional[list] = None) -> str:
    """``"GPU: <name>"`` (``"2x GPU: <name>"`` for several of one kind) or ``"CPU: <model>,
    <n> cores"``: what the Keras backend computes on."""
    names = _accelerators() if accelerators is None else list(accelerators)
    if not names:
        return f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    if len(set(names)) == 1:
        return f"{len(names)}x GPU: {names[0]}" if len(names) > 1 else f"GPU: {names[0]}"
    return "GPUs: " + ", ".join(names)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def environment() -> dict:
    """Versions and device, as ``run.json`` records them under ``"environment"``."""
    import numpy as np

    import tf_explog

    backend = keras.backend.backend()
    backend_version = {"tensorflow": _version("tensorflow"), "jax": _version("jax"),
                       "torch": _version("torch")}.get(backend, "unknown")
    return {
        "tf_explog": tf_explog.__version__,
        "keras": keras.__version__,
        "backend": backend,
        "backend_version": backend_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_description(),
        "executable": sys.executable,
    }


def command_line(argv=None) -> str:
    """The command that started this process, as one shell line (``tf-explog train ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("cli.py", "__main__.py")):
        argv[0] = "tf-explog"
    elif argv:
        argv[0] = Path(argv[0]).name
    return " ".join(shlex.quote(str(a)) for a in argv)


def tool_command(name: str) -> str:
    """How to call a tool of this environment (``tf-explog``, ``tensorboard``) from a new
    shell: ``name`` when that is what the PATH finds (an activated venv), else the path of
    the one beside this Python (``.venv/bin/name``, relative to the working directory when
    below it)."""
    script = Path(sys.executable).parent / name
    if not script.exists() or shutil.which(name) == str(script):
        return name
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def environment_line() -> str:
    """CPU model, cores and library versions, one line (for reports)."""
    return (f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, Keras "
            f"{keras.__version__} on {keras.backend.backend()}")
