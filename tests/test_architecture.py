"""The architecture holds: layers import only downwards (import-linter's contract in pyproject.toml), and modules
and functions stay small enough to read."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src" / "fedtune"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe)], cwd=root, capture_output=True, text=True)


def test_layers_import_only_downwards():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract is live: a copy of the package where a model module imports the runner fails it."""
    copy = tmp_path / "repo"
    shutil.copytree(SRC, copy / "src" / "fedtune", ignore=shutil.ignore_patterns("__pycache__", "builtin"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    flops = copy / "src" / "fedtune" / "models" / "flops.py"
    flops.write_text(flops.read_text() + "\n\ndef _upward():\n    from fedtune.engine.runner import Runner  # noqa\n")
    exe = Path(sys.executable).with_name("lint-imports")
    env = {"PATH": "", "PYTHONPATH": str(copy / "src")}
    result = subprocess.run([str(exe)], cwd=copy, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "fedtune.models.flops -> fedtune.engine.runner" in result.stdout


def test_modules_and_functions_are_small():
    long_modules, long_functions = [], []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(SRC)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
