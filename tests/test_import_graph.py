"""No import cycle among the modules of pqjax, pallas_kernels and converters, and no private cross-module import.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``,
at module level or inside a function (a lazy import hides a cycle, it does not remove it). ``from pkg import name``
is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``)."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pqjax", "pallas_kernels", "converters")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str):
    """(target module, imported name or None, line) for every import statement of module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    base = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                mod = f"{pkg}.{node.module}" if node.module else pkg
            else:
                mod = node.module
            for a in node.names:
                yield mod, a.name, node.lineno


def _edges() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for mod, name, _ in _imports(m):
            if name is not None and f"{mod}.{name}" in MODULES:
                graph[m].add(f"{mod}.{name}")
            elif mod in MODULES:
                graph[m].add(mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_the_packages():
    graph = _edges()
    assert {"pqjax", "pqjax.io", "pqjax.io.checkpoint", "converters.loader", "pallas_kernels"} <= set(graph)
    assert "pqjax.io.safetensors" in graph["converters.loader"] | graph["converters.diffusers_format"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    cycles = _cycles(_edges())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    """``from x import _y`` only for a package's own private submodule (pallas_kernels._numerics)."""
    bad = []
    for m in MODULES:
        for mod, name, line in _imports(m):
            private = name and name.startswith("_") and not name.startswith("__") and mod.split(".")[0] in PACKAGES
            own_submodule = f"{mod}.{name}" in MODULES and m.startswith(mod + ".")  # a package's private module
            if private and not own_submodule:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: from {mod} import {name}")
    assert not bad, "\n".join(bad)
