"""What the console shows: one short line per epoch, and no native log noise.

- :func:`epoch_line` formats an epoch's logs as one line (loss, mean Dice, validation Dice
  with the best so far, time); per-structure figures go to TensorBoard and ``metrics.csv``.
- :class:`NativeLogFilter` drops the log lines TensorFlow and XLA write from C++ straight to
  the process's stderr (``I0000 … port.cc: oneDNN custom operations are on``, ``E0000 …
  cuInit``, ``WARNING: All log messages before absl::InitializeLog()``): they bypass
  ``TF_CPP_MIN_LOG_LEVEL`` when written before absl is initialised, so only a filter on file
  descriptor 2 removes them. The command line uses it unless ``--verbose``.

Standard library only.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
from typing import Mapping, Optional

__all__ = ["epoch_line", "NativeLogFilter", "NATIVE_LOG_LINE"]

#: Lines of TensorFlow / XLA / absl native logging (and the CPU-feature notice's 2nd line).
NATIVE_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} \d+:\d+:\d+\.\d+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions: .* rebuild TensorFlow)")


def _fmt(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def epoch_line(epoch: int, epochs: Optional[int], logs: Mapping, best: Optional[tuple] = None,
               monitor: str = "val_dice") -> str:
    """``epoch 3/40  loss 0.9120  dice 0.6130  val_dice 0.6420 (best 0.6600 @2)  12.3 s  val 1.2 s``.

    Args:
        epoch: the epoch, 0-based (shown 1-based).
        epochs: the total, or None.
        logs: the epoch's logs (``loss``, ``dice``, ``val_loss``, ``val_dice``,
            ``epoch_seconds`` (training), ``time_validation`` and ``time_recalibration``
            are shown when present).
        best: ``(value, epoch 0-based)`` of the best ``monitor`` so far, or None.
        monitor: the key ``best`` refers to.
    """
    parts = [f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")]
    for key in ("loss", "dice", "val_loss", "val_dice"):
        if key in logs:
            text = f"{key} {_fmt(logs[key])}"
            if key == monitor and best is not None:
                text += f" (best {_fmt(best[0])} @{best[1] + 1})"
            parts.append(text)
    if "epoch_seconds" in logs:
        parts.append(f"{float(logs['epoch_seconds']):.1f} s")
    if "time_validation" in logs:
        # Validation's own cost (BatchNorm recalibration beside it), apart from training's.
        text = f"val {float(logs['time_validation']):.1f} s"
        if "time_recalibration" in logs:
            text += f" (+ BN {float(logs['time_recalibration']):.1f} s)"
        parts.append(text)
    return "  ".join(parts)


class NativeLogFilter:
    """Within the block, lines written to file descriptor 2 that match
    :data:`NATIVE_LOG_LINE` are dropped; everything else reaches stderr unchanged.

    A pipe replaces descriptor 2 and a thread copies its lines to the original stderr. On
    exit the original descriptor is restored and the thread drained.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._saved: Optional[int] = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "NativeLogFilter":
        if not self.enabled:
            return self
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            read, write = os.pipe()
            os.dup2(write, 2)
            os.close(write)
        except OSError:  # no real descriptor 2 (embedded interpreters): leave it alone
            self._saved = None
            return self
        self._thread = threading.Thread(target=self._pump, args=(read, os.dup(self._saved)),
                                        daemon=True, name="tf_explog-native-log-filter")
        self._thread.start()
        return self

    @staticmethod
    def _pump(read: int, out: int) -> None:
        with os.fdopen(read, "rb") as source, os.fdopen(out, "wb", buffering=0) as sink:
            for line in source:
                if not NATIVE_LOG_LINE.match(line.decode("utf-8", "replace")):
                    sink.write(line)

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump sees EOF
            os.close(self._saved)
            self._saved = None
            if self._thread is not None:
                self._thread.join(timeout=5)
