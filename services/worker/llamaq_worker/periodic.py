"""Progress lines while something slow runs (a model loading, a download): a callback every N s from a daemon
thread, for as long as a `with` block lasts."""

from __future__ import annotations

import threading
from collections.abc import Callable

# How long leaving the block waits for a report in progress (a big folder scan) before going on without it.
_JOIN_TIMEOUT_S = 5.0


class PeriodicReporter:
    """Context manager: calls `report` every `interval_s` on a daemon thread until the block ends (or from
    `start` to `stop`). The first call comes one interval after the start, none begins after `stop`."""

    def __init__(self, interval_s: float, report: Callable[[], None], thread_name: str) -> None:
        self.interval_s = interval_s
        self._report = report
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=_JOIN_TIMEOUT_S)

    def __enter__(self) -> PeriodicReporter:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._report()
