"""The architecture's rules (ARCHITECTURE.md), checked on the source: one-way hand-offs, the
TensorFlow-free modules import without TensorFlow, one owner per fact."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tf_explog"

TENSORFLOW_FREE = [
    "tf_explog.errors", "tf_explog.files", "tf_explog.labels", "tf_explog.config",
    "tf_explog.runs", "tf_explog.builders", "tf_explog.losses", "tf_explog.metrics",
    "tf_explog.layers", "tf_explog.models", "tf_explog.augmentation", "tf_explog.batchnorm",
    "tf_explog.callbacks", "tf_explog.inference", "tf_explog.evaluation", "tf_explog.plots",
    "tf_explog.comparison", "tf_explog.experiments", "tf_explog.cli", "tf_explog.serving",
    "tf_explog.console", "tf_explog.summaries", "tf_explog.training", "tf_explog.folding",
    "tf_explog.environment", "tf_explog.data.layout", "tf_explog.geometry",
    "tf_explog.sliding_window", "tf_explog.evaluation_metrics", "tf_explog.evaluation_report",
    "tf_explog.data.nifti", "tf_explog.data.manifest", "tf_explog.data.preprocess",
    "tf_explog.data.cache", "tf_explog.data.core", "tf_explog.data.sampling",
    "tf_explog.data.pydataset", "tf_explog.data.synthetic",
]


def _imports(path: Path) -> set:
    """Every tf_explog module a file imports (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("tf_explog")}


def _module_files():
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("reader", ["tf_explog.inference", "tf_explog.export",
                                    "tf_explog.evaluation", "tf_explog.experiments",
                                    "tf_explog.comparison", "tf_explog.distributed"])
def test_readers_of_a_run_do_not_import_the_trainer(reader):
    imported = _imports(_module_files()[reader])
    # experiments starts training runs, so it may call the trainer; it reads runs via Run
    allowed = {"tf_explog.training", "tf_explog.training.train"} if reader.endswith(
        "experiments") else set()
    assert not {m for m in imported if m.startswith("tf_explog.training")} - allowed


# The import layers of ARCHITECTURE.md, lowest first: a module imports only from its own
# layer or a lower one (counting imports inside functions), and no import chain is a cycle.
LAYERS = [
    ("foundation", ["errors", "files", "console", "environment", "geometry", "labels",
                    "plots", "serving"]),
    ("Keras parts", ["losses", "metrics", "layers", "models", "augmentation", "folding",
                     "sliding_window"]),
    ("data", ["data"]),
    ("config", ["config"]),
    ("run directory", ["runs"]),
    ("training callbacks", ["callbacks", "batchnorm", "summaries"]),
    ("setup", ["builders"]),
    ("training", ["training", "distributed"]),
    ("readers of a run", ["inference", "export", "evaluation", "evaluation_metrics",
                          "evaluation_report"]),
    ("workflows", ["experiments", "comparison"]),
    ("command line", ["cli"]),
]


def _layer_of(module: str) -> int:
    short = module.removeprefix("tf_explog.")
    for index, (_, members) in enumerate(LAYERS):
        if any(short == m or short.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS "
                         "(and ARCHITECTURE.md): place it")


def _graph() -> dict:
    """module -> the package modules it imports (top level or inside functions)."""
    files = _module_files()
    graph = {}
    for name, path in files.items():
        deps = set()
        for m in _imports(path):
            while m and m not in files:  # "tf_explog.x.name" -> the module "tf_explog.x"
                m = m.rpartition(".")[0]
            if m and m != name:
                deps.add(m)
        graph[name] = deps
    return graph


def _packages_and_init(name: str) -> bool:
    return name == "tf_explog" or name.endswith(".__init__") or name == "tf_explog.data"


def test_every_module_has_a_layer_and_imports_no_later_one():
    bad = []
    for name, deps in _graph().items():
        if _packages_and_init(name):
            continue  # the package's __init__ imports parts to register them
        for dep in deps:
            if not _packages_and_init(dep) and _layer_of(dep) > _layer_of(name):
                bad.append(f"{name} ({LAYERS[_layer_of(name)][0]}) imports {dep} "
                           f"({LAYERS[_layer_of(dep)][0]})")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict) -> list:
    """Every import cycle found by a depth-first walk, as "a -> b -> a"."""
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    graph = {k: {d for d in v if not _packages_and_init(d)} for k, v in _graph().items()
             if not _packages_and_init(k)}
    assert not _cycles(graph), _cycles(graph)


def test_the_checks_see_cycles_and_imports_inside_functions():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # builders imports the data core inside a function only: _imports must still see it.
    path = _module_files()["tf_explog.builders"]
    top_level = {n.module for n in ast.parse(path.read_text()).body
                 if isinstance(n, ast.ImportFrom)}
    assert "tf_explog.data.core" not in top_level
    assert "tf_explog.data.core" in _imports(path)


def test_data_does_not_import_later_stages():
    later = ("tf_explog.builders", "tf_explog.training", "tf_explog.distributed",
             "tf_explog.experiments", "tf_explog.export", "tf_explog.runs",
             "tf_explog.inference", "tf_explog.callbacks", "tf_explog.config")
    for name, path in _module_files().items():
        if name.startswith("tf_explog.data"):
            bad = {m for m in _imports(path) if m.startswith(later)}
            assert not bad, (name, bad)


def test_only_the_nifti_seam_uses_nibabel():
    users = sorted(name for name, path in _module_files().items()
                   if "nibabel" in {a.name.split(".")[0] for n in ast.walk(ast.parse(
                       path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
                       for a in (n.names if isinstance(n, ast.Import)
                                 else [ast.alias(n.module or "")])})
    assert users == ["tf_explog.data.nifti", "tf_explog.data.synthetic"], users


def test_tensorflow_free_modules_import_without_tensorflow():
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {TENSORFLOW_FREE!r}:\n"
        "    __import__(m)\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok')\n")
    env = {**__import__("os").environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
