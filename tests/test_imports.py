"""The package's import graph has no cycle, and every module imports first in a fresh interpreter.

The graph is read from the source (every `import` / `from ... import`, at module level or inside a function: a lazy
import that closes a cycle is still a cycle), over the project's own packages."""

from __future__ import annotations

import ast
import concurrent.futures
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pi05_jax", "pallas_kernels", "checkpoints", "bridges")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The project modules `module` imports (`from pkg import name` counts as pkg.name when that is a module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {m for m in found if m in SOURCES and m != module}


def _graph() -> dict[str, set[str]]:
    graph = {m: _imports(m, p) for m, p in SOURCES.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: a package's own imports are its children's edges
    for m in list(graph):
        for parent in (".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)):
            if parent in graph:
                graph[m] = graph[m] | graph[parent]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_model_never_imports_the_fast_path():
    graph = _graph()
    model = [m for m in graph if m.startswith("pi05_jax.model")]
    assert model
    for m in model:
        assert not {n for n in graph[m] if n.startswith(("pi05_jax.fast", "pi05_jax.implementations"))}, m


def test_no_private_name_is_imported_across_modules():
    """`from x import _helper` between modules is a private helper used across a boundary."""
    offenders = []
    for module, path in SOURCES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "") in SOURCES:
                offenders += [f"{module}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, "\n".join(offenders)


def _import_alone(module: str) -> str | None:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return f"{module}: {lines[-1] if lines else proc.returncode}"


def test_every_module_imports_first():
    """One interpreter per module (the import order is the point), two at a time (each holds JAX in memory)."""
    modules = [m for m in SOURCES if not m.startswith("bridges.")]  # bridges build C++ on import of some modules
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(_import_alone, modules) if f]
    assert not failures, "modules that fail to import first:\n" + "\n".join(failures)
