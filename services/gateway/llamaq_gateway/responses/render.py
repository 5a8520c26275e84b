"""The response object (OpenAI's `Response`) of a stored response, from its job: status, output items (the
assistant's message, then its function calls), usage, and the request's settings it echoes."""

from __future__ import annotations

from typing import Any

from llamaq_protocol import FinishReason, Job, JobStatus, ToolCall

from .store import ID_PREFIX, StoredResponse

STATUS = {JobStatus.queued: "queued", JobStatus.running: "in_progress", JobStatus.succeeded: "completed",
          JobStatus.failed: "failed", JobStatus.canceled: "cancelled"}
# The request's settings a response object echoes, with OpenAI's defaults for those left out.
ECHOED = {"instructions": None, "max_output_tokens": None, "metadata": {}, "parallel_tool_calls": True,
          "previous_response_id": None, "service_tier": "auto", "temperature": None, "top_p": None,
          "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "truncation": "disabled",
          "user": None, "background": False, "store": True}


def status_of(job: Job) -> str:
    if job.status is JobStatus.succeeded and job.output and job.output.finish_reason is FinishReason.length:
        return "incomplete"
    return STATUS[job.status]


def message_id(response_id: str) -> str:
    return "msg_" + response_id.removeprefix(ID_PREFIX)


def message_item(response_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": message_id(response_id), "type": "message", "role": "assistant", "status": status,
            "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": f"fc_{call_id}", "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def output_items(job: Job) -> list[dict[str, Any]]:
    """What the model said, then the calls it made."""
    output = job.output
    if output is None:
        return []
    status = "incomplete" if status_of(job) == "incomplete" else "completed"
    items = [message_item(job.id, output.text, status)] if output.text else []
    calls: list[ToolCall] = output.tool_calls or []
    items += [call_item(call.id, call.function.name, call.function.arguments, status) for call in calls]
    return items


def usage(job: Job) -> dict[str, Any] | None:
    if job.output is None or not job.status.is_terminal():
        return None
    prompt, completion = job.output.usage.prompt_tokens, job.output.usage.completion_tokens
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def response_object(stored: StoredResponse) -> dict[str, Any]:
    job, request = stored.job, stored.request
    status = status_of(job)
    body: dict[str, Any] = {
        "id": job.id,
        "object": "response",
        "created_at": int(job.created_at.timestamp()),
        "status": status,
        "completed_at": int(job.finished_at.timestamp()) if status == "completed" and job.finished_at else None,
        "error": ({"code": job.error.type, "message": job.error.message} if job.error else None),
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": request.get("model"),
        "output": output_items(job),
        "usage": usage(job),
        "reasoning": {"effort": None, "summary": None},
    }
    for name, default in ECHOED.items():
        value = request.get(name)
        body[name] = default if value is None else value
    return body


def deleted_object(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "deleted": True}
