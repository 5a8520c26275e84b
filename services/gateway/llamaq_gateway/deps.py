"""FastAPI dependencies as `Annotated` aliases, so handlers stay one-liners.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per request.
"""

from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import Depends, Header, Request

from llamaq_protocol import keys

from .batch_api.batches import BatchService
from .callers import Caller, Keyring, open_caller, state_headers
from .errors import InvalidParameter, Unauthorized
from .batch_api.files import FileStore
from .jobs import JobService
from .limits import StreamSlots
from .settings import GatewaySettings


async def _settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


async def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def _files(request: Request) -> FileStore:
    return request.app.state.files


async def _batches(request: Request) -> BatchService:
    return request.app.state.batches


def client_address(request: Request) -> str:
    """The client's address: nginx's X-Real-IP (set from the connection, or from a trusted proxy's
    X-Forwarded-For with TRUSTED_PROXIES; never passed on from the client), else the connection's own."""
    return request.headers.get("x-real-ip") or (request.client.host if request.client else "unknown")


async def _caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """Who is asking (callers.py): with keys configured, the holder of a valid bearer key; with the API open, the
    client's address. Kept on the request, so every dependency of one request sees the same caller."""
    caller = getattr(request.state, "caller", None)
    if caller is not None:
        return caller
    keyring: Keyring = request.app.state.keyring
    if keyring.open:
        caller = open_caller(client_address(request))
    else:
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("missing 'Authorization: Bearer <key>' header")
        caller = keyring.caller(presented)
        if caller is None:
            raise Unauthorized("invalid API key")
        if caller.limits.rpm or caller.limits.tpm:
            # OpenAI's x-ratelimit-* headers on every answer to a key with limits (a submission refreshes them).
            bucket = await request.app.state.jobs.aio.hgetall(keys.rate_bucket(caller.client))
            caller.rate_headers = state_headers(bucket, caller.limits)
    request.state.caller = caller
    return caller


async def _owner(caller: Annotated[Caller, Depends(_caller)]) -> str:
    """Whose jobs the request may see: with keys, a digest of the caller's key; with the API open, everyone's."""
    return caller.owner


async def _request_id(request: Request) -> str | None:
    return request.state.request_id


async def _stream_slots(request: Request, caller: Annotated[Caller, Depends(_caller)]) -> StreamSlots:
    """The cap on open streams and waits is per API key; with the API open, per client address."""
    return StreamSlots(request.app.state.stream_limiter, caller.client)


SettingsDep = Annotated[GatewaySettings, Depends(_settings)]
JobsDep = Annotated[JobService, Depends(_jobs)]
FilesDep = Annotated[FileStore, Depends(_files)]
BatchesDep = Annotated[BatchService, Depends(_batches)]
OwnerDep = Annotated[str, Depends(_owner)]
CallerDep = Annotated[Caller, Depends(_caller)]
RequestIdDep = Annotated[str | None, Depends(_request_id)]
StreamSlotsDep = Annotated[StreamSlots, Depends(_stream_slots)]
# `Idempotency-Key` on every submit route: the same key with the same body gives the same job (a retry after a lost
# answer waits on it, or replays it); with another body it is 400. A `str` with a None default at the use sites, so
# the schema says "a string, or leave it out".
IdempotencyKeyDep = Annotated[str, Header(max_length=256, description="the same key and body give the same job")]

# `Cancel-After` (Replicate's header) on every submit route: how long the job may take from its submission, as seconds
# or a duration of number-unit parts ("90", "30s", "5m", "1h30m", "1.5h"; ms, s, m, h, d). Past it a queued job never
# starts and a running one stops: `canceled`, with `error.type` "deadline_exceeded".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """A Cancel-After value in seconds, or InvalidParameter."""
    text = text.strip()
    seconds = float(text) if re.fullmatch(r"\d+(?:\.\d+)?", text) else None
    if seconds is None and text and _DURATION_PART.sub("", text) == "":
        seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))
    if not seconds or seconds <= 0:
        raise InvalidParameter(f"Cancel-After: {text!r} is not a positive duration (seconds, or e.g. 30s, 5m, 1h30m)",
                               param="Cancel-After")
    return seconds


async def _deadline(
    cancel_after: Annotated[str, Header(max_length=64, description="cancel the job this long after submission "
                                                                   "(seconds, or 30s, 5m, 1h30m)")] = None,
) -> float | None:
    return None if cancel_after is None else time.time() + duration_s(cancel_after)


DeadlineDep = Annotated[float | None, Depends(_deadline)]
