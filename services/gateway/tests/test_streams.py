"""The SSE reader: resume points and event framing; heartbeats and when a stream ends, on a real Redis."""

import asyncio

import pytest
import redis.asyncio as aioredis

from llamaq_gateway import sse, streams
from llamaq_gateway.errors import InvalidRequest
from llamaq_gateway.event_hub import EventHub
from llamaq_protocol import keys


def test_resume_point():
    assert streams.resume_point(None, None) == streams.START
    assert streams.resume_point("", "") == streams.START
    assert streams.resume_point("5-1", "3-0") == "5-1"  # the header (what EventSource resends) wins
    assert streams.resume_point(None, " 3-0 ") == "3-0"
    assert streams.resume_point("1700000000000", None) == "1700000000000"
    for bad in ("abc", "1-2-3", "-1", "1-", "$", ">", "9" * 30, str(2**64), f"1-{2**64}"):
        with pytest.raises(InvalidRequest):
            streams.resume_point(bad, None)


def test_sse_framing():
    assert sse.sse_event('{"a":1}', "token", "1-0") == 'id: 1-0\nevent: token\ndata: {"a":1}\n\n'
    assert sse.sse_event("a\nb") == "data: a\ndata: b\n\n"
    assert sse.sse_data({"t": "é\u2028"}) == 'data: {"t":"é\u2028"}\n\n'
    assert sse.PING == ": ping\n\n"


async def _collect(redis_url, job_id, after, write=None, heartbeat_s=0.05):
    """Everything `read_events` yields for the job (None for a ping), while `write(client)` runs alongside."""
    commands = aioredis.Redis.from_url(redis_url)
    hub = EventHub(redis_url, commands)
    hub.start()
    try:
        writer = asyncio.create_task(write(commands)) if write else None
        items = [item async for item in streams.read_events(hub, job_id, after, heartbeat_s=heartbeat_s)]
        if writer:
            await writer
        return items
    finally:
        await hub.aclose()
        await commands.aclose()


def test_reader_pings_on_silence_and_stops_after_done(redis_url, store):
    store.hset(keys.job("j"), mapping={"status": "running"})
    store.xadd(keys.events("j"), {"event": "status", "data": '{"status":"queued"}'})

    async def write(r):
        await asyncio.sleep(0.2)  # silence: pings
        for event, data in (("token", '{"index":0,"text":"Hi"}'), ("status", "{}"), ("done", "{}"), ("token", "{}")):
            await r.xadd(keys.events("j"), {"event": event, "data": data})

    items = asyncio.run(_collect(redis_url, "j", streams.START, write))
    assert items[0].event == "status" and items[1] is None
    assert [i.event for i in items if i is not None] == ["status", "token", "status", "done"]  # done ends it
    tokens = [i for i in items if i is not None and i.event == "token"]
    assert tokens[0].payload() == {"index": 0, "text": "Hi"}
    assert tokens[0].sse == f'id: {tokens[0].id}\nevent: token\ndata: {{"index":0,"text":"Hi"}}\n\n'.encode()


def test_reader_of_a_finished_job_past_its_done_ends_without_pinging(redis_url, store):
    store.hset(keys.job("j"), mapping={"status": "succeeded"})
    assert asyncio.run(_collect(redis_url, "j", "9-0")) == []
    assert asyncio.run(_collect(redis_url, "gone", "9-0")) == []  # expired record


def test_reader_catches_a_done_the_hub_has_not_handed_over(redis_url, store):
    """The job ends just as a heartbeat passes: the status says so before the hub has read `done`."""
    done_id = store.xadd(keys.events("j"), {"event": "done", "data": "{}"}).decode()
    store.hset(keys.job("j"), mapping={"status": "succeeded"})
    items = asyncio.run(_collect(redis_url, "j", "1-0", heartbeat_s=0.001))
    assert [(i.id, i.event) for i in items if i is not None] == [(done_id, "done")]
