"""The event hub on a real redis-server: every subscriber gets every entry after its resume point, once and in
order, through a fixed number of Redis connections, and across a dropped connection."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from llamaq_gateway import streams
from llamaq_gateway.event_hub import READ_COUNT, READER_CLIENT_NAME, EventHub, SubscriberTooSlow, parse_id
from llamaq_gateway.metrics import SLOW_SUBSCRIBERS_DROPPED
from llamaq_protocol import keys

KEY = keys.events("hubjob")


async def _hub(redis_url: str, readers: int = 1, **options) -> tuple[EventHub, aioredis.Redis]:
    commands = aioredis.Redis.from_url(redis_url)
    hub = EventHub(redis_url, commands, readers=readers, **options)
    hub.start()
    return hub, commands


async def _close(hub: EventHub, commands: aioredis.Redis) -> None:
    started = time.monotonic()
    await hub.aclose()
    # Its readers end at once, none left blocked in an XREAD (a swallowed cancel held one for the whole block).
    assert time.monotonic() - started < 2
    await commands.aclose()


async def _drain(subscription, until: int, timeout_s: float = 10) -> list:
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < until and time.monotonic() < deadline:
        got.extend(await subscription.next_batch(0.5))
    return got


def test_parse_id_orders_like_redis():
    assert parse_id("5-1") < parse_id("5-2") < parse_id("6-0") == parse_id("6") == parse_id(b"6-0")
    assert parse_id("10-0") > parse_id("9-99")


def test_many_subscribers_late_joiners_and_one_connection(redis_url, store):
    async def run():
        hub, commands = await _hub(redis_url)
        try:
            ids = [(await commands.xadd(KEY, {"event": "token", "data": str(i)})).decode() for i in range(5)]
            early = [await hub.subscribe(KEY, "0-0") for _ in range(50)]
            # Resumes from the middle of what the hub has read, and past it.
            await asyncio.sleep(0.05)
            middle = await hub.subscribe(KEY, ids[2])
            writer_done = asyncio.Event()

            async def writer():
                for i in range(5, 205):
                    await commands.xadd(KEY, {"event": "token", "data": str(i)})
                    if i % 20 == 0:
                        await asyncio.sleep(0.001)
                await commands.xadd(KEY, {"event": "done", "data": "{}"})
                writer_done.set()

            task = asyncio.create_task(writer())
            await asyncio.sleep(0.01)
            joined_mid_write = await hub.subscribe(KEY, ids[0])
            await task
            results = [await _drain(s, 206) for s in early]
            mid = await _drain(middle, 203)
            late = await _drain(joined_mid_write, 205)
            assert hub.followed_streams == 1 and hub.subscriptions == 52
            names = [c.get("name") for c in await commands.client_list()]
            assert names.count(READER_CLIENT_NAME) == 1
            for s in [*early, middle, joined_mid_write]:
                s.close()
            assert hub.followed_streams == 0
            return results, mid, late
        finally:
            await _close(hub, commands)

    results, mid, late = asyncio.run(run())
    expected = [str(i) for i in range(205)] + ["{}"]
    for got in results:
        assert [e.data for e in got] == expected
    assert [e.data for e in mid] == expected[3:]
    assert [e.data for e in late] == expected[1:]
    assert [parse_id(e.id) for e in late] == sorted({parse_id(e.id) for e in late})


def test_new_stream_wakes_the_reader_at_once(redis_url, store):
    async def run():
        hub, commands = await _hub(redis_url, block_ms=5000)
        try:
            await asyncio.sleep(0.05)  # the reader is blocked on its wake stream alone
            subscription = await hub.subscribe(KEY, "0-0")
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await commands.xadd(KEY, {"event": "status", "data": "{}"})
            got = await subscription.next_batch(5)
            return got, time.monotonic() - started
        finally:
            await _close(hub, commands)

    got, waited = asyncio.run(run())
    assert [e.event for e in got] == ["status"]
    assert waited < 0.5


def test_done_only_and_the_entries_on_other_streams(redis_url, store):
    async def run():
        hub, commands = await _hub(redis_url, readers=2)
        try:
            other = keys.events("other")
            waiting = await hub.subscribe(KEY, "0-0", done_only=True)
            watching = await hub.subscribe(other, "0-0")
            for i in range(10):
                await commands.xadd(KEY, {"event": "token", "data": str(i)})
                await commands.xadd(other, {"event": "token", "data": str(i)})
            assert await waiting.next_batch(0.2) == []
            await commands.xadd(KEY, {"event": "done", "data": "{}"})
            done = await waiting.next_batch(5)
            others = await _drain(watching, 10)
            names = [c.get("name") for c in await commands.client_list()]
            return done, others, names.count(READER_CLIENT_NAME)
        finally:
            await _close(hub, commands)

    done, others, readers = asyncio.run(run())
    assert [e.event for e in done] == ["done"]
    assert [e.data for e in others] == [str(i) for i in range(10)]
    assert readers == 2


def test_a_dropped_reader_connection_loses_nothing(redis_url, store):
    async def run():
        hub, commands = await _hub(redis_url)
        try:
            subscription = await hub.subscribe(KEY, "0-0")
            got = []
            for round_ in range(3):
                for i in range(5):
                    await commands.xadd(KEY, {"event": "token", "data": f"{round_}.{i}"})
                got.extend(await _drain(subscription, 5))
                # Cut the reader off, as a Redis restart or a network blip would; then write while it is away.
                await commands.client_kill_filter(_type="normal", skipme=True)
            for i in range(5):
                await commands.xadd(KEY, {"event": "token", "data": f"3.{i}"})
            got.extend(await _drain(subscription, 5))
            return got
        finally:
            await _close(hub, commands)

    got = asyncio.run(run())
    assert [e.data for e in got] == [f"{r}.{i}" for r in range(4) for i in range(5)]


def test_an_outage_past_the_limit_is_a_connection_error(redis_url, store):
    async def run():
        # A hub whose readers can never connect: Redis is away for good.
        from nginx_local import free_port

        commands = aioredis.Redis.from_url(redis_url)
        hub = EventHub(f"redis://127.0.0.1:{free_port()}/0", commands, outage_limit_s=0.3)
        hub.start()
        try:
            subscription = await hub.subscribe(KEY, "0-0")
            started = time.monotonic()
            with pytest.raises(aioredis.ConnectionError):
                await subscription.next_batch(60)
            return hub.outage_s(), time.monotonic() - started
        finally:
            await _close(hub, commands)

    outage, waited = asyncio.run(run())
    assert outage > 0.3
    # The hub wakes its waiters once the outage passes the limit (each waits on one timer, its whole timeout).
    assert waited < 5


def test_an_id_redis_cannot_read_is_refused(redis_url, store):
    async def run():
        hub, commands = await _hub(redis_url)
        try:
            with pytest.raises(ValueError):
                await hub.subscribe(KEY, str(2**64))
        finally:
            await _close(hub, commands)

    asyncio.run(run())


async def _wait_for(predicate, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_slow_subscriber_is_dropped_with_an_end_it_resumes_from(redis_url, store):
    """One that takes nothing while the job writes holds at most `max_pending` entries; it hands those over, then
    ends; a new subscription after the last one it got reads the rest from Redis. A fast one beside it is not
    disturbed."""

    dropped_before = SLOW_SUBSCRIBERS_DROPPED._value.get()

    async def run():
        hub, commands = await _hub(redis_url, max_pending=50)
        try:
            slow = await hub.subscribe(KEY, "0-0")
            fast = await hub.subscribe(KEY, "0-0")
            fast_got = []
            for i in range(200):
                await commands.xadd(KEY, {"event": "token", "data": str(i)})
                if i % 10 == 9:
                    fast_got.extend(await _drain(fast, i + 1 - len(fast_got)))
            await _wait_for(lambda: slow.too_slow)
            assert hub.subscriptions == 1 and hub.dropped_slow == 1  # no longer fed
            assert SLOW_SUBSCRIBERS_DROPPED._value.get() == dropped_before + 1  # llamaq_stream_subscribers_dropped
            first = await slow.next_batch(1)
            with pytest.raises(SubscriberTooSlow):
                await slow.next_batch(1)
            slow.close()
            resumed = await hub.subscribe(KEY, slow.last_id)
            await commands.xadd(KEY, {"event": "done", "data": "{}"})
            rest = await _drain(resumed, 200 - len(first) + 1)
            fast_got.extend(await _drain(fast, 1))
            resumed.close()
            fast.close()
            return first, rest, fast_got, slow.last_id
        finally:
            await _close(hub, commands)

    first, rest, fast_got, last_id = asyncio.run(run())
    expected = [str(i) for i in range(200)] + ["{}"]
    assert [e.data for e in first] == expected[:50]  # in order, nothing skipped, at most the bound
    assert last_id == first[-1].id
    assert [e.data for e in rest] == expected[50:]
    assert [e.data for e in fast_got] == expected


def test_a_backfill_longer_than_the_bound_is_not_too_slow(redis_url, store):
    """The bound is on what comes after subscribing: joining a long stream that is followed already (its backfill
    read in one go) hands every entry over, as does one read by the reader itself."""

    async def run():
        hub, commands = await _hub(redis_url, max_pending=20)
        try:
            follower = await hub.subscribe(KEY, "0-0")
            for i in range(100):
                await commands.xadd(KEY, {"event": "token", "data": str(i)})
                if i % 10 == 9:
                    await _drain(follower, 10)
            joiner = await hub.subscribe(KEY, "0-0")
            got = await _drain(joiner, 100)
            assert not joiner.too_slow
            await commands.xadd(KEY, {"event": "token", "data": "100"})
            got += await _drain(joiner, 1)
            return got
        finally:
            await _close(hub, commands)

    got = asyncio.run(run())
    assert [e.data for e in got] == [str(i) for i in range(101)]


def test_a_slow_sse_client_gets_an_end_after_its_last_event_and_resumes(redis_url, store):
    """GET /v1/jobs/{id}/events for a client that reads slower than the job writes: the stream closes after the
    last event it was sent (no error, no gap), and a reconnect with that Last-Event-ID reads on to `done`."""
    store.hset(keys.job("slowjob"), mapping={"status": "running"})
    events_key = keys.events("slowjob")

    class Jobs:
        def __init__(self, hub):
            self.hub = hub

        async def ended(self, job_id, owner):
            class Final:
                def public(self):
                    return {"id": job_id, "status": "succeeded"}

            return Final()

    def ids_in(chunks: list[bytes]) -> list[str]:
        return [line[4:] for chunk in chunks for line in chunk.decode().split("\n") if line.startswith("id: ")]

    async def run():
        # The least that makes sense: one XREAD's worth (READ_COUNT), as a reader hands it over at once.
        hub, commands = await _hub(redis_url, max_pending=READ_COUNT)
        jobs = Jobs(hub)
        try:
            written = [(await commands.xadd(events_key, {"event": "status", "data": "{}"})).decode()]
            body = streams.job_event_stream(jobs, "slowjob", "public")
            chunks = [await anext(body)]
            # The client stops reading while the job writes more tokens than that.
            async with commands.pipeline(transaction=False) as pipe:
                for i in range(READ_COUNT + 200):
                    pipe.xadd(events_key, {"event": "token", "data": str(i)})
                written += [entry_id.decode() for entry_id in await pipe.execute()]
            await _wait_for(lambda: hub.dropped_slow == 1)
            chunks += [chunk async for chunk in body]  # ends by itself
            first_ids = ids_in(chunks)
            written.append((await commands.xadd(events_key, {"event": "done", "data": "{}"})).decode())
            store.hset(keys.job("slowjob"), "status", "succeeded")
            again = [chunk async for chunk in streams.job_event_stream(jobs, "slowjob", "public", first_ids[-1])]
            return written, first_ids, ids_in(again), b"".join(again)
        finally:
            await _close(hub, commands)

    written, first_ids, resumed_ids, resumed_body = asyncio.run(run())
    assert first_ids == written[: len(first_ids)] and len(first_ids) <= 1 + READ_COUNT
    assert first_ids + resumed_ids == written
    assert b"event: done" in resumed_body
