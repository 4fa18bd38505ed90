"""The package layout holds: dependencies point one way (models <- stores <- runs <- tasks <- flows), no module-level
import circle, ``models/`` does no I/O, only ``stores/tracking`` talks to MLflow, no private name crosses a module,
and the flows reach the run logic only through tasks. Read from the code's syntax trees, nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["models", "stores", "runs", "tasks", "flows"]  # each may import the ones before it, never after


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for p in sorted((ROOT / layer).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, top_level_only: bool = False) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in module ``name``; relative ones resolved."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base, [a.name for a in node.names]))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _layer(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LAYERS else None


def test_dependencies_point_one_way():
    wrong = [f"{_rel(MODULES[m])}:{line} imports {target}"
             for m in MODULES for line, target, _ in _imports(m)
             if _layer(target) and LAYERS.index(_layer(target)) > LAYERS.index(_layer(m))]
    assert not wrong, "imports that run back up a layer:\n" + "\n".join(wrong)


def test_no_import_circle_between_modules():
    graph = {}
    for m in MODULES:
        deps = set()
        for _, target, names in _imports(m, top_level_only=True):
            deps |= {f"{target}.{n}" if f"{target}.{n}" in MODULES else target for n in names or [""]}
        graph[m] = {d for d in deps if d in MODULES and d != m}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path + [m, d]
            if d not in state and (found := visit(d, path + [m])):
                return found
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state:
            assert (circle := visit(m, [])) is None, " -> ".join(circle)


# what a pure torch + pydantic package may import (the standard library's pure modules among them)
MODELS_MAY_IMPORT = {"__future__", "torch", "numpy", "pydantic", "sklearn", "scipy", "typing", "dataclasses", "math",
                     "re", "time", "copy", "hashlib", "decimal", "pathlib", "functools", "itertools", "collections",
                     "enum", "abc", "warnings", "models"}
IO_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rmdir", "touch",
            "iterdir", "glob", "rglob", "exists", "is_file", "is_dir", "stat", "load", "save", "getenv", "putenv"}


def test_models_opens_no_file_and_reads_no_environment():
    found = []
    for m, path in MODULES.items():
        if _layer(m) != "models":
            continue
        for line, target, _ in _imports(m):
            if target.split(".")[0] not in MODELS_MAY_IMPORT:
                found.append(f"{_rel(path)}:{line} imports {target}")
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else \
                node.func.attr if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if called in IO_CALLS:
                found.append(f"{_rel(path)}:{node.lineno} calls {called}()")
            if isinstance(node, (ast.Name, ast.Attribute)) and (getattr(node, "id", None) or
                                                                getattr(node, "attr", None)) == "environ":
                found.append(f"{_rel(path)}:{node.lineno} reads the environment")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("code, expected", [("import os", "imports os"), ("x = open('f')", "calls open()"),
                                            ("import torch\ntorch.load('w.pt')", "calls load()"),
                                            ("from os import environ", "imports os")])
def test_the_no_io_walk_finds_io(code, expected, monkeypatch, tmp_path):
    """The walk above is no test that cannot fail: each kind of I/O in a models module is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    monkeypatch.setitem(MODULES, "models.probe", probe)
    with pytest.raises(AssertionError, match=expected):
        test_models_opens_no_file_and_reads_no_environment()


def test_only_stores_tracking_talks_to_mlflow():
    found = [f"{_rel(MODULES[m])}:{line}" for m in MODULES for line, target, _ in _imports(m)
             if target.split(".")[0] == "mlflow" and not m.startswith("stores.tracking")]
    assert not found, "MLflow imported outside stores/tracking: " + ", ".join(found)


def test_no_private_name_crosses_a_module():
    found = [f"{_rel(MODULES[m])}:{line} imports {target}.{n}" for m in MODULES
             for line, target, names in _imports(m) if _layer(target)
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.tuning", "flows.deploy", "flows.protocol"])
def test_flows_reach_the_run_logic_only_through_tasks(module):
    found = [f"{target} (line {line})" for line, target, _ in _imports(module)
             if _layer(target) in ("stores", "runs")]
    assert not found, f"{module} reaches past tasks: " + ", ".join(found)
