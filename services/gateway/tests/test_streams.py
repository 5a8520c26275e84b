"""The SSE reader without Redis: resume points, event framing, heartbeats and when a stream ends."""

import anyio
import pytest

from llamaq_gateway import streams
from llamaq_gateway.errors import InvalidRequest
from llamaq_protocol import keys


def test_resume_point():
    assert streams.resume_point(None, None) == streams.START
    assert streams.resume_point("", "") == streams.START
    assert streams.resume_point("5-1", "3-0") == "5-1"  # the header (what EventSource resends) wins
    assert streams.resume_point(None, " 3-0 ") == "3-0"
    assert streams.resume_point("1700000000000", None) == "1700000000000"
    for bad in ("abc", "1-2-3", "-1", "1-", "$", ">", "9" * 30):
        with pytest.raises(InvalidRequest):
            streams.resume_point(bad, None)


def test_sse_framing():
    assert streams.sse_event('{"a":1}', "token", "1-0") == 'id: 1-0\nevent: token\ndata: {"a":1}\n\n'
    assert streams.sse_event("a\nb") == "data: a\ndata: b\n\n"
    assert streams.sse_data({"t": "é\u2028"}) == 'data: {"t":"é\u2028"}\n\n'
    assert streams.PING == ": ping\n\n"


class FakeRedis:
    """Serves a fixed list of XREAD replies (None = a block that timed out) and a job status."""

    def __init__(self, replies, status=b"running"):
        self.replies = list(replies)
        self.status = status
        self.reads = []

    async def xread(self, streams_, count=None, block=None):
        self.reads.append((dict(streams_), block))
        if block is None or not self.replies:
            return []
        reply = self.replies.pop(0)
        return [] if reply is None else [[keys.events("j").encode(), reply]]

    async def hget(self, key, field):
        return self.status


def entry(entry_id, event, data="{}"):
    return (entry_id.encode(), {b"event": event.encode(), b"data": data.encode()})


def collect(fake, after=streams.START):
    async def run():
        return [item async for item in streams.read_events(fake, "j", after, heartbeat_s=0.01)]

    return anyio.run(run)


def test_reader_pings_on_silence_and_stops_after_done():
    fake = FakeRedis([
        [entry("1-0", "status", '{"status":"queued"}')],
        None,
        [entry("2-0", "token", '{"index":0,"text":"Hi"}'), entry("3-0", "status"), entry("4-0", "done")],
        [entry("5-0", "token")],  # never read: done ends the stream
    ])
    items = collect(fake)
    assert [None if i is None else (i.id, i.event) for i in items] == [
        ("1-0", "status"), None, ("2-0", "token"), ("3-0", "status"), ("4-0", "done"),
    ]
    assert items[2].payload() == {"index": 0, "text": "Hi"}
    assert [ids[keys.events("j")] for ids, _ in fake.reads] == ["0-0", "1-0", "1-0"]
    assert all(block == 10 for _, block in fake.reads)


def test_reader_of_a_finished_job_past_its_done_ends_without_pinging():
    assert collect(FakeRedis([None], status=b"succeeded"), after="9-0") == []
    assert collect(FakeRedis([None], status=None), after="9-0") == []  # expired record
