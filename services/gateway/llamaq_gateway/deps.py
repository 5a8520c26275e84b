"""FastAPI dependencies as `Annotated` aliases, so handlers stay one-liners.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per request.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from .batches import BatchService
from .errors import Unauthorized
from .files import FileStore
from .jobs import JobService
from .limits import StreamSlots
from .settings import GatewaySettings

PUBLIC_OWNER = "public"


async def _settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


async def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def _files(request: Request) -> FileStore:
    return request.app.state.files


async def _batches(request: Request) -> BatchService:
    return request.app.state.batches


async def _owner(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """Who is asking: with API_KEYS set, a digest of their key (jobs are visible to that key only)."""
    valid_keys: list[str] = request.app.state.api_keys
    if not valid_keys:
        return PUBLIC_OWNER
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized("missing 'Authorization: Bearer <key>' header")
    # Compare against every key so the time taken does not tell which one nearly matched.
    matched = False
    for key in valid_keys:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    if not matched:
        raise Unauthorized("invalid API key")
    return hashlib.sha256(presented.encode()).hexdigest()[:32]


async def _request_id(request: Request) -> str | None:
    return request.state.request_id


async def _stream_slots(request: Request, owner: Annotated[str, Depends(_owner)]) -> StreamSlots:
    """The cap on open streams and waits is per API key; with the API open, per client address (nginx's
    X-Real-IP, which it sets from the connection and never passes from the client)."""
    if owner != PUBLIC_OWNER:
        client = f"key:{owner}"
    else:
        client = request.headers.get("x-real-ip") or (request.client.host if request.client else "unknown")
        client = f"addr:{client}"
    return StreamSlots(request.app.state.stream_limiter, client)


SettingsDep = Annotated[GatewaySettings, Depends(_settings)]
JobsDep = Annotated[JobService, Depends(_jobs)]
FilesDep = Annotated[FileStore, Depends(_files)]
BatchesDep = Annotated[BatchService, Depends(_batches)]
OwnerDep = Annotated[str, Depends(_owner)]
RequestIdDep = Annotated[str | None, Depends(_request_id)]
StreamSlotsDep = Annotated[StreamSlots, Depends(_stream_slots)]
# `Idempotency-Key` on every submit route: the same key with the same body gives the same job (a retry after a lost
# answer waits on it, or replays it); with another body it is 400. A `str` with a None default at the use sites, so
# the schema says "a string, or leave it out".
IdempotencyKeyDep = Annotated[str, Header(max_length=256, description="the same key and body give the same job")]
