"""The request and response bodies of vLLM's `/version`, `/tokenize` and `/detokenize`, as vLLM 0.32 shapes them."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..openai import ChatMessageIn

# The vLLM release whose endpoint shapes these follow (`GET /version` says so).
VLLM_DIALECT = "0.32"


class TokenizeRequest(BaseModel):
    """vLLM's two tokenize bodies in one: `{"prompt"}` (plain text) or `{"messages"}` (the chat template's render)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool | None = Field(default=None, description="messages only; default true")
    add_special_tokens: bool | None = Field(
        default=None, description="add the tokenizer's special tokens (BOS...): default true for a prompt, false for "
        "messages, whose template already has them"
    )
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise ValueError("'add_generation_prompt' goes with 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str = Field(description="llamaq's version")
    server: str = "llamaq"
    vllm_api: str = Field(description="the vLLM release whose /tokenize, /detokenize, /health, /version and "
                                      "/v1/models shapes this server follows")
