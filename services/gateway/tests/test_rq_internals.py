"""RQ's internals: rq_adapter only. No gateway module but llamaq_gateway/rq_adapter.py reaches past RQ's public API
(or redis-py's), so an upgrade is that one file's change. Read from the source (ast), not run: no private name of
RQ's (one its own classes define or set with a leading underscore, read from the installed RQ's source) and none of
the undocumented attributes rq_adapter lists is used, and RQ is imported only from its public modules."""

from __future__ import annotations

from pathlib import Path

from rq_internals import attributes_used, offences

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


def test_only_the_adapter_touches_rq_internals() -> None:
    found = offences(PACKAGE, ADAPTER, INTERNAL, PUBLIC_IMPORTS)
    assert found == [], "RQ's internals belong in llamaq_gateway/rq_adapter.py"


def test_the_scan_sees_what_the_adapter_does() -> None:
    used = attributes_used(ADAPTER)
    assert {"intermediate_queue_key", "command_stack"} <= used & INTERNAL
