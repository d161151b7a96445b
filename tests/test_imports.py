"""The import structure of the package: no import cycle between modules (every import statement
counts, at module level or inside a function or an ``if TYPE_CHECKING:`` block), and the core
(cluster, data, repository, launch, testing) imports neither tensorflow nor torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import kubeai_train

PACKAGE_DIR = Path(kubeai_train.__file__).resolve().parent
REPO = PACKAGE_DIR.parent
CORE = ("cluster", "data", "repository", "launch", "testing", "balance", "straggler")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file.

    ``from pkg import x`` is an import of ``pkg.x`` when that is a module, else of ``pkg``;
    relative imports resolve against the module's package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    # an import of a.b.c names a module of the package, or one of its packages
    out = set()
    for target in found:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component of 2+ modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:
        start = min(comp)
        # breadth-first from start back to start inside the component: a shortest cycle
        prev: dict[str, str] = {}
        frontier = [start]
        end = None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        end = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [start]
        v = end
        while v is not None and v != start:
            path.append(v)
            v = prev[v]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_level_imports_are_seen():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # function-level, relative and from-package-import-module forms all resolve
    assert "kubeai_train.testing._oss_store" in graph["kubeai_train.testing.oss_server"]
    assert "kubeai_train.data.odps.wire" in graph["kubeai_train.data.odps.tunnel"]


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_core_does_not_import_frameworks():
    core = sorted(
        m for m in _modules() if m == "kubeai_train" or m.split(".")[1] in CORE and not m.endswith("__main__")
    )
    code = (
        "import importlib, json, sys\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in ('tensorflow', 'torch') if k in sys.modules)))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_a_tf_mode_never_imports_the_other():
    """Not even through a module of the shared core (the compatibility modules re-export
    between-graph names, so the coordinator must not import them)."""
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    modes = {"between_graph": "kubeai_train.tf.coordinator", "coordinator": "kubeai_train.tf.between_graph"}
    for mode, other in modes.items():
        for m in (m for m in modules if m.startswith(f"kubeai_train.tf.{mode}")):
            crossing = sorted(w for w in _reaches(graph, m) if w == other or w.startswith(other + "."))
            assert not crossing, f"{m} imports {crossing}"
    assert graph["kubeai_train.tf.placement"] >= {
        "kubeai_train.tf.between_graph.placement"
    }  # the check sees one


def test_names_of_the_modules_split_by_mode_import_from_where_they_were():
    from kubeai_train.tf import checkpoint_store, checkpoints, placement, placement_policies
    from kubeai_train.tf.between_graph import checkpoints as bg_checkpoints
    from kubeai_train.tf.between_graph import placement as bg_placement

    for old, homes in [
        (placement, (placement_policies, bg_placement)),
        (checkpoints, (checkpoint_store, bg_checkpoints)),
    ]:
        moved = {n: getattr(home, n) for home in homes for n in home.__all__}
        assert set(old.__all__) == set(moved), old.__name__
        assert all(getattr(old, n) is obj for n, obj in moved.items())
