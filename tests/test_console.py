"""The console: one short line per epoch, and TensorFlow's native log lines filtered out."""

import re
import subprocess
import sys

import pytest
import yaml

from tf_explog import cli
from tf_explog.console import epoch_line
from tf_explog.data.synthetic import generate_dataset


def test_epoch_line_is_short_and_shows_the_best_so_far():
    logs = {"loss": 0.91234, "dice": 0.6131, "val_dice": 0.642, "val_loss": 0.8,
            "val_dice_cortex": 0.9, "epoch_seconds": 12.34}
    assert epoch_line(2, 40, logs, best=(0.66, 1)) == (
        "epoch 3/40  loss 0.9123  dice 0.6131  val_loss 0.8000  "
        "val_dice 0.6420 (best 0.6600 @2)  12.3 s")


def test_epoch_line_says_how_long_validation_took():
    logs = {"loss": 0.5, "val_dice": 0.7, "epoch_seconds": 3.04, "time_validation": 1.26,
            "time_recalibration": 0.44}
    assert epoch_line(0, 2, logs) == (
        "epoch 1/2  loss 0.5000  val_dice 0.7000  3.0 s  val 1.3 s (+ BN 0.4 s)")
    del logs["time_recalibration"]
    assert epoch_line(0, 2, logs).endswith("  3.0 s  val 1.3 s")


def test_native_log_lines_are_dropped_and_the_rest_kept():
    script = (
        "import os, sys\n"
        "from tf_explog.console import NativeLogFilter\n"
        "with NativeLogFilter():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called "
        "are written to STDERR\\n')\n"
        "    os.write(2, b'I0000 00:00:1796398569.929601   19239 port.cc:153] oneDNN on\\n')\n"
        "    os.write(2, b'E0000 00:00:1796398525.033060   19147 cuda_platform.cc:52] cuInit\\n')\n"
        "    os.write(2, b'kept: a real error\\n')\n"
        "    print('also kept', file=sys.stderr)\n"
        "os.write(2, b'I0000 00:00:1.0   1 after.cc:1] shown once the filter is off\\n')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "kept: a real error", "also kept",
        "I0000 00:00:1.0   1 after.cc:1] shown once the filter is off"]


@pytest.mark.slow
def test_train_prints_one_short_line_per_epoch(tmp_path, capsys):
    generate_dataset(tmp_path / "data", subjects=4, test_subjects=1, shape=16, verbose=False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "c", "runs_dir": "runs",
        "data": {"dataset": "data/dataset.json", "validation_fraction": 0.25,
                 "preprocess": {"target_shape": 16}, "augment": {"enabled": False}},
        "model": {"filters": [4, 4, 4, 4, 4], "encoder_depths": [1, 1, 1, 1, 1],
                  "decoder_depths": [1, 1, 1, 1]},
        "train": {"epochs": 2, "verbose": 1, "image_summary_every": 0}}))
    capsys.readouterr()
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    epochs = [line for line in out if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    assert all(len(line) < 120 and "val_dice" in line for line in epochs), epochs
    # Validation's time beside training's (BatchNorm recalibration is on by default).
    assert all(re.search(r"  \d+\.\d s  val \d+\.\d s \(\+ BN \d+\.\d s\)$", line)
               for line in epochs), epochs
    assert not any("dice_cortex" in line for line in out)  # per structure: TensorBoard, CSV
