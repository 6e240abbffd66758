"""The loss comparison (`reproduce`) and the demo, end to end at a tiny size."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from tf_explog import cli, experiments

TINY_TRAIN = {
    "name": "tiny", "seed": 0, "runs_dir": "runs",
    "data": {"dataset": "data/dataset.json", "validation_fraction": 0.34,
             "preprocess": {"target_shape": 16}, "augment": {"enabled": False}},
    "model": {"filters": [4, 4, 4, 4, 4], "encoder_depths": [1, 1, 1, 1, 1],
              "decoder_depths": [1, 1, 1, 1]},
    "train": {"epochs": 1, "batch_size": 1, "verbose": 0, "image_summary_every": 0},
}


@pytest.fixture(scope="module")
def reproduce_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    (root / "train.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    (root / "reproduce.yaml").write_text(yaml.safe_dump(sort_keys=False, data={
        "name": "tiny_comparison", "train_config": "train.yaml", "out_dir": "report",
        "synthetic": {"out": "data", "subjects": 3, "test_subjects": 2, "shape": 16},
        "reference_arm": "exp_log_g0.3", "splits": 2,
        "arms": {"linear_dice": {"loss": "linear_dice"},
                 "exp_log_g0.3": {"loss": "exp_log",
                                  "params": {"gamma_dice": 0.3, "gamma_cross": 0.3}}},
    }))
    report = experiments.reproduce(root / "reproduce.yaml")
    return root, report


@pytest.mark.slow
def test_reproduce_writes_every_report_file(reproduce_dir):
    root, report = reproduce_dir
    out = root / "report"
    assert report == out / "report.md"
    for name in ("report.md", "per_subject.csv", "convergence.png", "dice_by_structure.png"):
        assert (out / name).is_file(), name
    for name in ("convergence.png", "dice_by_structure.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = table[0]
    assert header == "| structure | fraction | group | linear_dice | exp_log_g0.3 |"
    labels = json.loads((root / "data" / "dataset.json").read_text())["labels"]
    structure_rows = table[1:1 + len(labels) - 1]
    assert len(structure_rows) == len(labels) - 1  # every structure, background excluded
    fractions = [float(r.split("|")[2].strip().rstrip("%")) for r in structure_rows]
    assert fractions == sorted(fractions, reverse=True)  # sorted by size
    assert {r.split("|")[3].strip() for r in structure_rows} == {"small", "medium", "large"}
    assert all(r.count("**") >= 2 for r in structure_rows)  # a best entry in bold per row
    summary = [r for r in table if r.startswith("| linear_dice |") or
               r.startswith("| exp_log_g0.3 |")]
    assert len(summary) == 2
    assert "with background" in text and "Forward pass alone" in text
    with open(out / "per_subject.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 arms x 2 splits x 2 test subjects x 19 structures
    assert len(rows) == 2 * 2 * 2 * (len(labels) - 1)
    assert {r["arm"] for r in rows} == {"linear_dice", "exp_log_g0.3"}
    assert {r["split"] for r in rows} == {"0", "1"}


@pytest.mark.slow
def test_splits_repartition_without_leaks(reproduce_dir):
    root, _ = reproduce_dir
    own = json.loads((root / "data" / "dataset.json").read_text())
    other = json.loads((root / "report" / "splits" / "split_1" / "dataset.json").read_text())
    name = lambda e: Path(e["label"]).name  # noqa: E731
    assert len(other["test"]) == len(own["test"]) == 2
    assert len(other["training"]) == len(own["training"])
    assert {name(e) for e in other["test"]}.isdisjoint({name(e) for e in other["training"]})
    assert {name(e) for e in other["test"]} != {name(e) for e in own["test"]}
    assert other["labels"] == own["labels"]
    for arm in ("linear_dice", "exp_log_g0.3"):
        done = json.loads((root / "report" / "runs" / "split_1" / arm / "DONE.json").read_text())
        assert sorted(done["test_subjects"]) == sorted(
            name(e).split(".nii")[0] for e in other["test"])
        assert 0 <= done["evaluation"]["dice_mean_with_background"] <= 1


@pytest.mark.slow
def test_reproduce_skips_finished_arms(reproduce_dir, capsys):
    root, report = reproduce_dir
    before = {p: p.stat().st_mtime_ns for p in (root / "report" / "runs").rglob("*.keras")}
    experiments.reproduce(root / "reproduce.yaml")
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 4
    after = {p: p.stat().st_mtime_ns for p in (root / "report" / "runs").rglob("*.keras")}
    assert before == after


@pytest.mark.slow
def test_failed_arm_is_reported_not_fatal(reproduce_dir, monkeypatch, capsys):
    root, _ = reproduce_dir
    real = experiments.run_arm

    def flaky(config, run_dir, *args):
        if run_dir.name == "linear_dice":
            raise RuntimeError("simulated failure")
        return real(config, run_dir, *args)

    monkeypatch.setattr(experiments, "run_arm", flaky)
    report = experiments.reproduce(root / "reproduce.yaml", out_dir=root / "report")
    text = report.read_text()
    assert "## Failed runs" in text and "simulated failure" in text
    assert "| structure | fraction | group | exp_log_g0.3 |" in text
    # the command line writes the same report, then fails: a failed arm is never exit 0
    capsys.readouterr()
    assert cli.main(["reproduce", "--config", str(root / "reproduce.yaml"), "--out",
                     str(root / "report")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tf-explog reproduce: error: "), err
    assert "arm linear_dice" in err[0] and "simulated failure" in err[0], err[0]
    assert str(report) in err[0] and "## Failed runs" in report.read_text()


def test_reproduce_config_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump({"arms": {"a": {"loss": "exp_log"}}, "reference_arm": "b"}))
    with pytest.raises(ValueError, match="reference_arm"):
        experiments.reproduce(bad)
    bad.write_text(yaml.safe_dump({"arms": {"a": {"los": "exp_log"}}, "reference_arm": "a"}))
    with pytest.raises(ValueError, match="arms.a.los"):
        experiments.reproduce(bad)


def test_shipped_reproduce_configs_parse():
    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "train_configs").glob("reproduce_*.yaml")):
        config, base = experiments.load_reproduce_config(path)
        assert config.reference_arm in config.arms
        for name, arm in config.arms.items():
            experiments._arm_train_config(config, base, name, arm)


@pytest.mark.slow
def test_demo_tiny_end_to_end_from_a_non_editable_install(tmp_path):
    """`tf-explog demo` from a wheel installed elsewhere: its config comes with the package,
    its outputs go to the working directory (not the source tree or site-packages)."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(repo)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    assert "tf_explog/train_configs/demo.yaml" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    script = ("import sys, tf_explog, tf_explog.cli as cli; "
              f"assert tf_explog.__file__.startswith({str(site)!r}), tf_explog.__file__; "
              "sys.exit(cli.main(['demo', '--tiny']))")
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], cwd=work, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "mean test Dice" in result.stdout
    (run_dir,) = (work / "runs" / "demo_tiny").iterdir()
    assert list((run_dir / "test_predictions").glob("*.nii.gz"))
    assert list((work / "saved_models" / "demo_tiny").glob("*/saved_model.pb"))
    # the run records itself: versions, device and results; epochs numbered from 1
    info = json.loads((run_dir / "run.json").read_text())
    env = info["environment"]
    for key in ("tf_explog", "keras", "backend", "backend_version", "numpy", "device"):
        assert env[key] and env[key] != "not installed", (key, env)
    assert info["status"] == "finished" and info["epochs_trained"] == 1
    assert info["best"]["epoch"] == 1 and 0.0 <= info["best"]["value"] <= 1.0
    assert info["duration_s"] > 0 and "val_dice" in info["final_metrics"]
    assert (run_dir / "metrics.csv").read_text().splitlines()[1].startswith("1,")
    # the full evaluation, naming the checkpoint it evaluated
    (report,) = (work / "reports").rglob("report.md")
    for name in ("metrics.csv", "summary.csv", "dice_boxplot.png"):
        assert (report.parent / name).is_file(), name
    assert (report.parent / "dice_boxplot.png").read_bytes()[:4] == b"\x89PNG"
    assert f"Evaluated checkpoint: `{run_dir / 'checkpoints' / 'best.keras'}`" in (
        report.read_text())
    # the run's first line names the device it trains on
    first = next(line for line in result.stdout.splitlines() if line.startswith("[tf_explog] run"))
    assert 'device="CPU: ' in first or 'device="GPU: ' in first, first
