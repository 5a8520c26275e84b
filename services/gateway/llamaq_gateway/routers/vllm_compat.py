"""vLLM's server endpoints beside the OpenAI API (`/version`, `/tokenize`, `/detokenize`), as vLLM 0.32 shapes
them, for the benchmark and evaluation clients written against vLLM; `/health` is with the other probes.

Tokens come from the served model's own tokenizer and chat template, published by the worker (prompt_tokens.py):
the same ids the worker would run, with no model files and no torch here.
"""

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..deps import JobsDep, OwnerDep
from ..errors import InvalidParameter, InvalidRequest, OpenAIRoute
from ..jobs import tokenize_sized
from ..openai import ChatMessageIn, chat_messages, check_model, template_messages
from ..schemas import error_responses

# The vLLM release whose endpoint shapes these follow (`GET /version` says so).
VLLM_DIALECT = "0.32"

# OpenAIRoute: errors carry `param` and OpenAI's type names, as vLLM's own do.
router = APIRouter(tags=["vllm"], route_class=OpenAIRoute)


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


@router.get("/version", responses=error_responses(422))
async def version(request: Request, owner: OwnerDep) -> VersionResponse:
    """llamaq's version, and the vLLM dialect its vLLM-style endpoints speak."""
    return VersionResponse(version=request.app.version, vllm_api=VLLM_DIALECT)


@router.post("/tokenize", responses=error_responses(400, 404, 413, 422, 503))
async def tokenize(body: TokenizeRequest, jobs: JobsDep, owner: OwnerDep) -> TokenizeResponse:
    """The token ids the model would see: a prompt as plain text, or messages rendered with the chat template."""
    card = await jobs.served_model()
    check_model(body.model, card)
    counter = await jobs.prompt_counter(card)
    if body.messages is not None:
        messages = template_messages(chat_messages(body.messages))
        agp = True if body.add_generation_prompt is None else body.add_generation_prompt
        try:
            ids = await tokenize_sized(sum(len(m["content"]) for m in messages), counter.encode_chat, messages, agp,
                                       bool(body.add_special_tokens))
        except Exception as exc:  # a template that refuses this conversation (e.g. roles out of order)
            raise InvalidRequest(f"messages: the model's chat template rejected them: {exc}", param="messages") from exc
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await tokenize_sized(len(body.prompt or ""), counter.encode, body.prompt or "", special)
    return TokenizeResponse(
        count=len(ids), max_model_len=card.context_length, tokens=ids,
        token_strs=counter.token_strs(ids) if body.return_token_strs else None,
    )


@router.post("/detokenize", responses=error_responses(400, 404, 413, 422, 503))
async def detokenize(body: DetokenizeRequest, jobs: JobsDep, owner: OwnerDep) -> DetokenizeResponse:
    """The text of these token ids, special tokens included (as vLLM decodes them)."""
    card = await jobs.served_model()
    check_model(body.model, card)
    counter = await jobs.prompt_counter(card)
    for i, token in enumerate(body.tokens):
        if token >= counter.vocab_size:
            raise InvalidParameter(f"tokens.{i}: {token} is not a token id (the vocabulary has {counter.vocab_size})",
                                   param=f"tokens.{i}")
    return DetokenizeResponse(prompt=await tokenize_sized(len(body.tokens) * 4, counter.decode, body.tokens))
