"""No circle of imports among the gateway's modules: each module can be read knowing only those below it.

The imports are read from the source (ast), not run: every `import` and `from ... import` of a llamaq_gateway
module counts, wherever it stands (at the top, inside a function, under `if TYPE_CHECKING:`), and importing
`a.b.c` counts as importing the package `a.b` too (its `__init__` runs first). A circle found is named in full, so
the fix is plain: move what both sides use into a leaf module both import (as sse.py, webhook_signing.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llamaq_gateway"


def module_files(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (its file, whether it is a package's __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def with_parents(name: str, modules: dict) -> set[str]:
    """`name` and the packages above it (importing a module runs each package's __init__ on the way)."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)} & modules.keys()


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = module_files(root)
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import name`: a submodule when there is one, else a name of pkg itself.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == top:
                    imported |= with_parents(target, modules)
        # A package's own parents are imported before it, not by it.
        graph[name] = imported - with_parents(name, modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_gateways_imports() -> None:
    graph = import_graph(PACKAGE)
    assert {"llamaq_gateway.event_hub", "llamaq_gateway.sse"} <= graph["llamaq_gateway.streams"]
    assert "llamaq_gateway.jobs" in graph["llamaq_gateway.job_list"]
    assert "llamaq_gateway.webhook_signing" in graph["llamaq_gateway.settings"]
    # Relative imports two levels up, and the package an imported submodule lies in.
    assert "llamaq_gateway.streams" in graph["llamaq_gateway.openai.streaming"]
    assert "llamaq_gateway.openai" in graph["llamaq_gateway.routers.openai"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_among_gateway_modules() -> None:
    graph = import_graph(PACKAGE)
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(
        " <-> ".join(f"{member} (imports {sorted(graph[member] & set(cycle))})" for member in cycle) for cycle in found)


def test_the_leaf_modules_import_nothing_of_the_gateway() -> None:
    graph = import_graph(PACKAGE)
    for leaf in ("llamaq_gateway.sse", "llamaq_gateway.webhook_signing"):
        assert graph[leaf] == set(), (leaf, graph[leaf])
