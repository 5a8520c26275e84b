"""RQ's internals: rq_adapter only. No gateway module but llamaq_gateway/rq_adapter.py reaches past RQ's public API
(or redis-py's), so an upgrade is that one file's change. Read from the source (ast), not run: no private name of
RQ's (one its own classes define or set with a leading underscore, read from the installed RQ's source) and none of
the undocumented attributes rq_adapter lists is used, and RQ is imported only from its public modules."""

from __future__ import annotations

import ast
from pathlib import Path

import rq

PACKAGE = Path(__file__).resolve().parents[1] / "llamaq_gateway"
ADAPTER = PACKAGE / "rq_adapter.py"

# Undocumented attributes with public names (rq_adapter's docstring lists them), and the worker's (never the
# gateway's business).
INTERNAL = {
    "intermediate_queue_key", "command_stack", "execution", "prepare_for_execution", "cleanup_execution",
    "handle_execution_ended", "handle_job_success", "handle_job_failure", "set_current_job_id",
    "set_current_job_working_time", "get_heartbeat_ttl", "create_failure", "DEFAULT_TIMEOUT",
}
# Module -> the names that may be imported from it (None: any).
PUBLIC_IMPORTS: dict[str, set[str] | None] = {
    "rq": {"Queue"}, "rq.job": None, "rq.exceptions": None, "rq.registry": None, "rq.serializers": None,
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


def offences() -> list[str]:
    private = rq_private_names()
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == ADAPTER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and (node.attr in INTERNAL or node.attr in private):
                found.append(f"{where}: .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq" and node.level == 0:
                allowed = PUBLIC_IMPORTS.get(node.module, set())
                found += [f"{where}: from {node.module} import {alias.name}" for alias in node.names
                          if allowed is not None and alias.name not in allowed]
            elif isinstance(node, ast.Import):
                found += [f"{where}: import {alias.name}" for alias in node.names if alias.name.split(".")[0] == "rq"]
    return found


def test_only_the_adapter_touches_rq_internals() -> None:
    assert offences() == [], "RQ's internals belong in llamaq_gateway/rq_adapter.py"


def test_the_scan_sees_what_the_adapter_does() -> None:
    used = {node.attr for node in ast.walk(ast.parse(ADAPTER.read_text())) if isinstance(node, ast.Attribute)}
    assert {"intermediate_queue_key", "command_stack"} <= used & INTERNAL
