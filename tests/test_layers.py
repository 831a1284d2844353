"""Layers point down: models/ never imports what imports models/, only main.py talks to Ray, and
indexing a dataset loads neither torch nor model code."""

import ast
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from preprocessing.demo_dataset import write_demo_dataset

PACKAGES = ("models", "utils", "preprocessing", "postprocessing", "example")


def module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for package in PACKAGES for p in sorted((REPO_ROOT / package).glob("*.py"))} | {
    "main": REPO_ROOT / "main.py"
}


def runtime_imports(path) -> set[str]:
    """Modules ``path`` imports when it runs (imports under ``if TYPE_CHECKING:`` are types only)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from models import create_model` may name a submodule too: `from utils import cli`
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in SOURCES}
    return found


IMPORTS = {name: runtime_imports(path) for name, path in SOURCES.items()}


def closure(name: str) -> set[str]:
    """Every project module that importing ``name`` loads (``models`` itself loads its members lazily)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        for imported in IMPORTS.get(current, ()):
            if imported in SOURCES and imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def test_models_import_only_models_and_the_error_types():
    for name in (n for n in SOURCES if n.split(".")[0] == "models"):
        project = {m for m in closure(name) if m.split(".")[0] in PACKAGES}
        assert project <= {m for m in SOURCES if m.startswith("models")} | {"utils.errors"}, name
        assert not any(m.split(".")[0] == "ray" for m in IMPORTS[name]), name


def test_nothing_models_import_imports_models_back():
    for name in (n for n in SOURCES if n.startswith("models")):
        for dependency in closure(name) - {n for n in SOURCES if n.startswith("models")}:
            assert not any(m.startswith("models") for m in closure(dependency)), f"{name} -> {dependency} -> models"


def test_only_main_talks_to_ray():
    talking = sorted(name for name, imported in IMPORTS.items() if any(m.split(".")[0] == "ray" for m in imported))
    assert talking == ["main"]


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


def test_model_code_loads_no_ray_and_no_utils_beyond_the_errors():
    code = (
        "import sys, models.dual_encoder, models.losses, models.weights\n"
        "from models import CNN14Encoder, LogSoftmaxLoss, create_model\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'utils'))\n"
        "assert loaded == ['utils', 'utils.errors'], loaded"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ["utils.training", "utils.checkpoints", "utils.inference", "utils.experiments"])
def test_library_imports_without_ray(module):
    result = python(f"import sys, {module}; assert 'ray' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_indexing_a_dataset_loads_neither_torch_nor_model_code(tmp_path):
    write_demo_dataset(tmp_path, {"development": 2, "validation": 2, "evaluation": 2}, seed=3)
    code = (
        "import runpy, sys\n"
        "sys.argv = ['clotho_dataset', '--dataset-dir', sys.argv[1]]\n"
        "runpy.run_module('preprocessing.clotho_dataset', run_name='__main__')\n"
        "heavy = {m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'sentence_transformers', 'models')}\n"
        "assert heavy <= {'models', 'models.registry'}, sorted(heavy)  # the torch-free config base only"
    )
    result = python(code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "development_text.csv").is_file() and (tmp_path / "evaluation_audio.csv").is_file()
