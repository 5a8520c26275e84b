"""The body of `POST /v1/responses`: the fields OpenAI's Responses API defines that clients send. What llamaq
cannot honour is accepted by the model and refused in `params.py` with 400 naming the `param`, never ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..job_api.requests import WebhookFields


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = None  # padding against length side channels: nothing to pad here


class ResponsesRequest(WebhookFields):
    """`webhook` and `webhook_events` are llamaq's, as on /v1/jobs: told of the response's job when it ends."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    background: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = None
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Refused unless empty: llamaq serves no reasoning model, no prompt templates, no conversations objects.
    reasoning: dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    # Accepted and unused (OpenAI's abuse monitoring and prompt cache routing; there is one model here).
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # vLLM's extension
