"""The job-state scripts on a real redis-server of their own: each may run twice for one call (redis-py re-sends
a command whose connection broke; the worker retries until Redis answers), so each must be idempotent."""

from __future__ import annotations

import json
import time

import pytest
import redis

from llamaq_protocol import JobError, keys
from llamaq_protocol.records import (
    CANCEL_SCRIPT,
    CLAIM_SCRIPT,
    FINISH_SCRIPT,
    RECLAIM_SCRIPT,
    TOKENS_SCRIPT,
    claim_keys,
    end_keys,
    event_data,
    job_from_record,
    reclaim_keys,
    tokens_call,
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
    return r.eval(CLAIM_SCRIPT, len(claim_keys(JOB)), *claim_keys(JOB), "t1", worker, JOB)


def token_data(first, texts):
    return [event_data({"index": first + i, "text": t}) for i, t in enumerate(texts)]


def tokens_of_many(r, writes, worker=WORKER):
    """One TOKENS_SCRIPT call for several jobs: `writes` holds (job id, first index, texts, partial output)."""
    call_keys, args = tokens_call(worker, [(job, first, 100, partial, token_data(first, texts), first + len(texts))
                                           for job, first, texts, partial in writes])
    return r.eval(TOKENS_SCRIPT, len(call_keys), *call_keys, *args)


def tokens(r, first, texts, worker=WORKER):
    (count,) = tokens_of_many(r, [(JOB, first, texts, "")], worker=worker)
    return count


def token_texts(r, job=JOB):
    return [fields[b"data"] for _, fields in r.xrange(keys.events(job)) if fields[b"event"] == b"token"]


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


def test_one_call_writes_many_jobs_each_once_and_refuses_only_the_lost_one(r):
    jobs = [JOB, "job-b", "job-c", "job-gone"]
    claim(r)
    for job in jobs[1:3]:
        r.hset(keys.job(job), mapping={"status": "running", "worker": WORKER})
    r.hset(keys.job("job-c"), "worker", "other:2")  # re-queued and claimed elsewhere meanwhile
    writes = [(JOB, 0, ["a", "b"], '{"text":"ab"}'), ("job-b", 0, ["x"], ""), ("job-c", 0, ["y"], "{}"),
              ("job-gone", 0, ["z"], "")]
    assert tokens_of_many(r, writes) == [2, 1, -1, -1]
    assert tokens_of_many(r, writes) == [2, 1, -1, -1]  # the same call again (its reply lost): nothing new
    # The next step's call, overlapping what was written: only the new events are appended.
    assert tokens_of_many(r, [("job-b", 0, ["x", "w"], ""), (JOB, 2, ["c"], "")]) == [2, 3]
    assert token_texts(r) == [d.encode() for d in token_data(0, ["a", "b", "c"])]
    assert token_texts(r, "job-b") == [d.encode() for d in token_data(0, ["x", "w"])]
    assert token_texts(r, "job-c") == [] and not r.exists(keys.events("job-gone"))
    assert r.hget(keys.job(JOB), "output") == b'{"text":"ab"}'  # the partial output, kept when none is sent
    assert r.hget(keys.job("job-c"), "output") is None
    assert r.hget(keys.job(JOB), "token_events") == b"3"


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


def test_webhook_deliveries_are_queued_once_per_wanted_event(r):
    due = lambda: sorted(m.decode() for m in r.zrange(keys.WEBHOOKS_DUE, 0, -1))  # noqa: E731
    claim(r)
    assert due() == []  # a job without a webhook queues none
    r.hset(keys.job(JOB), "webhook_events", "completed,failed")
    finish(r)
    finish(r)  # run twice: queued once
    assert due() == [f"{JOB}:completed"]

    r.delete(keys.WEBHOOKS_DUE)
    r.hset(keys.job(JOB), mapping={"status": "queued", "webhook_events": "started,canceled"})
    r.hdel(keys.job(JOB), "worker", "finished_at")
    claim(r)
    r.sadd(keys.CANCEL_REQUESTS, JOB)
    assert reclaim(r) == b"canceled"
    assert due() == [f"{JOB}:canceled", f"{JOB}:started"]
    # A member already due (or leased: a future score) is left as it is.
    r.zadd(keys.WEBHOOKS_DUE, {f"{JOB}:canceled": 99})
    assert reclaim(r) == b"canceled"
    assert r.zscore(keys.WEBHOOKS_DUE, f"{JOB}:canceled") == 99


def test_a_resumable_requeue_keeps_the_tokens_for_the_next_worker_to_continue(r):
    r.hset(keys.job(JOB), "resumable", "1")
    assert claim(r) == b"claimed"
    assert tokens(r, 0, ["a", "b", "c"]) == 3
    assert reclaim(r, "handback") == b"requeued"
    # Its tokens, their count and the record's charge stay; the status event says the stream carries on.
    assert token_texts(r) == [event_data({"index": i, "text": t}).encode() for i, t in enumerate("abc")]
    record = r.hgetall(keys.job(JOB))
    assert record[b"token_events"] == b"3" and record[b"generated"] == b"3"
    statuses = [json.loads(f[b"data"]) for _, f in r.xrange(keys.events(JOB)) if f[b"event"] == b"status"]
    assert statuses[-1] == {"status": "queued", "requeued": True, "resumed": True}
    # The next claim says so (and says it again when repeated), and the next worker's tokens are numbered on.
    assert claim(r, worker="other:2") == b"resumed"
    assert claim(r, worker="other:2") == b"resumed"
    assert tokens(r, 3, ["d"], worker="other:2") == 4


def test_a_requeue_that_cannot_resume_drops_the_void_tokens(r):
    assert claim(r) == b"claimed"
    assert tokens(r, 0, ["a", "b"]) == 2
    assert reclaim(r, "handback") == b"requeued"
    assert token_texts(r) == [] and r.hget(keys.job(JOB), "token_events") is None
    assert claim(r, worker="other:2") == b"claimed"


NOW = "2026-12-05T12:00:00+00:00"


def test_a_job_past_its_deadline_never_starts_and_its_cancel_says_why(r):
    r.hset(keys.job(JOB), mapping={"deadline": f"{time.time() - 1:.3f}", "created_at": NOW})
    assert claim(r) == b"expired"
    assert r.hget(keys.job(JOB), "status") == b"queued" and not r.hexists(keys.job(JOB), "attempts")
    reason = JobError(type="deadline_exceeded", message="passed").model_dump_json()
    for _ in range(2):  # the sweep's call re-sent: the second sees the job canceled already
        r.eval(CANCEL_SCRIPT, len(end_keys(JOB)), *end_keys(JOB), NOW, JOB, 60, reason)
    job = job_from_record(JOB, r.hgetall(keys.job(JOB)))
    assert job.status.value == "canceled" and job.error.type == "deadline_exceeded"
    assert r.hget(keys.STATS, "canceled") == b"1"


def test_a_deadline_still_ahead_lets_the_claim_through_and_a_plain_cancel_gives_no_error(r):
    r.hset(keys.job(JOB), mapping={"deadline": f"{time.time() + 60:.3f}", "created_at": NOW})
    assert claim(r) == b"claimed"
    r.hset(keys.job(JOB), mapping={"status": "queued", "started_at": NOW})
    r.eval(CANCEL_SCRIPT, len(end_keys(JOB)), *end_keys(JOB), NOW, JOB, 60)
    assert job_from_record(JOB, r.hgetall(keys.job(JOB))).error is None
