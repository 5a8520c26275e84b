"""Wire models shared by the gateway and the worker.

Everything that crosses Redis is one of these models serialized as JSON: never pickle across the queue.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MAX_STOP_SEQUENCES = 4
# Hard ceiling whatever the deployment sets; the gateway narrows it to MAX_NEW_TOKENS_LIMIT.
ABSOLUTE_MAX_NEW_TOKENS = 1 << 20


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class FinishReason(str, Enum):
    stop = "stop"
    length = "length"
    canceled = "canceled"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


StopText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class GenerationParams(BaseModel):
    """What a client may ask for; `None` means "the model's generation_config.json default"."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    system: str | None = None
    max_new_tokens: int = Field(default=512, ge=1, le=ABSOLUTE_MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop: list[StopText] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value or None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerationParams:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        if self.system is not None and self.messages is not None:
            raise ValueError("'system' goes with 'prompt'; put a system message in 'messages' instead")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation the model's chat template renders."""
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        system = DEFAULT_SYSTEM_PROMPT if self.system is None else self.system
        return [{"role": "system", "content": system}, {"role": "user", "content": self.prompt or ""}]


class JobPayload(BaseModel):
    """The single argument of the queued RQ job; the worker validates it again."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    params: GenerationParams
    request_id: str | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JobOutput(BaseModel):
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = Field(default_factory=Usage)


class JobError(BaseModel):
    type: str
    message: str


class Job(BaseModel):
    """The public job object (API.md)."""

    id: str
    status: JobStatus
    position: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output: JobOutput | None = None
    error: JobError | None = None

    def public(self) -> dict[str, Any]:
        """`position`, `output` and `error` appear only when they mean something; times always do."""
        data = self.model_dump(mode="json")
        for optional in ("position", "output", "error"):
            if data[optional] is None:
                del data[optional]
        return data


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    """What a worker publishes about its loaded model so the gateway can count prompt tokens exactly."""

    name: str
    context_length: int
    chat_template: str
    special_tokens: dict[str, str] = Field(default_factory=dict)
    defaults: dict[str, float | int] = Field(default_factory=dict)
    tokenizer_digest: str


class WorkerInfo(BaseModel):
    name: str
    model: str
    device: str
    dtype: str
    max_batch: int
    pid: int
    started_at: datetime
