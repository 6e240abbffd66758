"""The package's exceptions, all derived from :class:`TfExplogError`.

- :class:`InputError` (also a ``ValueError``): bad input from the user — a config value, a
  file, a data set, an option. Its message names the file or field and what was expected.
  The command line prints it as one line and exits with status 2.
- :class:`EnvironmentFault` (also an ``InputError``): the system refused a write or read for a
  reason the user fixes (a full disk or quota, a read-only file system, no permission); the
  message names the path and what to do. Exit status 2.
- :class:`NonFiniteError` (also a ``RuntimeError``): training produced NaN or Inf. The
  command line prints it as one line and exits with status 1.
- :class:`RunsFailed`: some runs of a batch (``reproduce``'s arms) failed; the report of
  the others was written. The command line prints it as one line and exits with status 1.

Anything else that escapes is a bug, reported with its traceback.
"""

from __future__ import annotations

__all__ = ["TfExplogError", "InputError", "EnvironmentFault", "NonFiniteError",
           "RunsFailed", "InferenceError", "ModelNotFoundError", "EvaluationError"]


class TfExplogError(Exception):
    """Base class of every exception tf_explog defines."""


class InputError(TfExplogError, ValueError):
    """Bad input (config, file, data set or option); the message names it."""


class EnvironmentFault(InputError):
    """A full disk, a read-only file system or a permission refused; the message says where
    and what to do."""


class InferenceError(InputError):
    """Bad input to inference (model, image or file); the message names the culprit."""


class ModelNotFoundError(InferenceError, FileNotFoundError):
    """The model path (run directory or ``.keras`` file) does not exist."""


class EvaluationError(InputError):
    """Bad evaluation input: mismatched grids, unmatched files, invalid label volumes."""


class NonFiniteError(TfExplogError, RuntimeError):
    """A loss, metric or weight became NaN or Inf during training."""


class RunsFailed(TfExplogError, RuntimeError):
    """Some runs of a batch failed (each reported); the message says which and where."""
