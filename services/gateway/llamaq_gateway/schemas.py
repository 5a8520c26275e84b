"""HTTP-only request and response bodies, and the error responses each route documents in its OpenAPI schema;
the wire models live in llamaq_protocol."""

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, Field

from llamaq_protocol import ErrorBody, GenerationParams

from .jobs import JOB_ID_PATTERN

# A job id as the schema describes it; anything else is simply not found (404), so the pattern is documentation.
JobId = Annotated[str, Path(description="the job's id", json_schema_extra={"pattern": JOB_ID_PATTERN.pattern})]

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_ERRORS: dict[int, str] = {
    400: "malformed JSON, or a request the model cannot run (prompt too long for its context, ...)",
    401: "API_KEYS is set and the `Authorization: Bearer` key is missing or wrong",
    404: "no such job, or one another key created",
    413: "body over 1 MiB (answered by nginx)",
    422: "unknown field, wrong type or out-of-range value",
    429: "queue full (MAX_QUEUE), or this client over its request rate (nginx); nothing was queued",
    503: "Redis unreachable, or no worker with its model loaded",
    504: "the job is still queued or running; poll GET /v1/jobs/{id}",
}
# Every route behind nginx: its rate limit.
COMMON_ERRORS = (429,)


def error_responses(*codes: int, auth: bool = True) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (plus COMMON_ERRORS, and 401 when the route takes keys), all in
    the one error shape. Giving 422 here also replaces FastAPI's default 422 schema, which is not ours."""
    wanted = sorted({*codes, *COMMON_ERRORS, *((401,) if auth else ())})
    responses: dict[int | str, dict[str, Any]] = {}
    for code in wanted:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _ERRORS[code]}
        if code in (429, 503):
            entry["headers"] = _RETRY_AFTER
        responses[code] = entry
    return responses


class GenerateRequest(GenerationParams):
    wait_s: float = Field(default=60, ge=0, le=300, description="how long to hold the request for the result")


class LegacyResponse(BaseModel):
    """The original single-file server's answer, plus the job id."""

    response: str
    status: int = 200
    time: str
    id: str
