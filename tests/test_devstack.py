"""`make dev`'s launcher as a user runs it: the stack comes up, a crashed worker is restarted, Ctrl-C ends it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from helpers import wait_until
from nginx_local import free_port

ROOT = Path(__file__).resolve().parent.parent


def worker_pids(devstack_pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        # RQ renames its process ("rq:worker:...") where setproctitle is installed (vLLM brings it).
        if ppid == devstack_pid and any(b"llamaq_worker" in part or part.startswith(b"rq:worker:") for part in cmdline):
            pids.append(int(entry.name))
    return pids


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_dev_stack_restarts_a_crashed_worker_and_stops_on_ctrl_c():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HTTP_PORT=str(port), MODEL_PATH=os.environ["LLAMAQ_TEST_MODEL"], DTYPE="float32",
               ENGINE="transformers", MAX_BATCH="2", WORKER_STALE_S="6", HEARTBEAT_S="1")
    env.pop("API_KEYS", None)
    dev = subprocess.Popen([sys.executable, "scripts/devstack.py"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ready(url), 120, "the dev stack to be ready", interval_s=0.25)
        reply = httpx.post(url, json={"prompt": "What is the capital of France?"}, timeout=60)
        assert reply.status_code == 200 and "Paris" in reply.json()["response"]

        [first] = worker_pids(dev.pid)
        os.kill(first, signal.SIGKILL)
        replacement = wait_until(lambda: [p for p in worker_pids(dev.pid) if p != first], 30, "a new worker",
                                 interval_s=0.25)
        assert replacement
        wait_until(lambda: ready(url), 120, "the restarted worker to be ready", interval_s=0.25)
        assert httpx.post(url, json={"prompt": "Hi", "max_new_tokens": 4}, timeout=60).status_code == 200

        current_workers = worker_pids(dev.pid)
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=60) == 0
        assert not [p for p in current_workers if Path(f"/proc/{p}").exists()], "a worker outlived Ctrl-C"
        wait_until(lambda: not ready(url), 10, "nginx to stop", interval_s=0.25)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    output = dev.stdout.read().decode(errors="replace")
    assert "restarting it" in output
