"""The job API's request and response bodies (`POST /v1/jobs`, `/v1/generate`, `POST /`) and its job id path
parameter; the job and its parameters themselves are llamaq_protocol's (the worker reads them too)."""

from typing import Annotated, Literal

from fastapi import Path
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from llamaq_protocol import GenerationParams, Priority

from ..jobs import JOB_ID_PATTERN
from ..webhooks import DEFAULT_EVENTS, record_fields

# A job id as the schema describes it; anything else is simply not found (404), so the pattern is documentation.
JobId = Annotated[str, Path(description="the job's id", json_schema_extra={"pattern": JOB_ID_PATTERN.pattern})]


class WebhookFields(BaseModel):
    """A job's webhook, as `POST /v1/jobs`, `/v1/generate` and `/v1/responses` take it."""

    model_config = ConfigDict(extra="forbid")

    webhook: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[^/?#\s]+[^\s]*$",
        description="an http(s) URL told of the job's `webhook_events` (Standard Webhooks signatures)",
    )
    webhook_events: list[Literal["completed", "failed", "canceled", "started"]] | None = Field(
        default=None, min_length=1, max_length=4, description="default: completed, failed, canceled",
    )

    @model_validator(mode="after")
    def _events_need_a_webhook(self):
        if self.webhook_events is not None and self.webhook is None:
            raise ValueError("webhook_events needs a webhook")
        return self

    def webhook_record(self) -> dict[str, str] | None:
        """The record fields of the job's webhook, or None."""
        if self.webhook is None:
            return None
        return record_fields(self.webhook, self.webhook_events or list(DEFAULT_EVENTS))


class JobRequest(WebhookFields, GenerationParams):
    """`POST /v1/jobs`: the generation parameters plus what is about the job rather than its text."""

    priority: Priority = Field(
        default=Priority.interactive,
        description="interactive jobs are claimed before every queued batch one; batch jobs fill the remaining room",
    )
    deadline: AwareDatetime | None = Field(
        default=None,
        description="past this time (ISO 8601, or Unix seconds) the job never starts, or stops: `canceled`, with "
                    "`error.type` deadline_exceeded (the `Cancel-After` header does the same, from submission)",
    )

    def deadline_with(self, cancel_after: float | None) -> float | None:
        """The job's deadline as Unix time: the earlier of `deadline` and the Cancel-After header's."""
        times = [t for t in (self.deadline.timestamp() if self.deadline else None, cancel_after) if t is not None]
        return min(times) if times else None

    def generation_params(self) -> GenerationParams:
        """The parameters alone, as the client set them (the job's own fields left out)."""
        own = set(type(self).model_fields) - set(GenerationParams.model_fields)
        return GenerationParams.model_validate(self.model_dump(exclude=own, exclude_unset=True))


class GenerateRequest(JobRequest):
    wait_s: float = Field(default=60, ge=0, le=300, description="how long to hold the request for the result")


class LegacyResponse(BaseModel):
    """The original single-file server's answer, plus the job id."""

    response: str
    status: int = 200
    time: str
    id: str
