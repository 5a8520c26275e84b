"""The per-client cap on open streams and waits."""

import pytest

from llamaq_gateway.errors import TooManyStreams
from llamaq_gateway.limits import StreamLimiter


def test_cap_per_client_and_release_once():
    limiter = StreamLimiter(cap=2)
    first, second = limiter.acquire("a"), limiter.acquire("a")
    other = limiter.acquire("b")  # another client is not affected
    with pytest.raises(TooManyStreams) as refused:
        limiter.acquire("a")
    assert refused.value.status_code == 429 and refused.value.retry_after_s
    first()
    first()  # twice: counted once
    third = limiter.acquire("a")
    with pytest.raises(TooManyStreams):
        limiter.acquire("a")
    for release in (second, third, other):
        release()
    assert limiter.open == {}


def test_hold_releases_on_error():
    limiter = StreamLimiter(cap=1)
    with pytest.raises(RuntimeError), limiter.hold("a"):
        raise RuntimeError
    with limiter.hold("a"):
        assert limiter.open == {"a": 1}
    assert limiter.open == {}
