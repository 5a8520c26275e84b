"""Integration fixtures: the real stack (redis-server, worker with the small model, gunicorn, nginx)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from openai import OpenAI

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


def start_and_wait_ready(stack: Stack) -> None:
    stack.start(wait_ready_s=180)


@contextmanager
def running_stack(
    workdir_prefix: str, env: dict[str, str], start: Callable[[Stack], None] = start_and_wait_ready, **options
) -> Iterator[Stack]:
    """A Stack in a fresh temp dir, started by `start` and stopped whatever happens (a half-started one too)."""
    stack = Stack(env, free_port(), Path(tempfile.mkdtemp(prefix=workdir_prefix)), **options)
    try:
        start(stack)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def stack():
    with running_stack("llamaq-test-", stack_environment()) as running:
        yield running


# A chat template that renders `tools` (SmolLM2's ignores them): its ChatML with the tools written as vLLM's Llama 3.1
# JSON template writes them, as production serves Llama 3.1 with its own; and vLLM's parser for that format.
TOOL_TEMPLATE = Path(__file__).resolve().parent / "clients" / "chatml_tools.jinja"


def tool_environment(**overrides: str) -> dict[str, str]:
    return stack_environment(CHAT_TEMPLATE=str(TOOL_TEMPLATE), TOOL_CALL_PARSER="llama3_json", **overrides)


@pytest.fixture(scope="session")
def tool_stack():
    """A stack that renders tools, shared by the tool-calling, Responses API and agent-client tests."""
    with running_stack("llamaq-tools-", tool_environment()) as running:
        yield running


@pytest.fixture(scope="module")
def aof_stack():
    """A stack of its own whose Redis keeps an append-only file (as compose runs it), for the tests that restart
    Redis or stop workers without disturbing the session stack."""
    # A drain time generous enough for these shared cores; the hand-back test sets its own tiny one.
    with running_stack("llamaq-aof-", stack_environment(DRAIN_TIMEOUT_S="120"), redis_aof=True) as running:
        yield running


@pytest.fixture(scope="module")
def prompt_logging_stack():
    """A stack of its own with LOG_PROMPTS=1 (the echo engine: no model to load, the log is what is checked)."""
    env = stack_environment(LOG_PROMPTS="1", ENGINE="echo", LOG_FORMAT="json")
    with running_stack("llamaq-logprompts-", env) as running:
        yield running


@pytest.fixture(scope="module")
def lone_redis():
    """A Stack that runs only its redis-server, started as the full stacks start theirs (the Lua script tests)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not found: run `make system-deps`", pytrace=False)
    with running_stack("llamaq-scripts-", dict(os.environ), start=Stack.start_redis) as running:
        yield running


@pytest.fixture(scope="module")
def oai(stack):
    """The official `openai` SDK on the module's stack."""
    with OpenAI(base_url=stack.url + "/v1", api_key="test", max_retries=0, timeout=180) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def model(oai):
    """The served model's name, as /v1/models lists it."""
    return oai.models.list().data[0].id


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
