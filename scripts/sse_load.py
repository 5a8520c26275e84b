"""A light Server-Sent Events client on raw asyncio sockets, for load tests and benchmarks that hold thousands of
streams from a couple of cores (no HTTP library per stream, no JSON parsing of tokens).

`await sse_get(host, port, path)` reads one `GET` to its end (HTTP/1.1, chunked or not) and returns a
`StreamResult`: the status, the `Retry-After` of a refusal, each event's `id`/`event` (and `data` with
`keep_data`, and always for `done`), and for every event the delay from its Redis entry id (the Redis server's clock,
in ms, when the event was written) to the moment it was read here, for the events written while the stream was open:
on one host, the write-to-read delay end to end.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

_EVENT_SPLIT = re.compile(rb"\r?\n\r?\n")


@dataclass
class StreamResult:
    status: int = 0
    retry_after: str | None = None
    body: bytes = b""  # a refusal's body
    # (id, event, data or None) per event, in order; pings are not events.
    events: list[tuple[str, str, str | None]] = field(default_factory=list)
    delays_ms: list[int] = field(default_factory=list)
    error: str | None = None
    opened_at: float = 0.0  # time.monotonic() when the response headers came
    opened_wall_ms: int = 0  # the same moment, time.time() in ms (the clock of entry ids on one host)
    closed_at: float = 0.0

    def count(self, event: str) -> int:
        return sum(1 for _, name, _ in self.events if name == event)


def _parse_events(block: bytes, result: StreamResult, keep_data: bool, now_ms: int) -> None:
    for raw in _EVENT_SPLIT.split(block):
        if not raw or raw.startswith(b":"):
            continue
        event_id = name = ""
        data: list[str] = []
        for line in raw.split(b"\n"):
            line = line.rstrip(b"\r")
            if line.startswith(b"id: "):
                event_id = line[4:].decode()
            elif line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data.append(line[6:].decode())
        if not event_id and not name:
            continue
        # The data of `done` (the job object) is always kept: what a load test checks the stream against.
        result.events.append((event_id, name, "\n".join(data) if keep_data or name == "done" else None))
        written_ms = int(event_id.partition("-")[0]) if event_id else 0
        if written_ms >= result.opened_wall_ms:  # written while this stream was open: a live event, not replay
            result.delays_ms.append(now_ms - written_ms)


async def sse_get(
    host: str,
    port: int,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    source: str | None = None,
    keep_data: bool = False,
    timeout_s: float = 600,
    stop_after: str | None = "done",
) -> StreamResult:
    """One GET read to its end (or to the `stop_after` event, then hung up on). `source`: the local address to
    connect from (127.0.0.x, so that nginx's per-address limits see several clients)."""
    result = StreamResult()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                host, port, local_addr=(source, 0) if source else None, limit=1 << 20
            )
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            result.opened_at = time.monotonic()
            result.opened_wall_ms = int(time.time() * 1000)
            lines = head.decode("latin-1").split("\r\n")
            result.status = int(lines[0].split()[1])
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            result.retry_after = fields.get("retry-after")
            chunked = fields.get("transfer-encoding", "").lower() == "chunked"
            if result.status != 200:
                length = int(fields.get("content-length", "0") or 0)
                result.body = await reader.readexactly(length) if length else b""
                return result
            pending = b""
            while True:
                if chunked:
                    size_line = await reader.readline()
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data = await reader.readexactly(size + 2)
                    data = data[:-2]
                else:
                    data = await reader.read(65536)
                    if not data:
                        break
                pending += data
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                block, pending = pending[: cut + 2], pending[cut + 2:]
                before = len(result.events)
                _parse_events(block, result, keep_data, int(time.time() * 1000))
                if stop_after and any(name == stop_after for _, name, _ in result.events[before:]):
                    break
            if pending.strip():
                _parse_events(pending, result, keep_data, int(time.time() * 1000))
    except Exception as exc:  # a load test counts errors rather than stopping at the first
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.closed_at = time.monotonic()
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:
                pass
    return result


async def http_get(
    host: str, port: int, path: str, *, source: str | None = None, timeout_s: float = 60
) -> StreamResult:
    """A plain GET (a `?wait=` or a job lookup): its status and body (`Connection: close`)."""
    result = StreamResult()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            raw = await reader.read(-1)
            result.opened_at = time.monotonic()
            head, _, body = raw.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            result.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "retry-after":
                    result.retry_after = value.strip()
                if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    body = _dechunk(body)
            result.body = body
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.closed_at = time.monotonic()
        if writer is not None:
            writer.close()
    return result


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out
