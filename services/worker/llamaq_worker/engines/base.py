"""What a generation engine is, takes and gives back, without torch.

`Engine` is the interface the batch worker and `__main__` drive, whichever engine runs. `SamplingParams` (one
sequence's settings) and `StepOutput` (what one `step` produced for one sequence) are what crosses it, so the
batch worker never needs torch for them. `SequenceSlots` is the bookkeeping of which sequences hold one of the
`max_batch` slots (and the headroom only interactive sequences may take), shared by the engines that keep their own
batch. The generation-config helpers read a model folder's `generation_config.json` the same way for every engine.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

# Most alternatives per token an engine reports (vLLM's default max_logprobs; llamaq_protocol's MAX_LOGPROBS).
MAX_LOGPROBS = 20


# What an engine may do beyond what every engine honours (the same names as llamaq_protocol's CAPABILITY_*).
LOGPROBS = "logprobs"
PROMPT_LOGPROBS = "prompt_logprobs"
STRUCTURED = "structured_outputs"


# A sequence's priority in its engine, vLLM's meaning (lower is served first): a job's fair-queue tier
# (llamaq_protocol's keys.FAIR_TIERS), interactive before batch before work queued over its key's limits. Within one
# priority, the order the sequences were added in (the fair queue's claim order).
PRIORITY_INTERACTIVE = 0
PRIORITY_BATCH = 1
PRIORITY_OVER = 2
PRIORITIES = {"interactive": PRIORITY_INTERACTIVE, "batch": PRIORITY_BATCH, "over": PRIORITY_OVER}
PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}


# The kinds of structured output (vLLM's StructuredOutputsParams fields): a JSON schema, any JSON object, a regular
# expression, one of a list of strings, or an EBNF grammar (xgrammar's / GBNF syntax).
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on what a sequence may generate, compiled by xgrammar (vLLM's structured-output backend, and the
    transformers engine's). `spec`: the JSON schema as JSON text (json), the pattern (regex), the choices (choice,
    a tuple of strings), the grammar's text (grammar), or "" (json_object)."""

    kind: str
    spec: str | tuple[str, ...] = ""


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's settings, with vLLM's meaning for each (vllm.SamplingParams)."""

    max_new_tokens: int
    temperature: float  # 0.0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off; else tokens below min_p * the most likely one's probability are dropped
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # sampling one ends the sequence ("stop"), as EOS does
    include_stop_str_in_output: bool = False  # keep the stop string (or the stop/EOS token's text) in the text
    ignore_eos: bool = False  # the model's EOS tokens do not end the sequence
    min_tokens: int = 0  # no EOS, stop token or stop string ends the sequence before this many tokens
    skip_special_tokens: bool = True
    logprobs: int | None = None  # report each token's logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for the prompt tokens
    seed: int | None = None
    # OpenAI's penalties with vLLM's meaning: subtracted from a token's logit once it appeared in the output
    # (presence), and once per time it appeared (frequency); -2 .. 2.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias added to its logit) pairs, -100 .. 100 (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Only text the constraint accepts is generated; the sequence ends ("stop") once the constraint is complete.
    structured_outputs: StructuredOutputs | None = None


# One token's log probability as a StepOutput carries it: the wire shape of llamaq_protocol.TokenLogprob,
# {"token", "id", "logprob", "top": [{"token", "id", "logprob"}, ...]}.
TokenLogprobDict = dict[str, Any]


@dataclass
class StepOutput:
    seq_id: str
    text: str  # new text since this sequence's previous output (may be "")
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None  # "stop" | "length" | "canceled" | None while running
    error: str | None = None  # set when the sequence failed; then finish_reason is None and the sequence is gone
    # With `logprobs`: one per token generated since the previous output (text may lag them).
    logprobs: list[TokenLogprobDict] | None = None
    # With `prompt_logprobs`: every prompt token's (the first None), once, on the sequence's first output.
    prompt_logprobs: list[TokenLogprobDict | None] | None = None
    # The ids of the tokens generated since the previous output (what a generation resumed elsewhere continues from).
    token_ids: list[int] | None = None

    def merge(self, later: StepOutput) -> None:
        """Take a later output of the same sequence into this one (both go out in one step)."""
        self.text += later.text
        if later.token_ids:
            self.token_ids = (self.token_ids or []) + later.token_ids
        self.completion_tokens = later.completion_tokens
        self.finish_reason = later.finish_reason
        self.error = later.error
        if later.logprobs:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs

    @property
    def has_news(self) -> bool:
        """Whether there is anything to publish: text, log probabilities, or the end."""
        return bool(self.text or self.logprobs or self.prompt_logprobs is not None
                    or self.finish_reason is not None or self.error is not None)


class EngineDead(Exception):
    """Raised by `Engine.step` when the engine cannot go on at all (vLLM's EngineCore process crashed, say): the
    worker puts its running jobs back on the queue, their attempt counted, and exits non-zero."""


@dataclass
class EngineStats:
    """What an engine's own scheduler knows, for the worker's metrics (vLLM fills it after every engine step)."""

    running: int = 0  # sequences being decoded
    waiting: int = 0  # sequences handed to the engine, waiting for room in it
    kv_cache_usage: float = 0.0  # share of KV cache blocks in use, 0..1
    preemptions: int = 0  # sequences preempted so far (KV cache full, or a higher priority's), to be recomputed
    # Steps the engine has taken (vLLM's own scheduler steps, which run apart from the worker's loop; an engine the
    # worker steps: its step calls).
    steps: int = 0
    # The same by the preempted sequence's priority (vLLM: counted as the sequence's next output arrives).
    preempted: dict[int, int] = field(default_factory=dict)

    def count_preemption(self, priority: int, n: int = 1) -> None:
        self.preempted[priority] = self.preempted.get(priority, 0) + n


def validate_request(prompt_ids: list[int], params: SamplingParams, context_length: int, vocab_size: int) -> None:
    """What every engine refuses in `add`, with the same ValueError messages."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if len(prompt_ids) >= context_length:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {context_length}")
    if any(not 0 <= int(t) < vocab_size for t in prompt_ids):
        raise ValueError("prompt_ids contain an id outside the vocabulary")
    if params.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if not params.temperature >= 0.0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if params.top_k < 0:
        raise ValueError("top_k must be >= 0")
    if not 0.0 <= params.min_p <= 1.0:
        raise ValueError("min_p must be in [0, 1]")
    if not params.repetition_penalty > 0.0:
        raise ValueError("repetition_penalty must be > 0")
    if any(not s for s in params.stop):
        raise ValueError("stop strings must not be empty")
    if any(not 0 <= int(t) < vocab_size for t in params.stop_token_ids):
        raise ValueError("stop_token_ids contain an id outside the vocabulary")
    if not 0 <= params.min_tokens <= params.max_new_tokens:
        raise ValueError("min_tokens must be in [0, max_new_tokens]")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(params, name) <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2]")
    if any(not 0 <= int(t) < vocab_size or not -100.0 <= b <= 100.0 for t, b in params.logit_bias):
        raise ValueError("logit_bias takes token ids of the vocabulary and biases in [-100, 100]")
    if params.structured_outputs is not None and params.structured_outputs.kind not in STRUCTURED_KINDS:
        raise ValueError(f"structured_outputs kind must be one of {', '.join(STRUCTURED_KINDS)}")


def check_capabilities(params: SamplingParams, capabilities: frozenset[str], engine: str) -> None:
    """The ValueError an engine raises in `add` for what it cannot do (the gateway refuses it before queueing)."""
    for name in (LOGPROBS, PROMPT_LOGPROBS):
        if getattr(params, name) is not None and name not in capabilities:
            raise ValueError(f"{name}: the {engine} engine cannot compute log probabilities")


class Engine(Protocol):
    """What the batch worker and `__main__` use of an engine.

    The worker calls `add` for each admitted job, `cancel` for canceled or timed-out ones and `step` in a loop
    while any job runs; each `step` returns at most one `StepOutput` per sequence that produced text or ended.
    `add` and `cancel` never block on generation. A sequence's `priority` (PRIORITY_*) decides which runs first when
    they do not all fit: an engine holds `max_batch` sequences of any priority, plus up to `headroom` interactive ones
    in place of lower-priority ones it holds (`free_slots_for`), and decodes interactive ones first, preempting lower
    ones to resume them later.
    """

    tokenizer: Any  # a transformers tokenizer: chat template, special tokens, backend_tokenizer for the gateway
    model_name: str
    context_length: int  # prompt + generated tokens, at most
    defaults: dict  # temperature / top_p / top_k / repetition_penalty for parameters a job leaves unset
    max_batch: int
    headroom: int  # interactive sequences it takes beyond max_batch, in place of lower-priority ones
    capabilities: frozenset[str]  # LOGPROBS, PROMPT_LOGPROBS: what it does beyond the common parameters
    stats: EngineStats | None  # its own scheduler's figures (vLLM's), for the worker's metrics; None: it has none

    @property
    def free_slots(self) -> int: ...

    @property
    def active(self) -> int: ...

    def free_slots_for(self, priority: int) -> int: ...

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]: ...

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
            priority: int = PRIORITY_INTERACTIVE) -> None: ...

    def cancel(self, seq_id: str) -> None: ...

    def step(self) -> list[StepOutput]: ...

    def device_memory(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


class ActiveSequence(Protocol):
    seq_id: str
    canceled: bool


SeqT = TypeVar("SeqT", bound=ActiveSequence)


class SequenceSlots(Generic[SeqT]):
    """An engine's active sequences (pending or running), behind one lock: at most `max_batch`, and beyond them up to
    `headroom` interactive sequences while as many of lower priority are active, the places they take in the batch
    (so never more than `max_batch` interactive ones). (`free_slots`: what a sequence of any priority may take.)

    `add`, `cancel`, `active` and `free_slots` may be called from another thread than `step`; the engine's own
    step-thread state needs no lock. Subclasses queue with `_enqueue`, take the queued ones with
    `_take_pending` (or only claim a slot with `_claim`) and give a finished sequence's slot back with `_release`.
    """

    # The engine's own figures (its scheduler's, its preemptions) for the worker's metrics and claiming; None: none.
    stats: EngineStats | None = None

    def __init__(self, max_batch: int, headroom: int = 0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if headroom < 0:
            raise ValueError("headroom must be >= 0")
        self.max_batch = max_batch
        self.headroom = headroom
        self._lock = threading.Lock()
        self._pending: list[SeqT] = []
        self._by_id: dict[str, SeqT] = {}
        self._lower: set[str] = set()  # the active sequences of lower priority than PRIORITY_INTERACTIVE

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._by_id)

    @property
    def free_slots(self) -> int:
        return self.free_slots_for(PRIORITY_BATCH)

    def free_slots_for(self, priority: int) -> int:
        """How many more sequences of `priority` it takes now."""
        with self._lock:
            return max(0, self._limit(priority) - len(self._by_id))

    def _limit(self, priority: int) -> int:
        """(under the lock) The active sequences it may hold for one more of `priority`: an interactive one may take
        the place of a lower-priority one beyond max_batch, up to `headroom` of them; more would only wait."""
        if priority <= PRIORITY_INTERACTIVE:
            return self.max_batch + min(self.headroom, len(self._lower))
        return self.max_batch

    def cancel(self, seq_id: str) -> None:
        with self._lock:
            seq = self._by_id.get(seq_id)
            if seq is not None:
                seq.canceled = True

    def close(self) -> None:
        """Release the engine: nothing to release for an engine that lives in this process only."""

    def _claim(self, seq_id: str, build: Callable[[], SeqT], pending: bool = False,
               priority: int = PRIORITY_INTERACTIVE) -> SeqT:
        """Give the sequence `build` makes a slot (`build` runs under the lock, only once the id has a free one);
        with `pending`, also queue it for the engine's next `_take_pending`. An engine that hands a sequence on at
        once (vLLM's, whose own scheduler queues it) claims without queueing."""
        with self._lock:
            if seq_id in self._by_id:
                raise ValueError(f"sequence {seq_id!r} is already active")
            if len(self._by_id) >= self._limit(priority):
                room = f", headroom={self.headroom}" if self.headroom else ""
                raise ValueError(f"no free slot (max_batch={self.max_batch}{room})")
            seq = build()
            self._by_id[seq_id] = seq
            if priority > PRIORITY_INTERACTIVE:
                self._lower.add(seq_id)
            if pending:
                self._pending.append(seq)
            return seq

    def _enqueue(self, seq_id: str, build: Callable[[], SeqT], priority: int = PRIORITY_INTERACTIVE) -> None:
        """Claim a slot for the sequence `build` makes and queue it for the next `_take_pending`."""
        self._claim(seq_id, build, pending=True, priority=priority)

    def _take_pending(self) -> list[SeqT]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def _release(self, *seqs: SeqT) -> None:
        with self._lock:
            for seq in seqs:
                if self._by_id.get(seq.seq_id) is seq:
                    del self._by_id[seq.seq_id]
                    self._lower.discard(seq.seq_id)


def read_generation_config(model_path: str) -> dict:
    path = os.path.join(model_path, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def sampling_defaults(gen: dict) -> dict:
    """The default temperature / top_p / top_k / repetition_penalty a model's generation config implies."""
    do_sample = gen.get("do_sample")
    temperature = gen.get("temperature")
    if do_sample is False:
        temperature = 0.0
    elif temperature is None:
        temperature = 1.0 if do_sample else 0.0
    top_p = gen.get("top_p")
    top_k = gen.get("top_k")
    rep = gen.get("repetition_penalty")
    defaults = {
        "temperature": float(temperature),
        "top_p": float(top_p) if top_p is not None else 1.0,
        "top_k": int(top_k) if top_k is not None else 0,
        "repetition_penalty": float(rep) if rep is not None else 1.0,
    }
    if gen.get("min_p") is not None:  # vLLM takes it from the generation config too
        defaults["min_p"] = float(gen["min_p"])
    return defaults


def text_token_ids(tokenizer, text: str) -> list[int]:
    """A raw prompt's token ids, tokenized as vLLM's /v1/completions does (the tokenizer's special tokens added,
    e.g. a BOS), with no chat template."""
    return [int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"]]


def token_text(tokenizer, cache: dict[int, str], token_id: int) -> str:
    """One token's text alone, as vLLM names a token in its logprobs (`decode([id])`, special tokens spelled out)."""
    text = cache.get(token_id)
    if text is None:
        text = cache[token_id] = tokenizer.decode([token_id])
    return text


def chat_token_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt's token ids from the model's chat template (its own, or CHAT_TEMPLATE's), `tools` (OpenAI's
    function definitions) rendered by it, whatever container transformers returns them in (a list, a
    BatchEncoding in 5.x, a tensor, or a batch of one)."""
    out = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(t) for t in out]
