"""One gateway process's reader of job event streams: a fixed few Redis connections for all its waiters.

Every request that waits on a job (an SSE stream, `?wait=`, `POST /`, `/v1/generate`, an OpenAI request)
subscribes here instead of holding a Redis connection in its own blocking XREAD. The hub runs `readers` tasks,
each with one connection of its own, blocked in a single XREAD over every job stream some local request follows
(a stream is read once however many clients follow it) plus a private wake stream. Entries are fanned out to the
subscriptions in memory. So a process uses `readers` + its small command pool of Redis connections, whatever the
number of clients.

What a subscription gets: every entry of the stream after its resume point, in order, each once. When the job's
stream is followed already, the entries between the resume point and what the reader has read so far come from
one XRANGE (the backfill) and the rest from the reader; the reader reads each stream from its own position, so an
entry written while a reader reconnects after a Redis outage is read then, not lost. The stream stays the
source of truth: nothing is kept in the hub that Redis does not have.

A new stream wakes its reader through the wake stream (one XADD), so a waiter's first event is not held back
by a block in progress. A stream is dropped from the XREAD once its last subscriber leaves.

A subscriber too slow for its stream (a client that reads its SSE slower than the job writes it: the sender waits
on the socket while the reader keeps handing entries over) holds at most `max_pending` entries not yet taken. The
entry that would go past it is not queued: the subscription stops following the stream, hands over what it holds,
then raises `SubscriberTooSlow`. Every entry it handed over came in order with nothing skipped, so the client
resumes right after the last one it got (`Last-Event-ID`) from Redis, which still has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from llamaq_protocol import keys
from llamaq_protocol.records import EVENT_DONE

from .metrics import SLOW_SUBSCRIBERS_DROPPED
from .sse import sse_event

logger = logging.getLogger(__name__)

START = "0-0"
# Entries one XREAD returns per stream; a stream with more is read on at once.
READ_COUNT = 512
# Longest block of one reader's XREAD: short enough that a dead connection is noticed.
BLOCK_MS = 10_000
# A reader starts at most one XREAD per this interval while entries keep coming, so entries written at GPU rates
# arrive a step's worth at a time rather than one XREAD (of every followed stream) per entry. A read that blocked
# this long already is followed at once: a lone request's next event is not held back.
MIN_READ_INTERVAL_S = 0.002
# Entries one subscription may hold not yet taken (STREAM_MAX_PENDING_EVENTS) before it is dropped as too slow; at
# least READ_COUNT, or a subscriber that reads the stream's history through the reader (one XREAD hands over up to
# READ_COUNT entries at once) could never keep up.
MAX_PENDING = 4096
# Between reconnection attempts while Redis is away.
RECONNECT_S = 0.5
WAKE_TTL_MS = 3_600_000
READER_CLIENT_NAME = "llamaq-gateway-reader"

EntryId = tuple[int, int]


class SubscriberTooSlow(Exception):
    """The subscription held `max_pending` entries its waiter had not taken: it follows the stream no more. Raised
    by `next_batch` once everything handed over before has been taken, so the waiter can end its stream with an end
    the client resumes from (after the last entry it got)."""


def parse_id(value: str | bytes) -> EntryId:
    """A stream entry id (`<ms>-<seq>`, or a bare `<ms>`, which Redis reads as `<ms>-0`) as a comparable pair."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


@dataclass(frozen=True)
class StreamEntry:
    id: str
    event: str
    data: str  # JSON text as stored

    def payload(self) -> dict[str, Any]:
        return json.loads(self.data) if self.data else {}

    @cached_property
    def sse(self) -> bytes:
        """The entry as one SSE event, encoded once however many streams send it."""
        return sse_event(self.data, self.event, self.id).encode()

    @property
    def ends(self) -> bool:
        return self.event == EVENT_DONE


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(raw_id: str | bytes, fields: dict) -> StreamEntry:
    return StreamEntry(id=_text(raw_id), event=_text(fields.get(b"event", b"")), data=_text(fields.get(b"data", b"")))


def entries_of(raw: Iterable) -> list[StreamEntry]:
    """StreamEntry objects from redis-py's XRANGE / XREAD reply, `[(id, {field: value})]`."""
    return [_entry(raw_id, fields) for raw_id, fields in raw]


def entries_of_flat(raw: Iterable) -> list[StreamEntry]:
    """StreamEntry objects from Redis' own reply, `[[id, [field, value, ...]]]` (the readers' XREAD skips
    redis-py's reshaping into dicts, a sixth of the gateway's CPU per token relayed)."""
    return [_entry(raw_id, dict(zip(flat[::2], flat[1::2]))) for raw_id, flat in raw]


class Subscription:
    """One waiter's view of a job's stream: the entries after its resume point, as they come.

    `done_only`: only the `done` entry is handed over (a request that waits for the job's end is not woken by
    each token)."""

    __slots__ = ("_hub", "_topic", "_floor", "_pending", "_limit", "_ready", "done_only", "closed", "last_id",
                 "too_slow")

    def __init__(self, hub: EventHub, topic: _Topic, after: EntryId, done_only: bool):
        self._hub = hub
        self._topic = topic
        # Entries up to this id are not this subscription's (it resumed after them); None once past it.
        self._floor: EntryId | None = after
        self._pending: deque[StreamEntry] = deque()
        # Most entries `_pending` may hold: the hub's bound (plus a backfill not yet taken).
        self._limit = hub.max_pending
        self._ready = asyncio.Event()
        self.done_only = done_only
        self.closed = False
        # The id of the last entry handed over (or the resume point).
        self.last_id = format_id(after)
        # Set once it held `hub.max_pending` entries not taken: it follows the stream no more.
        self.too_slow = False

    def _deliver(self, entries: list[StreamEntry], ids: list[EntryId]) -> None:
        floor = self._floor
        if floor is not None:
            first = next((i for i, entry_id in enumerate(ids) if entry_id > floor), None)
            if first is None:
                return
            self._floor = None
            entries = entries[first:]
        if self.done_only:
            entries = [e for e in entries if e.ends]
            if not entries:
                return
        self._queue(entries)

    def _queue(self, entries: list[StreamEntry]) -> None:
        """`entries` after those pending, up to its limit in all; past it, the subscription is too slow."""
        if self.too_slow:
            return
        room = self._limit - len(self._pending)
        if len(entries) > room:
            self._pending.extend(entries[:max(room, 0)])
            self._give_up()
        else:
            self._pending.extend(entries)
        self._ready.set()

    def _give_up(self) -> None:
        self.too_slow = True
        self._hub.dropped_slow += 1
        SLOW_SUBSCRIBERS_DROPPED.inc()
        logger.warning("a subscriber of %s held %d entries it had not taken: dropped (it resumes from Redis)",
                       self._topic.key, len(self._pending))
        self._hub._unsubscribe(self)

    async def next_batch(self, timeout_s: float) -> list[StreamEntry]:
        """Every entry come since the last call (waiting up to `timeout_s` for one); [] when none came.

        While Redis is away the wait goes on (the reader reconnects and reads on from where it was); once it has
        been away `hub.outage_limit_s`, redis' ConnectionError is raised."""
        deadline = time.monotonic() + timeout_s
        while not self._pending:
            if self.too_slow:
                raise SubscriberTooSlow(f"fell {self._hub.max_pending} entries behind {self._topic.key}; resume "
                                        f"after {self.last_id}")
            self._hub.check_outage()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._ready.clear()
            # One timer for the whole wait: an outage past the limit wakes every subscription (EventHub._run),
            # so ten thousand idle waiters do not each poll.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
        batch = list(self._pending)
        self._pending.clear()
        self._limit = self._hub.max_pending
        self.last_id = batch[-1].id
        return batch

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(eq=False)
class _Topic:
    """A followed stream: where its reader has read to, and who follows it."""

    key: str
    last_id: EntryId
    reader: _Reader
    subscriptions: set[Subscription] = field(default_factory=set)


@dataclass(eq=False)
class _Reader:
    index: int
    wake_key: str
    topics: dict[str, _Topic] = field(default_factory=dict)
    wake_last: str = START
    wake_pending: bool = False
    task: asyncio.Task | None = None
    connection: aioredis.Redis | None = None


class EventHub:
    """`await hub.subscribe(keys.events(job_id), after)` -> a Subscription; close it when done (or `with`)."""

    def __init__(
        self,
        redis_url: str,
        commands: aioredis.Redis,
        readers: int = 1,
        outage_limit_s: float = 30.0,
        block_ms: int = BLOCK_MS,
        max_pending: int = MAX_PENDING,
    ):
        self.redis_url = redis_url
        # Short commands (backfill, wake-ups) go through the process's ordinary pool.
        self.commands = commands
        self.outage_limit_s = outage_limit_s
        self.block_ms = block_ms
        # Entries one subscription may hold not yet taken (see SubscriberTooSlow).
        self.max_pending = max_pending
        prefix = f"{keys.PREFIX}:gateway-wake:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._readers = [_Reader(i, f"{prefix}:{i}") for i in range(readers)]
        self._topics: dict[str, _Topic] = {}
        self._down_since: float | None = None
        self._closing = False
        # Counters for /metrics and the benchmarks.
        self.reads = 0
        self.entries_read = 0
        self.dropped_slow = 0

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        for reader in self._readers:
            reader.task = asyncio.create_task(self._run(reader), name=f"event-hub-reader-{reader.index}")

    async def aclose(self) -> None:
        self._closing = True
        for reader in self._readers:
            if reader.task is not None:
                # Cancelled again until it ends: redis-py sends each command through asyncio.wait_for, which on
                # Python 3.11 swallows a cancel that lands as the send completes (the XREAD would then block on).
                while not reader.task.done():
                    reader.task.cancel()
                    await asyncio.wait({reader.task}, timeout=0.1)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    reader.task.result()
            await self._drop_connection(reader)

    def _connect(self) -> aioredis.Redis:
        connection = aioredis.Redis.from_url(
            self.redis_url,
            single_connection_client=True,
            client_name=READER_CLIENT_NAME,
            socket_timeout=self.block_ms / 1000 + 15,
            socket_connect_timeout=5,
            # This loop reconnects by itself (and reads again from its own positions), noticing an outage at once.
            retry=Retry(NoBackoff(), 0),
            protocol=3,
        )
        # XREAD answers Redis' own RESP3 reply, `{key: [[id, [field, value, ...]]]}` (see _dispatch).
        connection.set_response_callback("XREAD", lambda response, **options: response)
        return connection

    # ---- state ------------------------------------------------------------------------------------------------

    @property
    def followed_streams(self) -> int:
        return len(self._topics)

    @property
    def subscriptions(self) -> int:
        return sum(len(t.subscriptions) for t in self._topics.values())

    def outage_s(self) -> float:
        """How long the readers have been unable to reach Redis (0 while they can)."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def check_outage(self) -> None:
        if self.outage_s() > self.outage_limit_s:
            raise redis.exceptions.ConnectionError(
                f"Redis has been unreachable for {self.outage_s():.0f} s (the event readers keep trying)"
            )

    # ---- subscribing ------------------------------------------------------------------------------------------

    async def subscribe(self, key: str, after: str | bytes = START, done_only: bool = False) -> Subscription:
        """Follow `key` from after `after`. Raises redis errors only from the backfill or the wake-up (Redis away
        at this very moment); once subscribed, outages are ridden out as `Subscription.next_batch` says."""
        position = parse_id(after)
        if max(position) >= 2**64:
            raise ValueError(f"not a stream entry id: {after!r}")
        topic = self._topics.get(key)
        if topic is None:
            reader = self._readers[hash(key) % len(self._readers)]
            topic = _Topic(key, position, reader)
            self._topics[key] = topic
            reader.topics[key] = topic
            subscription = Subscription(self, topic, position, done_only)
            topic.subscriptions.add(subscription)
            try:
                await self._wake(reader)
            except BaseException:
                subscription.close()
                raise
            return subscription
        # The stream is followed already: what its reader has passed comes from one XRANGE; whatever the reader
        # reads from now on is queued meanwhile (ids above `upto`), so nothing falls in between.
        upto = topic.last_id
        subscription = Subscription(self, topic, max(position, upto), done_only)
        topic.subscriptions.add(subscription)
        if position < upto:
            try:
                backfill = await self._backfill(key, position, upto)
            except BaseException:
                subscription.close()
                raise
            if backfill:
                if done_only:
                    backfill = [e for e in backfill if e.ends]
                # The backfill is what the stream held already (finite, read once): the bound is on what comes
                # after it. What the reader queued meanwhile follows it.
                subscription._limit += len(backfill)
                queued = list(subscription._pending)
                subscription._pending.clear()
                if subscription.too_slow:  # dropped while the backfill was read: what it holds is still gap-free
                    subscription._pending.extend(backfill + queued)
                    subscription._ready.set()
                else:
                    subscription._queue(backfill + queued)
        subscription.last_id = format_id(position)
        return subscription

    async def _backfill(self, key: str, after: EntryId, upto: EntryId) -> list[StreamEntry]:
        found: list[StreamEntry] = []
        start = f"({format_id(after)}"
        end = format_id(upto)
        while True:
            page = entries_of(await self.commands.xrange(key, start, end, count=READ_COUNT))
            found.extend(page)
            if len(page) < READ_COUNT:
                return found
            start = f"({page[-1].id}"

    def _unsubscribe(self, subscription: Subscription) -> None:
        topic = subscription._topic
        topic.subscriptions.discard(subscription)
        if not topic.subscriptions and self._topics.get(topic.key) is topic:
            del self._topics[topic.key]
            del topic.reader.topics[topic.key]

    async def _wake(self, reader: _Reader) -> None:
        """Make the reader's XREAD in progress return, so its next one includes the new stream."""
        if reader.wake_pending or reader.task is None:
            return
        reader.wake_pending = True
        try:
            async with self.commands.pipeline(transaction=False) as pipe:
                pipe.xadd(reader.wake_key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.pexpire(reader.wake_key, WAKE_TTL_MS)
                await pipe.execute()
        except BaseException:
            reader.wake_pending = False
            if self._down_since is not None:
                return  # the reader is reconnecting: its next XREAD includes the stream anyway
            raise

    # ---- reading ----------------------------------------------------------------------------------------------

    async def _drop_connection(self, reader: _Reader) -> None:
        if reader.connection is not None:
            connection, reader.connection = reader.connection, None
            with contextlib.suppress(Exception):
                await connection.aclose()

    async def _run(self, reader: _Reader) -> None:
        while not self._closing:
            try:
                if reader.connection is None:
                    reader.connection = self._connect()
                streams = {reader.wake_key: reader.wake_last}
                for key, topic in reader.topics.items():
                    streams[key] = format_id(topic.last_id)
                reader.wake_pending = False
                read_started = time.monotonic()
                reply = await reader.connection.execute_command(
                    "XREAD", "COUNT", READ_COUNT, "BLOCK", self.block_ms, "STREAMS", *streams, *streams.values()
                )
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    logger.warning("event reader %d lost Redis: %s; reconnecting", reader.index, exc)
                await self._drop_connection(reader)
                await asyncio.sleep(RECONNECT_S)
                if self.outage_s() > self.outage_limit_s:
                    self._wake_waiters(reader)  # each raises from next_batch: Redis has been away too long
                continue
            except Exception:  # never leave the waiters without a reader
                logger.exception("event reader %d failed; starting over", reader.index)
                await self._drop_connection(reader)
                await asyncio.sleep(RECONNECT_S)
                continue
            if self._down_since is not None:
                logger.warning("event reader %d reached Redis again", reader.index)
                self._down_since = None
            self.reads += 1
            if reply and self._dispatch(reader, reply):
                pause = read_started + MIN_READ_INTERVAL_S - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)

    def _wake_waiters(self, reader: _Reader) -> None:
        for topic in reader.topics.values():
            for subscription in topic.subscriptions:
                subscription._ready.set()

    def _dispatch(self, reader: _Reader, reply) -> int:
        """Hands the entries read (Redis' own reply: `{key: [[id, [field, value, ...]]]}`) to their subscriptions;
        returns how many job entries there were."""
        count = 0
        for raw_key, raw_entries in reply.items():
            key = raw_key.decode()
            if key == reader.wake_key:
                if raw_entries:
                    reader.wake_last = raw_entries[-1][0].decode()
                continue
            topic = reader.topics.get(key)
            if topic is None or not raw_entries:
                continue  # no one follows it any more
            entries = entries_of_flat(raw_entries)
            ids = [parse_id(e.id) for e in entries]
            topic.last_id = ids[-1]
            count += len(entries)
            for subscription in list(topic.subscriptions):
                subscription._deliver(entries, ids)
        self.entries_read += count
        return count
