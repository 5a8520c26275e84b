"""Hundreds of open event streams and waits through real nginx, gunicorn (2 processes), Redis and a worker
(`ENGINE=paced`: no model, tokens at a fixed pace): every stream gets every event, once, in order, while the
gateway's Redis connections stay a small constant; and the per-client cap answers 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import redis

from conftest import running_stack, stack_environment
from sse_load import http_get, sse_get

TOKENS = 30
JOBS = 3
STREAMS = 300
WAITS = 30
# nginx limits each address to 100 requests/s (burst 200): the clients come from several loopback addresses.
SOURCES = [f"127.0.0.{i}" for i in range(2, 8)]
READER = "llamaq-gateway-reader"
# Each gateway process's pool of short commands, well under the waiters each process holds (about 165).
POOL = 16


def _paced_env(**overrides: str) -> dict[str, str]:
    return stack_environment(ENGINE="paced", PACED_TOKENS_PER_S="10", MAX_BATCH="8", **overrides)


def _gateway_connections(store: redis.Redis) -> list[dict]:
    return [c for c in store.client_list() if (c.get("name") or "").startswith("llamaq-gateway")]


def _by_name(connections: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for client in connections:
        counts[client["name"]] = counts.get(client["name"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def paced_stack():
    with running_stack("llamaq-streams-", _paced_env(REDIS_MAX_CONNECTIONS=str(POOL))) as running:
        yield running


def test_hundreds_of_streams_get_every_event_through_a_few_redis_connections(paced_stack):
    stack = paced_stack
    store = redis.Redis.from_url(stack.env["REDIS_URL"])
    port = stack.http_port
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        idle = _by_name(_gateway_connections(store))
        assert idle.get(READER) == 2, idle  # one reader per gateway process (STREAM_READERS=1)
        jobs = [client.post("/v1/jobs", json={"prompt": f"stream {i}", "max_new_tokens": TOKENS}).json()["id"]
                for i in range(JOBS)]

    async def load():
        streams = [
            asyncio.create_task(sse_get("127.0.0.1", port, f"/v1/jobs/{jobs[i % JOBS]}/events",
                                        source=SOURCES[i % len(SOURCES)], keep_data=True, timeout_s=120))
            for i in range(STREAMS)
        ]
        waits = [
            asyncio.create_task(http_get("127.0.0.1", port, f"/v1/jobs/{jobs[i % JOBS]}?wait=60",
                                         source=SOURCES[i % len(SOURCES)], timeout_s=120))
            for i in range(WAITS)
        ]
        await asyncio.sleep(1.5)  # all open, the jobs still running
        connections = await asyncio.to_thread(_gateway_connections, store)
        during = _by_name(connections)
        # The connections blocked in a command (an XREAD) at that moment.
        blocked = [c["name"] for c in connections if "b" in c.get("flags", "")]
        open_now = sum(not t.done() for t in streams + waits)
        return await asyncio.gather(*streams), await asyncio.gather(*waits), during, blocked, open_now

    streams, waits, during, blocked, open_now = asyncio.run(load())
    assert open_now > (STREAMS + WAITS) // 2, "the jobs ended before the streams were open: lengthen them"
    # A small constant: one reader each, the only connection blocked for the waiters of its process (it may be
    # between two XREADs at the moment of the look), and the pools of short commands (each process's background
    # loops, the sweeper, webhook and batch drivers, take one or two of their own).
    assert during.get(READER) == 2, during
    assert set(blocked) <= {READER} and len(blocked) <= 2, blocked
    assert sum(during.values()) <= 2 * (POOL + 4), during

    errors = [s.error or s.status for s in streams if s.error or s.status != 200]
    assert not errors, errors[:5]
    by_job: dict[str, list] = {}
    for i, stream in enumerate(streams):
        events = stream.events
        assert events[-1][1] == "done", events[-3:]
        done = json.loads(events[-1][2])
        assert done["status"] == "succeeded" and done["id"] == jobs[i % JOBS]
        tokens = [json.loads(data) for _, name, data in events if name == "token"]
        assert [t["index"] for t in tokens] == list(range(TOKENS))
        assert "".join(t["text"] for t in tokens) == done["output"]["text"]
        statuses = [json.loads(data)["status"] for _, name, data in events if name == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        by_job.setdefault(done["id"], []).append([event_id for event_id, _, _ in events])
    for job_id, id_lists in by_job.items():
        assert all(ids == id_lists[0] for ids in id_lists), f"streams of {job_id} differ"
        assert len(set(id_lists[0])) == len(id_lists[0])
    for wait in waits:
        assert wait.status == 200 and json.loads(wait.body)["status"] == "succeeded", (wait.error, wait.body[:200])


@pytest.mark.stack  # a stack of its own, started in the test
def test_streams_and_waits_over_the_cap_get_429_with_retry_after():
    env = _paced_env(MAX_STREAMS_PER_CLIENT="3", WEB_CONCURRENCY="1")
    with running_stack("llamaq-cap-", env) as stack:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            job = client.post("/v1/jobs", json={"prompt": "long", "max_new_tokens": 400}).json()["id"]
            url = f"/v1/jobs/{job}/events"
            with client.stream("GET", url) as a, client.stream("GET", url) as b, client.stream("GET", url) as c:
                assert {a.status_code, b.status_code, c.status_code} == {200}
                for refused in (client.get(url), client.get(f"/v1/jobs/{job}?wait=5"),
                                client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 2})):
                    assert refused.status_code == 429, refused.text
                    assert int(refused.headers["retry-after"]) > 0
                    assert refused.json()["error"]["type"] == "too_many_streams"
                # Nothing was queued by the refused /v1/generate; a plain lookup is not capped.
                assert client.get(f"/v1/jobs/{job}").status_code == 200
                # Another client address is not affected.
                other = httpx.HTTPTransport(local_address="127.0.0.9")
                with httpx.Client(base_url=stack.url, timeout=30, transport=other) as elsewhere:
                    with elsewhere.stream("GET", url) as theirs:
                        assert theirs.status_code == 200
            # Closed streams free their slots (the gateway notices the hang-up within moments).
            deadline = time.monotonic() + 10
            while (reply := client.get(f"/v1/jobs/{job}?wait=0.1")).status_code == 429 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert reply.status_code == 200
            client.delete(f"/v1/jobs/{job}")
