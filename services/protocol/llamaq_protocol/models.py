"""Wire models shared by the gateway and the worker.

Everything that crosses Redis is one of these models serialized as JSON: never pickle across the queue.
"""

from __future__ import annotations

import json
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
MAX_TOOLS = 128
# Hard ceiling on a job's choices whatever the deployment sets; the gateway narrows it to MAX_N.
ABSOLUTE_MAX_N = 128
MAX_LOGIT_BIAS = 300  # OpenAI's cap on logit_bias entries
MAX_CONSTRAINT_CHARS = 65536  # a regex, grammar or choice of structured_outputs, at most
# What an engine can do beyond the parameters every engine honours (ModelCard.capabilities).
CAPABILITY_LOGPROBS = "logprobs"
CAPABILITY_PROMPT_LOGPROBS = "prompt_logprobs"
CAPABILITY_STRUCTURED_OUTPUTS = "structured_outputs"
# The worker parses tool calls out of the model's text (a tool parser is configured and loads).
CAPABILITY_TOOLS = "tools"


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
    tool_calls = "tool_calls"  # the model ended its turn with tool calls


FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    arguments: str  # a JSON object as text, as OpenAI sends and returns it


class ToolCall(BaseModel):
    """A call the model made (an assistant turn's `tool_calls`, or a job's output)."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    """A function the model may call (OpenAI's chat `tools` entry)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class Function(BaseModel):
        model_config = ConfigDict(extra="forbid")

        name: FunctionName

    type: Literal["function"] = "function"
    function: Function


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StructuredOutputs(BaseModel):
    """Exactly one constraint on the generated text, as vLLM's `structured_outputs`: a JSON schema (`json`), any JSON
    object (`json_object`), a regular expression, one of several strings (`choice`) or an EBNF grammar. Compiled by
    xgrammar on the worker, whichever engine runs."""

    json_schema: dict[str, Any] | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONSTRAINT_CHARS)] | None = None
    choice: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]],
                      Field(min_length=1, max_length=1024)] | None = None
    grammar: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONSTRAINT_CHARS)] | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("exactly one of json, json_object, regex, choice or grammar is required")
        return self

    def kind(self) -> tuple[str, Any]:
        """The constraint's kind (vLLM's field name) and its value."""
        if self.json_schema is not None:
            return "json", self.json_schema
        if self.json_object:
            return "json_object", True
        for name in ("regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        raise AssertionError("validated to hold exactly one")


class ChatMessage(BaseModel):
    """One turn. `assistant` turns may carry the `tool_calls` the model made (then `content` may be null), and a
    `tool` turn answers one of them by `tool_call_id`."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs its tool_call_id, and only a tool message has one")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (transformers' and vLLM's convention): a call's arguments as an
        object, not JSON text, so a template writes them with `tojson` once."""
        data: dict[str, Any] = {"role": self.role, "content": self.content if self.content is not None else ""}
        if self.tool_calls:
            data["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        return data


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: the template gets the text as it came


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
    # OpenAI's penalties (vLLM's meaning: over the generated tokens only) and logit bias (token id -> bias).
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # Only text this constraint accepts is generated.
    structured_outputs: StructuredOutputs | None = None
    # Functions the model may call (rendered by the chat template), and whether it must: "auto" (default with
    # tools) lets the model choose and parses calls out of its text; "required" and a named function are enforced
    # by a grammar; "none" renders the tools but parses nothing.
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    # Several answers to the one prompt, each its own sequence (with a seed, choice i samples with seed + i).
    n: int = Field(default=1, ge=1, le=ABSOLUTE_MAX_N)

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
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        # Every tool turn answers a call an earlier assistant turn made.
        called: set[str] = set()
        for i, message in enumerate(self.messages or ()):
            called.update(call.id for call in message.tool_calls or ())
            if message.role == "tool" and message.tool_call_id not in called:
                raise ValueError(f"messages.{i}: tool_call_id {message.tool_call_id!r} answers no earlier tool call")
        if self.tools is None:
            if self.tool_choice not in (None, "none"):
                raise ValueError("'tool_choice' needs 'tools'")
            return
        if not self.templated:
            raise ValueError("'tools' go with a chat prompt ('messages' or 'prompt')")
        names = [tool.function.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("'tools' must have distinct function names")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"'tool_choice' names {self.tool_choice.function.name!r}, which is not in 'tools'")
        if self.forced_tools() and self.structured_outputs is not None:
            raise ValueError("'structured_outputs' cannot go with a required or named 'tool_choice'")

    def effective_tool_choice(self) -> ToolChoice:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def forced_tools(self) -> bool:
        """Whether a grammar makes the model call a tool ("required", or a named function)."""
        return self.tools is not None and self.effective_tool_choice() not in ("none", "auto")

    def resumable(self) -> bool:
        """Whether a generation cut short (its worker lost) can continue on another worker from the tokens it had
        made (prompt + those tokens as the new prompt, what is left of max_new_tokens), rather than start over: one
        choice, no grammar (its state would start over), no tool calls to parse, no prompt log probabilities (the
        prompt would include the tokens made)."""
        return (self.n == 1 and self.structured_outputs is None and self.effective_tool_choice() == "none"
                and self.prompt_logprobs is None)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them (OpenAI's shape, unset fields left out)."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @property
    def templated(self) -> bool:
        """Whether the prompt is a conversation rendered with the model's chat template (else raw text or ids)."""
        return self.messages is not None or (self.prompt is not None and not self.raw_prompt)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation the model's chat template renders (only for a `templated` prompt)."""
        if self.messages is not None:
            return [m.for_template() for m in self.messages]
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


class ChoiceOutput(BaseModel):
    """One of a job's `n` answers (JobOutput.choices)."""

    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None


class JobOutput(BaseModel):
    """The job's answer: with `n` > 1, the first choice's text, reason, logprobs and calls, every choice in
    `choices`, and usage summed over them (the prompt counted once, as vLLM does)."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = Field(default_factory=Usage)
    # With `logprobs`: one per generated token (an ending EOS included, as in completion_tokens).
    logprobs: list[TokenLogprob] | None = None
    # With `prompt_logprobs`: one per prompt token, the first null (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # The calls the model made, parsed from its text (then `text` holds only what it said besides them).
    tool_calls: list[ToolCall] | None = None
    choices: list[ChoiceOutput] | None = None


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
        for optional in ("logprobs", "prompt_logprobs", "tool_calls", "choices"):  # only when there are some
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
