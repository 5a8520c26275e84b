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
# Most alternatives per token a job may ask log probabilities of (vLLM's default `max_logprobs`, OpenAI's cap).
MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 256
# What an engine can do beyond the parameters every engine honours (ModelCard.capabilities).
CAPABILITY_LOGPROBS = "logprobs"
CAPABILITY_PROMPT_LOGPROBS = "prompt_logprobs"


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


class Priority(str, Enum):
    """Which queue a job waits in: workers claim every queued interactive job before any batch one."""

    interactive = "interactive"
    batch = "batch"


class FinishReason(str, Enum):
    stop = "stop"
    length = "length"
    canceled = "canceled"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


StopText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class GenerationParams(BaseModel):
    """What a client may ask for; `None` means "the model's generation_config.json default".

    The sampling extensions have vLLM's meaning (its `SamplingParams`): `min_p`, `ignore_eos`, `min_tokens`,
    `stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`, `logprobs` (log probabilities of each
    generated token and of its `logprobs` most likely alternatives, from the model's raw distribution) and
    `prompt_logprobs` (the same for every prompt token after the first)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt_token_ids: list[TokenId] | None = Field(
        default=None, min_length=1, description="the prompt as token ids, continued as they are (no chat template)")
    raw_prompt: bool = Field(
        default=False, description="continue `prompt` as raw text (tokenized as is, no chat template, no system)")
    system: str | None = None
    max_new_tokens: int = Field(default=512, ge=1, le=ABSOLUTE_MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop: list[StopText] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=ABSOLUTE_MAX_NEW_TOKENS)
    skip_special_tokens: bool = True
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
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
        given = [self.prompt is not None, self.messages is not None, self.prompt_token_ids is not None]
        if sum(given) != 1:
            raise ValueError("exactly one of 'prompt', 'messages' or 'prompt_token_ids' is required")
        if self.system is not None and (self.prompt is None or self.raw_prompt):
            raise ValueError("'system' goes with a chat 'prompt'; put a system message in 'messages' instead")
        if self.raw_prompt and self.prompt is None:
            raise ValueError("'raw_prompt' goes with 'prompt'")
        if self.min_tokens > self.max_new_tokens:
            raise ValueError("'min_tokens' must be at most 'max_new_tokens'")
        return self

    @property
    def templated(self) -> bool:
        """Whether the prompt is a conversation rendered with the model's chat template (else raw text or ids)."""
        return self.messages is not None or (self.prompt is not None and not self.raw_prompt)

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation the model's chat template renders (only for a `templated` prompt)."""
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


class TopLogprob(BaseModel):
    token: str  # the token's text alone (tokenizer.decode([id]))
    id: int
    logprob: float


class TokenLogprob(TopLogprob):
    """One token's log probability and its `logprobs` most likely alternatives (by rank), from the model's raw
    distribution at that position (log_softmax of its logits, before any sampling setting), as vLLM reports."""

    top: list[TopLogprob] = Field(default_factory=list)


class JobOutput(BaseModel):
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = Field(default_factory=Usage)
    # With `logprobs`: one per generated token (an ending EOS included, as in completion_tokens).
    logprobs: list[TokenLogprob] | None = None
    # With `prompt_logprobs`: one per prompt token, the first null (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


class JobError(BaseModel):
    type: str
    message: str


class Job(BaseModel):
    """The public job object (API.md)."""

    id: str
    status: JobStatus
    priority: Priority = Priority.interactive
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
        for optional in ("logprobs", "prompt_logprobs"):  # only when the job asked for them
            if data.get("output") and data["output"].get(optional) is None:
                data["output"].pop(optional, None)
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
    # Which engine serves it, and what it can do beyond what every engine honours (CAPABILITY_*).
    engine: str = ""
    capabilities: list[str] = Field(default_factory=list)


class WorkerInfo(BaseModel):
    name: str
    model: str
    device: str
    dtype: str
    max_batch: int
    pid: int
    started_at: datetime
