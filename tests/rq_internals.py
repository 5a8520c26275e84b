"""The scan both services' tests/test_rq_internals.py run: which of a package's modules, other than its rq_adapter,
reach past RQ's public API. Read from the source (ast), not run:

- a private name of RQ's (one that RQ's own classes define or set with a leading underscore, read from the installed
  RQ's source) read, written or overridden, except a module's own class's attribute that only shares the name (an
  engine's `self._shutdown`);
- one of the undocumented calls and attributes the caller lists (`internal`);
- an import of RQ other than from its public modules (`public_imports`: module -> the names allowed, None: any)."""

from __future__ import annotations

import ast
from pathlib import Path

import rq


def rq_private_names() -> set[str]:
    """Every private name RQ's classes define (methods, class attributes) or set on themselves (`self._x = ...`)."""
    names: set[str] = set()
    for path in Path(rq.__file__).parent.rglob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
            for statement in cls.body:  # class attributes
                if isinstance(statement, (ast.Assign, ast.AnnAssign)):
                    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                    names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return {name for name in names if name.startswith("_") and not name.startswith("__") and len(name) > 1}


def attributes_used(path: Path) -> set[str]:
    """The attribute names a module reads or writes."""
    return {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}


def _base_names(cls: ast.ClassDef) -> set[str]:
    return {base.id if isinstance(base, ast.Name) else base.attr
            for base in cls.bases if isinstance(base, (ast.Name, ast.Attribute))}


def _rq_derived(modules: dict[Path, ast.Module]) -> set[str]:
    """The package's classes that derive from one of RQ's (imported from rq, or rq_adapter's RQWorker), by name."""
    derived = {"RQWorker"}
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq":
                derived |= {alias.asname or alias.name for alias in node.names}
    classes = [n for tree in modules.values() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while True:
        more = {cls.name for cls in classes if _base_names(cls) & derived} - derived
        if not more:
            return derived
        derived |= more


def _own_attribute(node: ast.Attribute, owner: ast.ClassDef | None, derived: set[str]) -> bool:
    """`self.x` in a class of the package's own that does not derive from RQ's."""
    return (owner is not None and owner.name not in derived and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls"))


def offences(package: Path, adapter: Path, internal: set[str],
             public_imports: dict[str, set[str] | None]) -> list[str]:
    """Every place in `package` (its modules but `adapter`) that reaches past RQ's public API, as path:line: what."""
    private = rq_private_names()
    modules = {path: ast.parse(path.read_text()) for path in sorted(package.rglob("*.py")) if path != adapter}
    derived = _rq_derived(modules)
    found: list[str] = []

    def visit(node: ast.AST, path: Path, owner: ast.ClassDef | None) -> None:
        where = f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            if node.attr in internal or (node.attr in private and not _own_attribute(node, owner, derived)):
                found.append(f"{where}: .{node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if owner is not None and owner.name in derived and node.name in private:
                found.append(f"{where}: overrides RQ's {node.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq" and node.level == 0:
            allowed = public_imports.get(node.module, set())
            for alias in node.names:
                if allowed is not None and alias.name not in allowed:
                    found.append(f"{where}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            found.extend(f"{where}: import {alias.name}" for alias in node.names if alias.name.split(".")[0] == "rq")
        inner = node if isinstance(node, ast.ClassDef) else owner
        for child in ast.iter_child_nodes(node):
            visit(child, path, inner)

    for path, tree in modules.items():
        visit(tree, path, None)
    return found
