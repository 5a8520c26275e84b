"""Integration fixtures: the real stack (redis-server, worker with the small model, gunicorn, nginx)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import pytest
import redis

from devstack import Stack
from nginx_local import free_port

# Small enough that a few long jobs fill the batch and the next one stays queued (cancel tests).
TEST_MAX_BATCH = 2


def stack_environment(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MODEL_PATH=os.environ["LLAMAQ_TEST_MODEL"],
        DEVICE="cpu",
        # float32: greedy answers do not depend on what else shares the batch (GUIDE: batch invariance).
        DTYPE="float32",
        MAX_BATCH=str(TEST_MAX_BATCH),
        WEB_CONCURRENCY="2",
        LOG_LEVEL="INFO",
        MAX_PROMPT_TOKENS="1000",
        OMP_NUM_THREADS="2",
        # Quick lost-worker detection for the fault tests; heartbeats come every second.
        WORKER_STALE_S="6",
        HEARTBEAT_S="1",
    )
    env.pop("API_KEYS", None)
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def stack():
    workdir = Path(tempfile.mkdtemp(prefix="llamaq-test-"))
    running = Stack(stack_environment(), free_port(), workdir)
    try:
        running.start(wait_ready_s=180)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def aof_stack():
    """A stack of its own whose Redis keeps an append-only file (as compose runs it), for the tests that restart
    Redis or stop workers without disturbing the session stack."""
    workdir = Path(tempfile.mkdtemp(prefix="llamaq-aof-"))
    # A drain time generous enough for these shared cores; the hand-back test sets its own tiny one.
    running = Stack(stack_environment(DRAIN_TIMEOUT_S="120"), free_port(), workdir, redis_aof=True)
    try:
        running.start(wait_ready_s=180)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def prompt_logging_stack():
    """A stack of its own with LOG_PROMPTS=1 (the echo engine: no model to load, the log is what is checked)."""
    workdir = Path(tempfile.mkdtemp(prefix="llamaq-logprompts-"))
    running = Stack(stack_environment(LOG_PROMPTS="1", ENGINE="echo", LOG_FORMAT="json"), free_port(), workdir)
    try:
        running.start(wait_ready_s=180)
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=120) as http:
        yield http


@pytest.fixture
def store(stack):
    """The stack's own Redis, to check what the services wrote."""
    connection = redis.Redis.from_url(stack.env["REDIS_URL"])
    yield connection
    connection.close()
