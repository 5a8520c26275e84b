"""The cap on what one client holds open: streams and waits, per API key (or, with no keys, per address).

Everything that waits on a job counts: `GET /v1/jobs/{id}/events`, `?wait=`, `POST /`, `/v1/generate` and the
OpenAI routes (streaming or not). Over `MAX_STREAMS_PER_CLIENT` the request gets 429 + `Retry-After` before
anything is queued, so one client with thousands of streams cannot take the gateway from the others. The count is
kept by each gateway process for its own requests (no Redis round trip, nothing to leak when a process dies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import TooManyStreams


class StreamLimiter:
    def __init__(self, cap: int):
        self.cap = cap
        self.open: dict[str, int] = {}

    def acquire(self, client: str) -> Callable[[], None]:
        """Count one more for `client` (429 when it holds `cap` already); returns its release, safe to call twice."""
        held = self.open.get(client, 0)
        if held >= self.cap:
            raise TooManyStreams(
                f"this client already holds {held} open streams and waits (the most per client is {self.cap}); "
                "close some, or retry later"
            )
        self.open[client] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.open[client] - 1
            if left:
                self.open[client] = left
            else:
                del self.open[client]

        return release

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        release = self.acquire(client)
        try:
            yield
        finally:
            release()


class StreamSlots:
    """One request's access to the limiter, for its own client (see deps.StreamSlotsDep)."""

    def __init__(self, limiter: StreamLimiter, client: str):
        self.limiter = limiter
        self.client = client

    def take(self) -> Callable[[], None]:
        return self.limiter.acquire(self.client)

    def hold(self):
        return self.limiter.hold(self.client)
