"""A worker whose decoding loop is wedged (a hung `engine.step()`, the process itself alive) stops heartbeating
within STEP_STALL_S and a beat, fails its healthcheck, the gateway's lost-worker sweep gives its job to another
worker, and after twice STEP_STALL_S the wedged process exits for its supervisor to start a fresh one. Real
redis-server, gunicorn, nginx and workers (the echo engine: no model to load)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
import redis

from conftest import running_stack, stack_environment
from devstack import Stack
from helpers import wait_for_job_status, wait_until
from llamaq_protocol import keys

STALL_S = 2
HEARTBEAT_S = 1

HUNG_WORKER = textwrap.dedent("""
    import sys
    import threading

    from llamaq_worker import __main__ as worker_main
    from llamaq_worker.engines.echo import EchoEngine

    class Hung(EchoEngine):
        def step(self):
            threading.Event().wait()  # wedged for good, as a hung CUDA kernel leaves it

    worker_main.build_engine = lambda settings, model_dir: Hung(model_dir, max_batch=settings.max_batch)
    sys.exit(worker_main.main())
""")


def start_without_worker(stack: Stack) -> None:
    stack.start_redis()
    stack.start_gateway()
    stack.start_nginx()


@pytest.fixture(scope="module")
def bare_stack():
    env = stack_environment(ENGINE="echo", STEP_STALL_S=str(STALL_S), HEARTBEAT_S=str(HEARTBEAT_S),
                            LOG_FORMAT="text")
    with running_stack("llamaq-liveness-", env, start=start_without_worker) as running:
        yield running


def healthcheck(stack: Stack) -> int:
    return subprocess.run([sys.executable, "-m", "llamaq_worker.healthcheck"], env=stack.env, timeout=30).returncode


def test_a_wedged_step_stops_the_heartbeat_and_its_job_moves_on(bare_stack: Stack, tmp_path):
    script = tmp_path / "hung_worker.py"
    script.write_text(HUNG_WORKER)
    store = redis.Redis.from_url(bare_stack.env["REDIS_URL"])
    bare_stack._spawn("hung-worker", [sys.executable, str(script)], {"METRICS_PORT": "0"})
    try:
        bare_stack.wait_ready(120)
        assert healthcheck(bare_stack) == 0
        [hung_name] = [name.decode() for name in store.zrange(keys.WORKERS, 0, -1)]

        with httpx.Client(base_url=bare_stack.url, timeout=30) as client:
            job = client.post("/v1/jobs", json={"prompt": "still here?", "max_new_tokens": 16}).json()
            wait_for_job_status(client, job["id"], "running", 30)
            running_since = time.monotonic()
            assert store.hget(keys.job(job["id"]), "worker").decode() == hung_name

            # The step never returns; within STEP_STALL_S and a beat the worker withdraws from the workers set.
            wait_until(lambda: store.zscore(keys.WORKERS, hung_name) is None, STALL_S + 3 * HEARTBEAT_S + 5,
                       "the wedged worker to stop heartbeating", interval_s=0.1)
            assert time.monotonic() - running_since >= STALL_S - 0.5
            assert healthcheck(bare_stack) == 1

            # The sweeper takes the job back (its attempt counted) ...
            requeued = wait_for_job_status(client, job["id"], "queued", 30)
            assert requeued["started_at"] is None
            assert store.hget(keys.job(job["id"]), "attempts") == b"1"
            # ... the wedged process exits after twice STEP_STALL_S, for its supervisor to start a fresh one ...
            hung = bare_stack.procs["hung-worker"]
            wait_until(lambda: hung.poll() is not None, 2 * STALL_S + 3 * HEARTBEAT_S + 10,
                       "the wedged worker to exit", interval_s=0.1)
            assert hung.returncode == 1
            # ... and a healthy worker finishes the job.
            bare_stack.start_worker()
            done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
            assert done["status"] == "succeeded", done
            assert done["output"]["text"] == "still here?"

        log = (bare_stack.workdir / "hung-worker.log").read_text(errors="replace")
        assert "heartbeat stopped" in log and "exiting for a fresh worker" in log
    finally:
        store.close()
        bare_stack.stop_process("hung-worker", signal.SIGKILL)
