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

from pathlib import Path

from rq_internals import attributes_used, offences, rq_private_names

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


def test_only_the_adapter_touches_rq_internals() -> None:
    found = offences(PACKAGE, ADAPTER, INTERNAL, PUBLIC_IMPORTS)
    assert found == [], "RQ's internals belong in llamaq_worker/rq_adapter.py"


def test_the_scan_sees_what_the_adapter_does() -> None:
    """The adapter itself would fail the scan: the names it relies on are among those looked for."""
    private = rq_private_names()
    assert {"_ordered_queues", "_stop_requested", "_state", "_result", "_status", "_shutdown"} <= private
    used = attributes_used(ADAPTER)
    assert {"_ordered_queues", "_stop_requested", "_state", "_result", "_status", "execution",
            "handle_job_success", "intermediate_queue_key"} <= used & (private | INTERNAL)


def test_the_scan_finds_a_module_reaching_past_the_adapter(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "rq_adapter.py").write_text("def stop(worker):\n    worker._stop_requested = True\n")
    (package / "loop.py").write_text(
        "from rq.worker import SimpleWorker\n\n\n"
        "class Loop(SimpleWorker):\n"
        "    def _shutdown(self):\n        return self._ordered_queues\n\n\n"
        "class Engine:\n    def stop(self):\n        self._shutdown = True\n"
    )
    assert offences(package, package / "rq_adapter.py", INTERNAL, PUBLIC_IMPORTS) == [
        "pkg/loop.py:1: from rq.worker import SimpleWorker",
        "pkg/loop.py:5: overrides RQ's _shutdown",
        "pkg/loop.py:6: ._ordered_queues",
    ]  # the engine's own `self._shutdown` shares the name only
