"""`GET /v1/jobs` through the real stack (echo engine, API_KEYS set): each key's own jobs, newest first, a page at a
time by cursor, filtered by status, bounded, and rid of jobs that expired."""

from __future__ import annotations

import httpx
import pytest
import redis

from conftest import running_stack, stack_environment
from llamaq_protocol import keys

KEY_A, KEY_B = "list-key-a", "list-key-b"


@pytest.fixture(scope="module")
def echo_stack():
    with running_stack("llamaq-lists-", stack_environment(ENGINE="echo", API_KEYS=f"{KEY_A},{KEY_B}")) as running:
        yield running


def client_for(stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def submit(client: httpx.Client, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job = client.post("/v1/generate", json={"prompt": f"job {i}", "max_new_tokens": 4, "wait_s": 30})
        assert job.status_code == 200, job.text
        ids.append(job.json()["id"])
    return ids


def pages(client: httpx.Client, **params) -> list[dict]:
    out, after = [], None
    while True:
        page = client.get("/v1/jobs", params={**params, **({"after": after} if after else {})})
        assert page.status_code == 200, page.text
        out.append(page.json())
        if not page.json()["has_more"]:
            return out
        after = page.json()["last_id"]


def test_each_key_pages_through_its_own_jobs_newest_first(echo_stack) -> None:
    with client_for(echo_stack, KEY_A) as a, client_for(echo_stack, KEY_B) as b:
        mine, theirs = submit(a, 5), submit(b, 2)
        listed = pages(a, limit=2)
        assert [len(p["data"]) for p in listed] == [2, 2, 1]
        assert [j["id"] for p in listed for j in p["data"]] == mine[::-1]
        assert listed[0]["object"] == "list" and listed[0]["first_id"] == mine[-1]
        assert all(j["status"] == "succeeded" and j["output"]["text"] for p in listed for j in p["data"])
        assert [j["id"] for j in b.get("/v1/jobs").json()["data"]] == theirs[::-1]

        # Another key's job is no cursor here.
        foreign = b.get("/v1/jobs", params={"after": mine[0]})
        assert foreign.status_code == 400
        assert foreign.json()["error"]["type"] == "invalid_request" and "after" in foreign.json()["error"]["message"]
        assert httpx.get(f"{echo_stack.url}/v1/jobs").status_code == 401


def test_status_filter_and_bounds(echo_stack) -> None:
    with client_for(echo_stack, KEY_A) as a:
        submit(a, 2)
        succeeded = pages(a, status="succeeded", limit=100)
        assert succeeded[-1]["has_more"] is False
        assert all(j["status"] == "succeeded" for p in succeeded for j in p["data"])
        assert a.get("/v1/jobs", params={"status": "failed"}).json() == {
            "object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        for bad in ({"limit": 101}, {"limit": 0}, {"status": "done"}):
            refused = a.get("/v1/jobs", params=bad)
            assert refused.status_code == 422, bad
            assert set(refused.json()["error"]) == {"type", "message", "code"}


def test_an_expired_job_leaves_the_list(echo_stack) -> None:
    store = redis.Redis.from_url(echo_stack.env["REDIS_URL"])
    try:
        with client_for(echo_stack, KEY_B) as b:
            first, second = submit(b, 2)
            index = [key for key in store.scan_iter(f"{keys.PREFIX}:jobs-of:*") if store.zscore(key, first)]
            assert len(index) == 1 and 0 < store.ttl(index[0])
            store.delete(keys.job(first))  # what RESULT_TTL_S does to the record
            ids = [j["id"] for p in pages(b, limit=100) for j in p["data"]]
            assert second in ids and first not in ids
            assert store.zscore(index[0], first) is None
    finally:
        store.close()
