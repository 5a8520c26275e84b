"""Webhook signing, address checks and the deliverer's handling of a URL that turned private, against real Redis."""

import asyncio
import base64

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
