"""The worker's default name: new at every start (a restarted container keeps its hostname and PID 1, and RQ
refuses a name whose old `rq:worker:<name>` key still lives), host first for the container healthcheck."""

from __future__ import annotations

import os
import socket
import time

import pytest

from llamaq_worker import healthcheck
from llamaq_worker.settings import WorkerSettings, default_worker_name


def test_two_starts_on_the_same_host_and_pid_get_different_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-0")
    monkeypatch.setattr(os, "getpid", lambda: 1)
    first, second = default_worker_name(), default_worker_name()
    assert first != second
    for name in (first, second):
        host, pid, suffix = name.split(":")
        assert (host, pid) == ("worker-0", "1") and len(suffix) == 8


def test_worker_name_still_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_NAME", "gpu-7")
    assert WorkerSettings().worker_name == "gpu-7"


class _Redis:
    """The worker registry (`llamaq:workers`: name -> time of its last beat)."""

    def __init__(self, name: str, beat_age_s: float):
        self.members = {name.encode(): time.time() - beat_age_s}

    def zrangebyscore(self, key: str, low: float, high: str) -> list[bytes]:
        return [name for name, score in self.members.items() if score >= low]


@pytest.mark.parametrize(
    ("other_host", "beat_age_s", "healthy"),
    [(False, 0, True), (False, 3600, False), (True, 0, False)],
    ids=["fresh", "stale", "another-host"],
)
def test_healthcheck_finds_its_worker_by_hostname(
    monkeypatch: pytest.MonkeyPatch, other_host: bool, beat_age_s: float, healthy: bool
) -> None:
    name = default_worker_name()
    if other_host:
        name = name.replace(":", "-other:", 1)
    monkeypatch.setattr(healthcheck.redis.Redis, "from_url", lambda *args, **kwargs: _Redis(name, beat_age_s))
    assert (healthcheck.main() == 0) is healthy
