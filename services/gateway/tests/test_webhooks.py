"""Webhook signing, address checks and the deliverer's handling of a URL that turned private, against real Redis."""

import asyncio
import contextlib
import base64
import json
import time

import pytest
import redis.asyncio as aioredis

from llamaq_gateway.errors import InvalidRequest
from llamaq_gateway.settings import GatewaySettings
from llamaq_gateway.webhooks import WebhookDeliverer, _public, resolve, secret_key, signature
from llamaq_protocol import keys
from llamaq_protocol.records import new_record
from llamaq_protocol.models import utc_now

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


def test_signature_matches_the_standard_webhooks_example() -> None:
    # The example of the Standard Webhooks reference libraries.
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()])
def test_bad_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValueError):
        secret_key(secret)
    with pytest.raises(ValueError):
        GatewaySettings(webhook_secret=secret)


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("::1", False), ("fe80::1", False),
    ("fc00::1", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("100.64.0.1", False), ("224.0.0.1", False),
])
def test_public_addresses(address: str, public: bool) -> None:
    assert _public(address) is public


def test_resolve_checks_every_address() -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(resolve("http://localhost:8080/x", allow_private=False))
    assert asyncio.run(resolve("http://127.0.0.1:8080/x", allow_private=True)) == "127.0.0.1"


def test_a_delivery_whose_url_turned_private_is_dropped(redis_url, store) -> None:
    """Checked again at delivery: a URL that now resolves privately is never contacted, and not retried."""
    job_id = "hookjob"
    store.hset(keys.job(job_id), mapping={**new_record(utc_now(), None, "public"), "status": "succeeded",
                                          "webhook": "http://localhost:9/x", "webhook_events": "completed"})
    store.zadd(keys.WEBHOOKS_DUE, {f"{job_id}:completed": 0})

    async def run() -> None:
        aio = aioredis.Redis.from_url(redis_url)
        deliverer = WebhookDeliverer(GatewaySettings(redis_url=redis_url, webhook_secret=SECRET), aio)
        try:
            assert await deliverer.deliver_due() == 1
            await asyncio.gather(*deliverer._tasks)
        finally:
            await deliverer.http.aclose()
            await aio.aclose()

    asyncio.run(run())
    assert store.zcard(keys.WEBHOOKS_DUE) == 0 and store.hlen(keys.WEBHOOK_ATTEMPTS) == 0


@pytest.mark.parametrize("url", ["http://example.com:99999/x", "http://example.com:0/x", "http://example.com:http/x",
                                 "http://[::1/x", "http://:80/x"])
def test_unusable_urls_are_invalid_requests(url: str) -> None:
    """A port out of range and the like are the client's mistake (400 at submit), never an error of the gateway."""
    with pytest.raises(InvalidRequest):
        asyncio.run(resolve(url, allow_private=True))


class _Receiver:
    """An HTTP receiver on loopback whose answers the test picks by path: `/ok` 204, `/fail` 500, `/slow` a 200
    whose headers trickle out a byte every 0.2 s (each read well inside any per-read timeout), `/endless` a 200 with
    a body that never ends. It records each request's path and body."""

    def __init__(self):
        self.requests: list[tuple[str, bytes]] = []
        self.endless_sent = 0
        self.server = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            self.requests.append((path, await reader.readexactly(length)))
            if path == "/ok":
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif path == "/fail":
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
            elif path == "/slow":
                for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n":
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.2)
            elif path == "/endless":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
                while True:
                    writer.write(b"x" * 16384)
                    await writer.drain()
                    self.endless_sent += 16384
                    if self.endless_sent > 64 * 1024 * 1024:
                        return
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _settings(redis_url: str, **more) -> GatewaySettings:
    return GatewaySettings(redis_url=redis_url, webhook_secret=SECRET, webhook_allow_private=True, **more)


def _queue(store, job_id: str, url: str, status: str = "succeeded") -> str:
    store.hset(keys.job(job_id), mapping={**new_record(utc_now(), None, "public"), "status": status,
                                          "webhook": url, "webhook_events": "completed"})
    member = f"{job_id}:completed"
    store.zadd(keys.WEBHOOKS_DUE, {member: 0})
    return member


async def _one_round(deliverer: WebhookDeliverer) -> int:
    taken = await deliverer.deliver_due()
    await asyncio.gather(*list(deliverer._tasks))
    return taken


@contextlib.asynccontextmanager
async def _delivering(redis_url, store, job_id: str, path: str, **settings):
    """A receiver on a free port, the job's `completed` delivery to its `path` queued, and a deliverer with these
    settings: (receiver, the delivery's member, deliverer), all closed afterwards."""
    receiver = _Receiver()
    port = await receiver.start()
    member = _queue(store, job_id, f"http://127.0.0.1:{port}{path}")
    aio = aioredis.Redis.from_url(redis_url)
    deliverer = WebhookDeliverer(_settings(redis_url, **settings), aio)
    try:
        yield receiver, member, deliverer
    finally:
        await deliverer.http.aclose()
        await aio.aclose()
        receiver.server.close()


def test_an_attempt_has_an_overall_deadline(redis_url, store) -> None:
    """A receiver that answers a byte at a time gets WEBHOOK_TIMEOUT_S for the whole attempt, not per read."""

    async def run() -> float:
        async with _delivering(redis_url, store, "slowjob", "/slow", webhook_timeout_s=1) as (
                receiver, member, deliverer):
            began = time.monotonic()
            assert await _one_round(deliverer) == 1
            took = time.monotonic() - began
            assert len(receiver.requests) == 1
            # Not delivered: due again after the backoff, one attempt counted.
            assert store.zscore(keys.WEBHOOKS_DUE, member) > time.time()
            assert int(store.hget(keys.WEBHOOK_ATTEMPTS, member)) == 1
            return took

    took = asyncio.run(run())
    assert 0.9 <= took < 3, took  # the headers alone would take about 8 s


def test_at_most_64_kib_of_the_answer_is_read(redis_url, store) -> None:
    """A 2xx whose body never ends counts once its status is in; the attempt reads 64 KiB at most and hangs up."""

    async def run() -> None:
        async with _delivering(redis_url, store, "endlessjob", "/endless", webhook_timeout_s=5) as (
                receiver, member, deliverer):
            began = time.monotonic()
            assert await _one_round(deliverer) == 1
            assert time.monotonic() - began < 3
            assert store.zscore(keys.WEBHOOKS_DUE, member) is None  # delivered
            await asyncio.sleep(0.3)
            # The receiver saw the connection closed long before it ran out of body (socket buffers aside).
            assert receiver.endless_sent < 16 * 1024 * 1024, receiver.endless_sent

    asyncio.run(run())


def test_retries_outlive_the_job_record(redis_url, store) -> None:
    """The delivery keeps its own copy of the job object: after the record expires, retries send the same body."""

    async def run() -> None:
        async with _delivering(redis_url, store, "gonejob", "/fail", webhook_backoff_s=0.05,
                               webhook_retry_for_s=600) as (receiver, member, deliverer):
            assert await _one_round(deliverer) == 1
            copy = store.get(keys.webhook_payload(member))
            assert copy is not None
            assert 600 < store.ttl(keys.webhook_payload(member)) <= 600 + 3600 + 10 + 61
            store.delete(keys.job("gonejob"))  # the record expired (RESULT_TTL_S after the job ended)
            for _ in range(2):
                store.zadd(keys.WEBHOOKS_DUE, {member: 0}, xx=True)
                assert await _one_round(deliverer) == 1
            bodies = [body for path, body in receiver.requests]
            assert len(bodies) == 3 and len(set(bodies)) == 1
            assert json.loads(bodies[0])["id"] == "gonejob" and json.loads(bodies[0])["status"] == "succeeded"
            assert int(store.hget(keys.WEBHOOK_ATTEMPTS, member)) == 3
            # The receiver mends: the copy is delivered, and then nothing of the delivery is left.
            store.set(keys.webhook_payload(member), copy.replace(b"/fail", b"/ok"), keepttl=True)
            store.zadd(keys.WEBHOOKS_DUE, {member: 0}, xx=True)
            assert await _one_round(deliverer) == 1
            assert receiver.requests[-1] == ("/ok", bodies[0])

    asyncio.run(run())
    assert store.zcard(keys.WEBHOOKS_DUE) == 0 and store.hlen(keys.WEBHOOK_ATTEMPTS) == 0
    assert store.keys(keys.webhook_payload("*")) == []


def test_retries_end_after_webhook_retry_for_s(redis_url, store) -> None:
    """Counted from the first attempt (when the copy was taken), whether or not the record is still there."""

    async def run() -> None:
        async with _delivering(redis_url, store, "tiredjob", "/fail", webhook_backoff_s=0.05,
                               webhook_retry_for_s=0.5) as (receiver, member, deliverer):
            assert await _one_round(deliverer) == 1
            assert store.zscore(keys.WEBHOOKS_DUE, member) is not None
            await asyncio.sleep(0.6)
            store.zadd(keys.WEBHOOKS_DUE, {member: 0}, xx=True)
            assert await _one_round(deliverer) == 1
            assert len(receiver.requests) == 2

    asyncio.run(run())
    assert store.zcard(keys.WEBHOOKS_DUE) == 0 and store.hlen(keys.WEBHOOK_ATTEMPTS) == 0
    assert store.keys(keys.webhook_payload("*")) == [] and store.exists(keys.job("tiredjob"))
