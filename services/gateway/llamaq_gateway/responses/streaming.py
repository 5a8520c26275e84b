"""A response's events (`stream: true`, and `GET /v1/responses/{id}?stream=true&starting_after=N`), built from its
job's event stream in Redis, which holds everything from the `queued` entry to `done`.

The events are a pure function of those entries, so every reading of the stream, now or after any restart of a
gateway, numbers them alike: resuming after `sequence_number` N replays the stream and sends what comes after N,
exactly the events not yet seen. Should the job's worker be lost mid-answer, another worker continues the answer
from the tokens already sent (the events simply carry on), or, for a response that cannot continue (a schema or
tools to follow, more than one choice), it is queued again and starts over: the items already begun are closed with
status `incomplete` (`response.output_item.done`), a new `response.in_progress` follows once the job runs again,
and the restarted answer comes as new items; the final response holds only the answer that completed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions

from llamaq_protocol.records import EVENT_DONE, EVENT_STATUS, EVENT_TOKEN

from .. import streams
from ..errors import JobNotFound
from ..event_hub import SubscriberTooSlow
from ..jobs import JobService
from ..sse import PING, sse_event
from . import render
from .store import StoredResponse, load

logger = logging.getLogger(__name__)

ENDINGS = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed",
           "cancelled": "response.cancelled"}


class EventBuilder:
    """The events of one response, in order, each with its `sequence_number`."""

    def __init__(self, stored: StoredResponse):
        self.stored = stored
        self.sequence = 0
        self.message: dict[str, Any] | None = None  # the open message item (with its output_index and text)
        self.calls: dict[int, dict[str, Any]] = {}  # open function call items, by the worker's call index
        self.next_index = 0  # output_index of the next item
        self.resuming = False  # the job was re-queued to continue where it stopped (no new in_progress)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _snapshot(self, status: str) -> dict[str, Any]:
        body = render.response_object(self.stored)
        body.update(status=status, output=[], usage=None, error=None, incomplete_details=None, completed_at=None)
        return body

    def status(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        if payload.get("requeued") and payload.get("resumed"):
            self.resuming = True  # another worker continues the answer: its items stay open, nothing to say
        elif payload.get("requeued"):
            events += self._close_all("incomplete")  # the answer starts over on another worker
        elif payload.get("status") == "running" and self.resuming:
            self.resuming = False
        elif payload.get("status") == "queued" and self.sequence == 0:
            events.append(self._event("response.created", response=self._snapshot("queued")))
            events.append(self._event("response.queued", response=self._snapshot("queued")))
        elif payload.get("status") == "running":
            events.append(self._event("response.in_progress", response=self._snapshot("in_progress")))
        return events

    def token(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        text = payload.get("text") or ""
        if text:
            if self.message is None:
                events += self._open_message()
            self.message["text"] += text
            events.append(self._event("response.output_text.delta", item_id=self.message["id"],
                                      output_index=self.message["output_index"], content_index=0, delta=text,
                                      logprobs=[]))
        for delta in payload.get("tool_calls") or ():
            function = delta.get("function") or {}
            call = self.calls.get(delta["index"])
            if call is None:
                events += self._close_message("completed")  # items come one after another
                item = render.call_item(delta.get("id") or "", function.get("name") or "", "", "in_progress")
                call = {**item, "output_index": self._take_index()}
                self.calls[delta["index"]] = call
                events.append(self._event("response.output_item.added", output_index=call["output_index"],
                                          item=item))
            piece = function.get("arguments") or ""
            if piece:
                call["arguments"] += piece
                events.append(self._event("response.function_call_arguments.delta", item_id=call["id"],
                                          output_index=call["output_index"], delta=piece))
        return events

    def done(self, stored: StoredResponse) -> list[dict[str, Any]]:
        """The open items closed as the job's output has them, and the response's final event."""
        self.stored = stored
        final = render.response_object(stored)
        item_status = "incomplete" if final["status"] == "incomplete" else "completed"
        events = self._close_message(item_status)
        by_call_id = {item["call_id"]: item for item in final["output"] if item["type"] == "function_call"}
        for call in self.calls.values():
            arguments = by_call_id.get(call["call_id"], {}).get("arguments", call["arguments"])
            events += self._close_call(call, item_status, arguments)
        self.calls = {}
        events.append(self._event(ENDINGS[final["status"]], response=final))
        return events

    def _take_index(self) -> int:
        self.next_index += 1
        return self.next_index - 1

    def _open_message(self) -> list[dict[str, Any]]:
        item = render.message_item(self.stored.id, "", "in_progress")
        item["content"] = []
        self.message = {"id": item["id"], "output_index": self._take_index(), "text": ""}
        index = self.message["output_index"]
        return [self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part=render.output_text(""))]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        message, self.message = self.message, None
        if message is None:
            return []
        index, text, item_id = message["output_index"], message["text"], message["id"]
        return [self._event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                            part=render.output_text(text)),
                self._event("response.output_item.done", output_index=index,
                            item=render.message_item(self.stored.id, text, status))]

    def _close_call(self, call: dict[str, Any], status: str, arguments: str) -> list[dict[str, Any]]:
        item = render.call_item(call["call_id"], call["name"], arguments, status)
        return [self._event("response.function_call_arguments.done", item_id=call["id"],
                            output_index=call["output_index"], name=call["name"], arguments=arguments),
                self._event("response.output_item.done", output_index=call["output_index"], item=item)]

    def _close_all(self, status: str) -> list[dict[str, Any]]:
        events = self._close_message(status)
        for call in self.calls.values():
            events += self._close_call(call, status, call["arguments"])
        self.calls = {}
        return events


def sse(event: dict[str, Any]) -> str:
    return sse_event(json.dumps(event, ensure_ascii=False, separators=(",", ":")), event=event["type"])


async def response_events(
    jobs: JobService, stored: StoredResponse, owner: str, starting_after: int = -1,
    heartbeat_s: float = streams.HEARTBEAT_S,
) -> AsyncIterator[str]:
    """The response's events as SSE, from the start of its job's stream, those numbered after `starting_after`."""
    builder = EventBuilder(stored)
    try:
        async for entry in streams.read_events(jobs.hub, stored.id, heartbeat_s=heartbeat_s):
            if entry is None:
                yield PING
                continue
            if entry.event == EVENT_STATUS:
                events = builder.status(entry.payload())
            elif entry.event == EVENT_TOKEN:
                events = builder.token(entry.payload())
            elif entry.event == EVENT_DONE:
                events = builder.done(await load(jobs, stored.id, owner, include_unstored=True))
            else:
                events = []
            for event in events:
                if event["sequence_number"] > starting_after:
                    yield sse(event)
            if entry.event == EVENT_DONE:
                return
    except SubscriberTooSlow as exc:
        # Read too slowly: an end it resumes from (starting_after=the last sequence_number it got), not a buffer
        # that grows without bound.
        logger.warning("response stream of %s ended early: %s", stored.id, exc)
        yield sse({"type": "error", "sequence_number": builder.sequence, "code": "stream_too_slow",
                   "message": f"the stream of {stored.id} was read too slowly; resume it with GET "
                              f"/v1/responses/{stored.id}?stream=true&starting_after=<last sequence_number>",
                   "param": None})
    except (redis.exceptions.RedisError, JobNotFound) as exc:
        logger.warning("response stream of %s ended early: %s", stored.id, exc)
        yield sse({"type": "error", "sequence_number": builder.sequence, "code": "unavailable",
                   "message": f"lost the event stream of {stored.id}; GET /v1/responses/{stored.id}", "param": None})
