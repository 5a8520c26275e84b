"""RQ's internals: rq_adapter only. No worker module but llamaq_worker/rq_adapter.py reaches past RQ's public API, so an
RQ upgrade is that one file's change. Read from the source (ast), not run:

- no private name of RQ's (one that RQ's own classes define or set with a leading underscore, read from the installed
  RQ's source) is read, written or overridden, except a module's own class's attribute that only shares the name
  (an engine's `self._shutdown`);
- none of RQ's undocumented calls and attributes that rq_adapter lists (`worker.execution`,
  `handle_job_success`, `intermediate_queue_key`, ...) is used;
- RQ is imported only from its public modules (rq, rq.job, rq.exceptions, rq.registry, rq.serializers; rq.worker for
  WorkerStatus alone: the worker classes are rq_adapter's)."""

from __future__ import annotations

import ast
from pathlib import Path

import rq

PACKAGE = Path(__file__).resolve().parents[1] / "llamaq_worker"
ADAPTER = PACKAGE / "rq_adapter.py"

# RQ's calls and attributes with public names that are not its documented API (rq_adapter's docstring lists them).
INTERNAL = {
    "execution", "prepare_execution", "prepare_job_execution", "prepare_for_execution", "cleanup_execution",
    "handle_execution_ended", "handle_job_success", "handle_job_failure", "set_current_job_id",
    "set_current_job_working_time", "get_heartbeat_ttl", "increment_failed_job_count", "create_failure",
    "intermediate_queue_key", "DEFAULT_TIMEOUT", "command_stack",
}
# Module -> the names that may be imported from it (None: any).
PUBLIC_IMPORTS: dict[str, set[str] | None] = {
    "rq": {"Queue"}, "rq.job": None, "rq.exceptions": None, "rq.registry": None, "rq.serializers": None,
    "rq.worker": {"WorkerStatus"},
}


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


def worker_modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py")) if path != ADAPTER}


def base_names(cls: ast.ClassDef) -> set[str]:
    return {base.id if isinstance(base, ast.Name) else base.attr
            for base in cls.bases if isinstance(base, (ast.Name, ast.Attribute))}


def rq_derived(modules: dict[Path, ast.Module]) -> set[str]:
    """The package's classes that derive from one of RQ's (imported from rq, or rq_adapter's RQWorker), by name."""
    derived = {"RQWorker"}
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq":
                derived |= {alias.asname or alias.name for alias in node.names}
    classes = [n for tree in modules.values() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while True:
        more = {cls.name for cls in classes if base_names(cls) & derived} - derived
        if not more:
            return derived
        derived |= more


def own_attribute(node: ast.Attribute, owner: ast.ClassDef | None, derived: set[str]) -> bool:
    """`self.x` in a class of the package's own that does not derive from RQ's."""
    return (owner is not None and owner.name not in derived and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls"))


def offences() -> list[str]:
    private = rq_private_names()
    modules = worker_modules()
    derived = rq_derived(modules)
    found: list[str] = []

    def visit(node: ast.AST, path: Path, owner: ast.ClassDef | None) -> None:
        where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            if node.attr in INTERNAL or (node.attr in private and not own_attribute(node, owner, derived)):
                found.append(f"{where}: .{node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if owner is not None and owner.name in derived and node.name in private:
                found.append(f"{where}: overrides RQ's {node.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq" and node.level == 0:
            allowed = PUBLIC_IMPORTS.get(node.module, set())
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


def test_only_the_adapter_touches_rq_internals() -> None:
    assert offences() == [], "RQ's internals belong in llamaq_worker/rq_adapter.py"


def test_the_scan_sees_what_the_adapter_does() -> None:
    """The adapter itself would fail the scan: the names it relies on are among those looked for."""
    private = rq_private_names()
    assert {"_ordered_queues", "_stop_requested", "_state", "_result", "_status", "_shutdown"} <= private
    used = {node.attr for node in ast.walk(ast.parse(ADAPTER.read_text())) if isinstance(node, ast.Attribute)}
    assert {"_ordered_queues", "_stop_requested", "_state", "_result", "_status", "execution",
            "handle_job_success", "intermediate_queue_key"} <= used & (private | INTERNAL)
