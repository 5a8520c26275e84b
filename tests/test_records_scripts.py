"""The job-state scripts on a real redis-server of their own: each may run twice for one call (redis-py re-sends
a command whose connection broke; the worker retries until Redis answers), so each must be idempotent."""

from __future__ import annotations

import pytest
import redis

from llamaq_protocol import keys
from llamaq_protocol.records import (
    CANCEL_SCRIPT,
    CLAIM_SCRIPT,
    FINISH_SCRIPT,
    RECLAIM_SCRIPT,
    TOKENS_SCRIPT,
    end_keys,
    event_data,
    reclaim_keys,
)

JOB = "0123456789abcdef"
WORKER = "host:1"
RQ_QUEUE = "rq:queue:test"
RQ_JOB = f"rq:job:{JOB}"


@pytest.fixture
def r(lone_redis):
    client = redis.Redis.from_url(lone_redis.env["REDIS_URL"])
    client.flushall()
    client.hset(keys.job(JOB), mapping={"status": "queued", "created_at": "t0", "owner": "public"})
    client.xadd(keys.events(JOB), {"event": "status", "data": '{"status":"queued"}'})
    yield client
    client.close()


def claim(r, worker=WORKER):
    return r.eval(CLAIM_SCRIPT, 3, keys.job(JOB), keys.events(JOB), keys.RUNNING, "t1", worker, JOB)


def tokens(r, first, texts, worker=WORKER):
    data = [event_data({"index": first + i, "text": t}) for i, t in enumerate(texts)]
    return r.eval(TOKENS_SCRIPT, 2, keys.job(JOB), keys.events(JOB), worker, first, 100, "", *data)


def token_texts(r):
    return [fields[b"data"] for _, fields in r.xrange(keys.events(JOB)) if fields[b"event"] == b"token"]


def finish(r, finished_at="t2", worker=WORKER):
    return r.eval(FINISH_SCRIPT, len(end_keys(JOB)), *end_keys(JOB), "succeeded", finished_at, "", "", 60, JOB, worker)


def reclaim(r, *extra, worker=WORKER, max_attempts=2):
    reclaiming = reclaim_keys(JOB, RQ_QUEUE, RQ_JOB)
    return r.eval(RECLAIM_SCRIPT, len(reclaiming), *reclaiming,
                  worker, max_attempts, "t3", '{"type":"worker_lost","message":"m"}', 60, JOB, *extra)


def test_a_repeated_claim_by_the_same_worker_counts_one_attempt(r):
    assert claim(r) == b"claimed"
    assert claim(r) == b"claimed"
    assert r.hget(keys.job(JOB), "attempts") == b"1"
    assert claim(r, worker="other:2") == b"running"


def test_tokens_are_written_once_whatever_the_retries(r):
    claim(r)
    assert tokens(r, 0, ["a", "b"]) == 2
    assert tokens(r, 0, ["a", "b"]) == 2  # the same call again: nothing new
    assert tokens(r, 1, ["b", "c"]) == 3  # an overlapping retry writes only what is missing
    assert [b'{"index":0,"text":"a"}', b'{"index":1,"text":"b"}', b'{"index":2,"text":"c"}'] == token_texts(r)


def test_tokens_of_a_job_that_is_no_longer_this_workers_are_refused(r):
    claim(r)
    assert tokens(r, 0, ["a"], worker="other:2") == -1
    assert reclaim(r) == b"requeued"
    assert tokens(r, 1, ["b"]) == -1
    assert token_texts(r) == []  # the void attempt's tokens went with the re-queue


def test_a_repeated_finish_is_recognised_and_a_different_one_is_not(r):
    claim(r)
    assert finish(r) == b"finished"
    assert finish(r) == b"finished"
    assert finish(r, finished_at="later") == b"succeeded"
    assert sum(1 for _, f in r.xrange(keys.events(JOB)) if f[b"event"] == b"done") == 1
    assert r.hgetall(keys.STATS) == {b"succeeded": b"1"}  # counted once, however often the finish ran


def test_hand_back_requeues_without_counting_the_attempt(r):
    claim(r)
    tokens(r, 0, ["a", "b"])
    assert reclaim(r, "handback", max_attempts=0) == b"requeued"
    record = r.hgetall(keys.job(JOB))
    assert record[b"status"] == b"queued" and record[b"attempts"] == b"0"
    assert b"worker" not in record and b"token_events" not in record
    assert token_texts(r) == []
    assert not r.sismember(keys.RUNNING, JOB)
    # The next attempt numbers its tokens from 0 again.
    claim(r, worker="other:2")
    assert tokens(r, 0, ["x"], worker="other:2") == 1


def test_hand_back_of_a_job_whose_cancel_was_asked_ends_it_canceled(r):
    claim(r)
    r.sadd(keys.CANCEL_REQUESTS, JOB)
    assert reclaim(r, "handback") == b"canceled"
    assert r.hget(keys.job(JOB), "status") == b"canceled"
    assert reclaim(r, "handback") == b"canceled"
    assert r.hgetall(keys.STATS) == {b"canceled": b"1"}


def test_cancel_of_a_queued_job_is_counted_once(r):
    args = (CANCEL_SCRIPT, len(end_keys(JOB)), *end_keys(JOB), "t1", JOB, 60)
    assert r.eval(*args) == b"canceled"
    assert r.eval(*args) == b"canceled"
    assert r.hgetall(keys.STATS) == {b"canceled": b"1"}


def test_retries_exhausted_fail_once_as_lost(r):
    claim(r)
    assert reclaim(r, max_attempts=1) == b"failed"
    assert reclaim(r, max_attempts=1) == b"failed"
    assert r.hgetall(keys.STATS) == {b"failed": b"1"}


def test_a_requeue_pushes_the_job_onto_the_rq_queue_once_in_the_same_step(r):
    r.hset(RQ_JOB, "status", "started")
    claim(r)
    assert reclaim(r) == b"requeued"
    assert r.lrange(RQ_QUEUE, 0, -1) == [JOB.encode()]
    assert r.hget(RQ_JOB, "status") == b"queued"
    assert reclaim(r) == b"queued"  # the same call again (its reply lost): nothing pushed twice
    assert r.lrange(RQ_QUEUE, 0, -1) == [JOB.encode()]


def test_a_requeue_of_a_job_rq_no_longer_has_creates_no_rq_hash(r):
    claim(r)
    assert reclaim(r, "handback") == b"requeued"
    assert r.lrange(RQ_QUEUE, 0, -1) == [JOB.encode()]
    assert not r.exists(RQ_JOB)
