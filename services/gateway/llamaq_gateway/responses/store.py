"""Where a response lives: it is a job (id `resp_<hex>`), and what the Responses API needs beyond the job rides in
the job's own Redis record, so it has every guarantee a job has (the queue, cancel, the lost-worker sweep, the
append-only file) and expires with it:

- `resp_request`: the request's settings the response object echoes (model, instructions, tools, text, ...);
- `resp_input`: the input items, with their ids (`input_items`);
- `resp_history`: the conversation before this input (the previous responses' turns, without their instructions),
  which `previous_response_id` continues;
- `resp_store`: "0" for `store: false` (then it cannot be retrieved or continued), `resp_deleted`: "1" once deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llamaq_protocol import Job, keys

from ..errors import JobNotFound, NotFound
from ..jobs import JOB_ID_PATTERN, JobService
from .params import messages_of

ID_PREFIX = "resp_"


class ResponseNotFound(NotFound):
    pass


@dataclass
class StoredResponse:
    job: Job
    request: dict[str, Any]
    input: list[dict[str, Any]]
    history: list[dict[str, Any]]
    stored: bool

    @property
    def id(self) -> str:
        return self.job.id


def record_fields(request: dict[str, Any], items: list[dict[str, Any]], history: list[dict[str, Any]],
                  store: bool) -> dict[str, str]:
    return {"resp_request": json.dumps(request, ensure_ascii=False),
            "resp_input": json.dumps(items, ensure_ascii=False),
            "resp_history": json.dumps(history, ensure_ascii=False), "resp_store": "1" if store else "0"}


async def load(jobs: JobService, response_id: str, owner: str, param: str | None = None,
               include_unstored: bool = False) -> StoredResponse:
    """The response of this key, or ResponseNotFound (404): unknown, another key's, deleted, expired, or not
    stored (`store: false`, unless `include_unstored`: its own creation stream still reads it)."""
    if not response_id.startswith(ID_PREFIX) or not JOB_ID_PATTERN.match(response_id):
        raise ResponseNotFound(f"no response {response_id!r}", param=param)
    record = await jobs.aio.hgetall(keys.job(response_id))
    fields = {k.decode(): v.decode() for k, v in record.items()} if record else {}
    if "resp_request" not in fields or fields.get("resp_deleted") == "1" or (
            fields.get("resp_store") == "0" and not include_unstored):
        raise ResponseNotFound(f"no response {response_id!r}", param=param)
    try:
        job = await jobs.job_of(response_id, record, owner)
    except JobNotFound:
        raise ResponseNotFound(f"no response {response_id!r}", param=param) from None
    return StoredResponse(job=job, request=json.loads(fields["resp_request"]), input=json.loads(fields["resp_input"]),
                          history=json.loads(fields["resp_history"]), stored=fields.get("resp_store") != "0")


async def mark_deleted(jobs: JobService, response_id: str) -> None:
    await jobs.aio.hset(keys.job(response_id), "resp_deleted", "1")


def conversation_after(previous: StoredResponse) -> list[dict[str, Any]]:
    """The turns a response continuing `previous` starts from: its history, its input, and what it answered (its
    text and its function calls)."""
    messages = previous.history + messages_of(previous.input)
    output = previous.job.output
    if output is not None and (output.text or output.tool_calls):
        turn: dict[str, Any] = {"role": "assistant", "content": output.text or None}
        if output.tool_calls:
            turn["tool_calls"] = [call.model_dump() for call in output.tool_calls]
        messages.append(turn)
    return messages
