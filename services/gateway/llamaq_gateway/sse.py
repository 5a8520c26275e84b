"""The Server-Sent Events wire format: one event's bytes, and the ping comment. A leaf: the event hub encodes each
entry once with it (`StreamEntry.sse`), the streams that send those entries use it too, and it imports nothing of
the gateway's."""

from __future__ import annotations

from typing import Any

from llamaq_protocol.records import event_data

# A comment line: keeps proxies and clients on the connection, and is no event.
PING = ": ping\n\n"
PING_BYTES = PING.encode()


def sse_event(data: str, event: str | None = None, event_id: str | None = None) -> str:
    """One SSE event; `data` may span lines (each becomes its own `data:` line)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append(f"data: {line}")
    return "\n".join(lines) + "\n\n"


def sse_data(payload: dict[str, Any] | str) -> str:
    """An unnamed `data:` event, as the OpenAI streaming format uses."""
    text = payload if isinstance(payload, str) else event_data(payload)
    return sse_event(text)
