"""The README works as written: its Python examples run, and its shell commands (quick start,
after the demo, your own data) run at a tiny size in a fresh shell with no activated venv."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Reference pages whose Python examples must run too (each in its own fresh process).
DOC_PAGES = [REPO / "docs" / "training.md"]


# The reference pages' blocks train small models (~1 min on 2 cores): slow; the README's stay.
@pytest.mark.parametrize("page", [README, *(pytest.param(p, marks=pytest.mark.slow)
                                            for p in DOC_PAGES)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no python example"
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, TF_EXPLOG_README_TEST="1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_readme_is_short_and_links_its_reference_pages():
    text = README.read_text()
    assert len(text.encode()) < 12_000
    for page in ("cli", "data", "training", "gpu", "results", "paper", "design", "reliability",
                 "performance", "real_anatomy"):
        assert f"(docs/{page}.md)" in text, page
    for page in ("cli", "data", "training", "gpu", "results", "paper", "design"):
        assert (REPO / "docs" / f"{page}.md").is_file(), page


def shell_commands(heading: str) -> list:
    """The commands of the ```sh block under ``## heading`` (comments dropped)."""
    section = README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_make_demo_installs_the_package_only_and_make_test_the_test_extra(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path)
    shutil.copy(REPO / "setup.py", tmp_path)
    assert shell_commands("Quick start") == ["make demo", "make test"]

    def dry(target):
        return subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True,
                              text=True, check=True).stdout

    demo, test = dry("demo"), dry("test")
    assert "pip install -q -e .\n" in demo and "[test]" not in demo
    assert "tf_explog.cli demo" in demo
    assert 'pip install -q -e ".[test]"' in test and "pytest" in test
    # `make test-fast` skips the slow-marked tests; `make test` (CI) runs them all.
    fast = dry("test-fast")
    assert 'pip install -q -e ".[test]"' in fast and '-m "not slow"' in fast
    assert "slow" not in test


# What the tiny demo names differently from the full one.
TINY = {"runs/demo/": "runs/demo_tiny/", "data/demo/": "data/demo_tiny/"}
TINY_TRAIN = ["--set", "train.epochs=1", "--set", "model.filters=[4,4,4,4,4]",
              "--set", "model.encoder_depths=[1,1,1,1,1]",
              "--set", "model.decoder_depths=[1,1,1,1]",
              "--set", "data.preprocess.target_shape=16", "--set", "train.image_summary_every=0"]


@pytest.mark.slow
def test_readme_commands_run_in_a_fresh_shell(tmp_path):
    """`make demo` (tiny), then every "after the demo" and "your own data" command, by the
    README's own words, in `bash` with a bare PATH: no activated venv, no tf-explog on it."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "Makefile", work)
    # A copy, not a link: demo.yaml's runs_dir (../runs) is relative to its real folder.
    shutil.copytree(REPO / "train_configs", work / "train_configs")
    # This test's venv stands for the one `make` creates (its install step is skipped below).
    (work / ".venv").symlink_to(Path(sys.prefix))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           "LANG": "C.UTF-8", "TF_EXPLOG_DEMO_TINY": "1"}
    assert not shutil.which("tf-explog", path=env["PATH"])

    def run(command, timeout=600):
        result = subprocess.run(["bash", "-c", command], cwd=work, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
        return result.stdout

    # Quick start: `make demo`, with the venv's install step taken as done.
    out = run("make -o .venv/.installed-base demo")
    assert "mean test Dice" in out
    (stamp,) = [p.name for p in (work / "runs" / "demo_tiny").iterdir()]
    # The demo's closing hints work in this shell as printed.
    hint = next(line for line in out.splitlines() if "segment scans:" in line)
    assert hint.split("segment scans:")[1].split()[0] == ".venv/bin/tf-explog"

    after = shell_commands("After the demo")
    assert after[0].startswith(".venv/bin/tf-explog") and any("tensorboard" in c for c in after)
    for command in after:
        for full, tiny in TINY.items():
            command = command.replace(full, tiny)
        command = command.replace("<stamp>", stamp)
        if "tensorboard" in command:
            # A server: --inspect reads the logs and exits. A venv made by `make` has the
            # tensorboard script; this test's venv may reach the package another way.
            if not (work / ".venv" / "bin" / "tensorboard").exists():
                command = command.replace(".venv/bin/tensorboard",
                                          ".venv/bin/python -m tensorboard.main")
            assert "demo_tiny" in run(command + " --inspect")
            continue
        run(command)
    assert len(list((work / "preds").glob("*.nii.gz"))) == 1
    for name in ("metrics.csv", "summary.csv", "report.md", "dice_boxplot.png"):
        assert (work / "eval" / name).is_file(), name
    assert (work / "saved_models" / "demo_tiny" / "2" / "saved_model.pb").is_file()

    # Your own data: two folders of images and labels (the demo's, renamed the usual way).
    images, labels = work / "my_data" / "images", work / "my_data" / "labels"
    shutil.copytree(work / "data" / "demo_tiny" / "imagesTr", images)
    labels.mkdir()
    for path in sorted((work / "data" / "demo_tiny" / "labelsTr").glob("*.nii.gz")):
        shutil.copy(path, labels / path.name.replace(".nii.gz", "_seg.nii.gz"))
    own = shell_commands("Your own data")
    assert [c.split()[1:3] for c in own] == [["dataset", "init"], ["dataset", "check"],
                                             ["train", "--config"]]
    run(own[0])
    assert "ok: my_data/dataset.json: 4 labelled case(s)" in run(own[1])
    run(" ".join([own[2], *TINY_TRAIN]))
    (run_dir,) = (work / "runs" / "demo").iterdir()  # demo.yaml's name, its runs_dir
    assert (run_dir / "checkpoints" / "best.keras").is_file()
