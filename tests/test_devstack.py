"""`make dev`'s launcher as a user runs it: the stack comes up, a crashed worker is restarted, Ctrl-C ends it all;
and it survives what compose survives: a kill -9 of Redis (its append-only file keeps the queue), of the gunicorn
master or of the nginx master is restarted, with nothing of the dead one left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import time

import httpx
import pytest

from helpers import wait_for_job_status, wait_until
from nginx_local import free_port

ROOT = Path(__file__).resolve().parent.parent
# Tiers (the root conftest.py): `make dev`'s whole stack, twice, with services killed and restarted.
pytestmark = [pytest.mark.stack, pytest.mark.slow]


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


def children(pid: int, name: bytes) -> list[int]:
    """Processes whose parent is `pid` and whose command line mentions `name`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and name in cmdline:
            found.append(int(entry.name))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_dev_stack_restarts_a_crashed_worker_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HTTP_PORT=str(port), MODEL_PATH=os.environ["LLAMAQ_TEST_MODEL"], DTYPE="float32",
               ENGINE="transformers", MAX_BATCH="2", WORKER_STALE_S="6", HEARTBEAT_S="1")
    env.pop("API_KEYS", None)
    dev = subprocess.Popen([sys.executable, "scripts/devstack.py", "--data-dir", str(tmp_path)], cwd=ROOT, env=env,
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


def kill_and_wait_for_replacement(dev: subprocess.Popen, name: bytes, url: str) -> tuple[int, int]:
    """kill -9 the launcher's `name` process; (its pid, its replacement's) once the stack serves again."""
    [old] = children(dev.pid, name)
    os.kill(old, signal.SIGKILL)
    [new] = wait_until(lambda: [p for p in children(dev.pid, name) if p != old], 60,
                       f"a new {name.decode()}", interval_s=0.1)
    wait_until(lambda: ready(url), 60, f"the stack to serve after the {name.decode()} kill", interval_s=0.25)
    return old, new


def test_dev_stack_restarts_redis_gunicorn_and_nginx_and_leaves_no_orphan(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The paced engine (no model): one slot, 10 tokens a second, so a job stays queued behind a running one.
    env = dict(os.environ, HTTP_PORT=str(port), MODEL_PATH=os.environ["LLAMAQ_TEST_MODEL"], ENGINE="paced",
               PACED_TOKENS_PER_S="10", MAX_BATCH="1", WORKER_STALE_S="6", HEARTBEAT_S="1", WEB_CONCURRENCY="2")
    env.pop("API_KEYS", None)
    dev = subprocess.Popen([sys.executable, "scripts/devstack.py", "--data-dir", str(tmp_path)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ready(url), 120, "the dev stack to be ready", interval_s=0.25)
        with httpx.Client(base_url=url, timeout=30) as client:
            # Redis: a running job and one queued behind it, then kill -9 once the append-only file has them.
            running = client.post("/v1/jobs", json={"prompt": "a", "max_new_tokens": 60}).json()
            wait_for_job_status(client, running["id"], "running", 30)
            queued = client.post("/v1/jobs", json={"prompt": "b", "max_new_tokens": 5}).json()
            assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
            time.sleep(1.5)  # appendfsync everysec, as compose runs it
            assert (tmp_path / "redis" / "appendonlydir").is_dir()
            kill_and_wait_for_replacement(dev, b"redis-server", url)
            for job in (running, queued):
                done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
                assert done["status"] == "succeeded", done

            # The gunicorn master: its uvicorn workers go with it, and a new gateway serves.
            [master] = children(dev.pid, b"gunicorn")
            assert len(group_members(master)) > 1  # the master and its workers
            old, _ = kill_and_wait_for_replacement(dev, b"gunicorn", url)
            assert group_members(old) == [], "uvicorn workers of the killed gunicorn master outlived it"
            assert client.post("/v1/jobs", json={"prompt": "c", "max_new_tokens": 3}).status_code == 202

            # The nginx master: its workers go with it.
            old, _ = kill_and_wait_for_replacement(dev, b"nginx", url)
            assert group_members(old) == [], "nginx workers of the killed master outlived it"
            job = client.post("/v1/jobs", json={"prompt": "d", "max_new_tokens": 3}).json()
            assert client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()["status"] == "succeeded"

        groups = [pid for name in (b"redis-server", b"gunicorn", b"nginx") for pid in children(dev.pid, name)]
        groups += worker_pids(dev.pid)
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=60) == 0
        assert not [p for g in groups for p in group_members(g)], "a process outlived Ctrl-C"
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    output = dev.stdout.read().decode(errors="replace")
    for name in ("redis", "gateway", "nginx"):
        assert f"{name} exited with -9; restarting it" in output, output[-3000:]
