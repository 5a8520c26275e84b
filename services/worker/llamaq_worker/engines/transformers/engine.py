"""llamaq's own continuous batching over transformers: loading, the batched KV cache, prefill/decode, OOM handling.

One ``TransformersEngine`` holds the model, the tokenizer and one running batch. The driver (the RQ worker loop)
calls ``add`` for new sequences, ``cancel`` for cancelled ones and ``step`` in a loop while
``active`` is non-zero. Each ``step``:

1. finishes cancelled sequences (pending or running) with ``finish_reason="canceled"``;
2. prefills every pending sequence in one left-padded forward pass over a fresh ``DynamicCache``,
   samples each one's first token from the logits of its last prompt token and merges the new
   cache rows into the running batch's cache (the shorter side is padded on the left along the
   sequence axis, then the two are concatenated along the batch axis);
3. runs ONE decode step (one token per row) for every running sequence, each row sampled with its
   own parameters (``sampling.sample``: greedy argmax, or temperature / min-p / top-k / top-p with its own
   ``torch.Generator``, after its structured-output mask, logit_bias and optional repetition / frequency /
   presence penalties, in vLLM's order; HF semantics for each, vLLM's for min-p and the OpenAI penalties).

A sequence ends on one of the model's EOS tokens (unless ``ignore_eos``), one of its ``stop_token_ids`` or a stop
string, none of them before ``min_tokens`` tokens (EOS and stop tokens are masked out of the logits until then, as
vLLM does). With ``logprobs`` each token comes with its log probability and the top alternatives, from the raw
distribution (log_softmax of the model's logits before any sampling setting: vLLM's default ``raw_logprobs``);
``prompt_logprobs`` prefills that sequence alone with the logits of every position kept.

``structured_outputs`` are compiled by xgrammar in ``add`` (``grammar.Grammars``: one compiler per engine, built on
first use, with its cache), so a bad spec fails the request there and compiling never holds up a step. Each
sequence with a constraint keeps an ``xgr.GrammarMatcher``: before every sampling (prefill and decode) it fills its
row of a token bitmask, which masks that row's logits (greedy rows too); the chosen token is then accepted by it.
Once its grammar is complete only a stop token (EOS or one of ``stop_token_ids``, even with ``ignore_eos``) is
allowed, and accepting it ends the sequence with "stop", the token's text left out (as for EOS). A grammar that
allows nothing but a stop token overrides ``min_tokens``, as in vLLM.

Each sequence's text comes from ``engines.text.IncrementalText`` (incremental detokenization, stop strings).

Priorities: at most ``max_batch`` sequences decode together; the engine holds up to ``headroom`` more, interactive
ones in place of lower-priority ones (``SequenceSlots``). Waiting sequences enter the batch by priority, then
admission order; one of higher
priority than a running one takes its place when the batch is full, the preempted one being the running sequence of
the lowest priority admitted last. A preempted sequence leaves the batch (its cache rows dropped) and keeps the rest of
its state (prompt and generated ids, its generator, grammar matcher, text and stop-string state); it resumes when a
slot frees by prefilling its prompt and generated tokens, whose last logits are those its next decode step would have
given. So no token is lost or made twice, and (float32) its greedy output is that of an unpreempted run.

Rows of finished sequences are dropped from the cache at once (``index_select`` on the batch
axis) and leading columns that are padding for every remaining row are trimmed, so the cache
never grows beyond the longest live sequence.

Positions are explicit (``cumsum(mask) - 1``) and the 2-D attention mask covers the whole cache,
so in float32 a sequence's greedy output does not depend on what it is batched with.

``add`` and ``cancel`` may be called from another thread than ``step``; ``step`` itself must be
called from one thread at a time.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from ..base import (
    LOGPROBS,
    PRIORITY_INTERACTIVE,
    PROMPT_LOGPROBS,
    STRUCTURED,
    EngineStats,
    SamplingParams,
    SequenceSlots,
    StepOutput,
    TokenLogprobDict,
    chat_token_ids,
    read_generation_config,
    sampling_defaults,
    token_text,
    validate_request,
)
from ..text import IncrementalText
from . import grammar
from .sampling import sample, top_logprobs

logger = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {
        cls
        for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if cls is not None
    }
)


@dataclass(eq=False)
class _Seq:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    order: int  # admission order (higher = newer)
    generator: torch.Generator
    canceled: bool = False
    tokens: list[int] = field(default_factory=list)  # generated ids (eos included when it ends the sequence)
    reported: int = 0  # how many of `tokens` an output has carried
    text: IncrementalText | None = None  # set by the engine: the sequence's text so far
    stop_ids: frozenset[int] = frozenset()  # sampling one ends it: EOS (unless ignore_eos) and stop_token_ids
    prompt_logprobs: list[TokenLogprobDict | None] | None = None  # computed at prefill, sent with the first output
    matcher: Any = None  # its xgr.GrammarMatcher, with structured_outputs
    priority: int = PRIORITY_INTERACTIVE  # lower decodes first (engines.base.PRIORITY_*)

    def rank(self) -> tuple[int, int]:
        """Its place among sequences waiting for the batch: priority, then admission order."""
        return self.priority, self.order

    @property
    def resumed(self) -> bool:
        """Whether it decoded before (it was preempted): its prefill is its prompt and its tokens so far."""
        return bool(self.tokens)

    def context_ids(self) -> list[int]:
        """What a prefill of it feeds: its prompt, and the tokens it generated before it was preempted."""
        return self.prompt_ids + self.tokens

    def banned(self) -> tuple[int, ...]:
        """What it may not sample now: its stop tokens while under min_tokens."""
        return tuple(self.stop_ids) if len(self.tokens) < self.params.min_tokens else ()

    @property
    def penalized(self) -> bool:
        """Whether it uses the output-count penalties (presence / frequency)."""
        return bool(self.params.presence_penalty or self.params.frequency_penalty)


class _StepOutputs:
    """Collects at most one StepOutput per sequence for one step, in first-touched order."""

    def __init__(self) -> None:
        self._by_id: dict[str, StepOutput] = {}

    def add(
        self,
        seq: _Seq,
        text: str,
        finish_reason: str | None = None,
        error: str | None = None,
        logprobs: list[TokenLogprobDict] | None = None,
    ) -> None:
        new = StepOutput(seq.seq_id, text, len(seq.tokens), finish_reason, error, logprobs, seq.prompt_logprobs,
                         seq.tokens[seq.reported:])
        seq.prompt_logprobs = None  # sent once
        seq.reported = len(seq.tokens)
        out = self._by_id.get(seq.seq_id)
        if out is None:
            self._by_id[seq.seq_id] = new
        else:
            out.merge(new)

    def result(self) -> list[StepOutput]:
        return [o for o in self._by_id.values() if o.has_news]


class TransformersEngine(SequenceSlots[_Seq]):
    capabilities = frozenset({LOGPROBS, PROMPT_LOGPROBS} | ({STRUCTURED} if grammar.AVAILABLE else set()))

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32", max_batch: int = 8,
                 headroom: int = 0) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of bfloat16, float16, float32")
        super().__init__(max_batch, headroom)  # checks max_batch before the model loads
        torch_device = torch.device(device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        load_kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "attn_implementation": "sdpa"}
        if torch_device.type != "cpu":
            load_kwargs["device_map"] = str(torch_device)
        with torch.inference_mode():
            model = AutoModelForCausalLM.from_pretrained(model_path, **load_kwargs)
        self._setup(
            model, tokenizer, torch_device,
            model_name=os.path.basename(os.path.normpath(model_path)),
            generation_config=read_generation_config(model_path),
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        headroom: int = 0,
        model_name: str = "model",
        generation_config: dict | None = None,
        eos_token_ids: frozenset[int] | None = None,
    ) -> TransformersEngine:
        """An engine around a model already built and placed on its device (benchmarks: random weights).

        ``eos_token_ids`` overrides the end-of-sequence ids; an empty set never stops on a token, so every
        sequence runs to ``max_new_tokens`` (what load generators call "ignore EOS").
        """
        engine = cls.__new__(cls)
        SequenceSlots.__init__(engine, max_batch, headroom)
        engine._setup(
            model, tokenizer, model.device, model_name=model_name,
            generation_config=generation_config or {}, eos_token_ids=eos_token_ids,
        )
        return engine

    def _setup(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        model_name: str,
        generation_config: dict,
        eos_token_ids: frozenset[int] | None = None,
    ) -> None:
        self.device = device
        self.dtype = model.dtype
        self.tokenizer = tokenizer
        self.model = model
        # No requires_grad_(False): inference_mode already records no graph, and on CPU it made bf16 prefill
        # about 7x slower (a 16x38-token prefill of SmolLM2-135M: 1.3 s instead of 0.18 s, torch 2.13).
        self.model.eval()
        config = self.model.config
        # The cache's keyword: `cache` in newer transformers 5.x, `past_key_values` up to 5.19 (where an unknown
        # `cache=` is swallowed by **kwargs and every step would run without the cache).
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        layer_types = {type(layer) for layer in DynamicCache(config=config).layers}
        if layer_types - {DynamicLayer}:
            # sliding-window / linear-attention caches keep extra state that row merging does not handle
            names = sorted(t.__name__ for t in layer_types)
            raise ValueError(f"unsupported cache layout for continuous batching: {names}")

        self.model_name = model_name
        self.context_length = int(config.max_position_embeddings)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])

        self.defaults = sampling_defaults(generation_config)
        self.eos_token_ids = (
            self._eos_ids(generation_config, config) if eos_token_ids is None else frozenset(eos_token_ids)
        )
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = min(self.eos_token_ids) if self.eos_token_ids else 0
        self.pad_token_id = int(pad)

        self._order = 0  # admission counter, advanced under the slots' lock
        # The batch's figures after each step: running, waiting (preempted, or no slot yet), preemptions (no KV pool of
        # fixed size, so no cache usage).
        self.stats = EngineStats()
        self._waiting: list[_Seq] = []  # step-thread only: taken from pending, not in the batch (preempted, or no room)
        self._token_texts: dict[int, str] = {}  # token id -> its text alone, for logprobs

        # running batch; row i of every tensor below belongs to self._running[i]
        self._running: list[_Seq] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L] long, 1 = real token in the cache
        self._pos: torch.Tensor | None = None  # [B] long, position of the token fed next
        self._last: torch.Tensor | None = None  # [B] long, sampled token not yet in the cache
        self._seen: torch.Tensor | None = None  # [B, vocab] bool, tokens in prompt + generated
        # [B, vocab] float, how often each token was generated (presence / frequency penalties); None while no
        # running row uses them, so the batch without penalties pays nothing
        self._counts: torch.Tensor | None = None
        self._grammars = grammar.Grammars(self.tokenizer, self.vocab_size)
        logger.info(
            "engine ready: model=%s device=%s dtype=%s max_batch=%d headroom=%d context=%d eos=%s defaults=%s",
            self.model_name, self.device, str(self.dtype).removeprefix("torch."), self.max_batch, self.headroom,
            self.context_length, sorted(self.eos_token_ids), self.defaults,
        )

    # ------------------------------------------------------------------ configuration helpers

    def _eos_ids(self, gen: dict, config: Any) -> frozenset[int]:
        ids: set[int] = set()
        for source in (gen.get("eos_token_id"), getattr(config, "eos_token_id", None) if not gen else None,
                       self.tokenizer.eos_token_id):
            if source is None:
                continue
            if isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
            else:
                ids.add(int(source))
        return frozenset(ids)

    # ------------------------------------------------------------------ public API

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, tools)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
            priority: int = PRIORITY_INTERACTIVE) -> None:
        validate_request(prompt_ids, params, self.context_length, self.vocab_size)
        prompt = [int(t) for t in prompt_ids]
        generator = torch.Generator(device=self.device)
        if params.seed is not None:
            generator.manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            generator.seed()
        decode = self._decode_ids if params.skip_special_tokens else self._decode_ids_with_special
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        matcher = None
        if params.structured_outputs is not None:
            # Here, in the caller's thread, not in the batched step: a JSON schema takes milliseconds to compile.
            # Its stop tokens are vLLM's all_stop_token_ids, EOS included even with ignore_eos: a complete grammar
            # must still have a token to end on.
            matcher = self._grammars.matcher(params.structured_outputs,
                                             frozenset(params.stop_token_ids) | self.eos_token_ids)

        def admitted() -> _Seq:
            self._order += 1
            return _Seq(
                seq_id=seq_id,
                prompt_ids=prompt,
                params=params,
                order=self._order,
                generator=generator,
                text=IncrementalText(decode, params.stop, include_stop=params.include_stop_str_in_output,
                                     stops_active=params.min_tokens == 0),
                stop_ids=stop_ids,
                matcher=matcher,
                priority=priority,
            )

        self._enqueue(seq_id, admitted, priority)

    def step(self) -> list[StepOutput]:
        outputs = _StepOutputs()
        with torch.inference_mode():
            # 1. cancellations (new, waiting and running sequences)
            waiting, self._waiting = self._waiting + self._take_pending(), []
            for seq in waiting:
                if seq.canceled:
                    self._finish(seq, "canceled", outputs)
                else:
                    self._waiting.append(seq)
            canceled_rows = [i for i, s in enumerate(self._running) if s.canceled]
            if canceled_rows:
                for i in canceled_rows:
                    self._finish(self._running[i], "canceled", outputs)
                self._drop_rows(set(canceled_rows))
            # 2. admission (prefill) of the waiting sequences the batch takes now; a sequence that wants its prompt's
            # logprobs is prefilled alone, since every position's logits are kept for it
            new = self._schedule()
            plain = [s for s in new if not self._wants_prompt_logprobs(s)]
            for group in ([plain] if plain else []) + [[s] for s in new if self._wants_prompt_logprobs(s)]:
                self._admit(group, outputs)
            # 3. one decode step for every running sequence
            if self._running:
                self._decode(outputs)
        self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)
        self.stats.steps += 1
        return outputs.result()

    @staticmethod
    def _wants_prompt_logprobs(seq: _Seq) -> bool:
        return seq.params.prompt_logprobs is not None and not seq.resumed  # a resumed one sent them already

    def _schedule(self) -> list[_Seq]:
        """The waiting sequences that join the batch in this step (taken out of `_waiting`): by priority, then
        admission order, into the free slots; when none is free, one takes the place of a running sequence of lower
        priority (the lowest, admitted last), which leaves the batch, its state kept, and waits to resume."""
        self._waiting.sort(key=_Seq.rank)
        free = self.max_batch - len(self._running)
        victims: set[int] = set()
        taken = 0
        for seq in self._waiting:
            if free <= 0:
                lower = [i for i, s in enumerate(self._running) if i not in victims and s.priority > seq.priority]
                if not lower:
                    break  # the rest rank no higher than this one: no running sequence gives way to them either
                victims.add(max(lower, key=lambda i: self._running[i].rank()))
                free += 1
            free -= 1
            taken += 1
        chosen, self._waiting = self._waiting[:taken], self._waiting[taken:]
        if victims:
            preempted = [self._running[i] for i in sorted(victims)]
            self._drop_rows(victims)
            for seq in preempted:
                self.stats.preemptions += 1
                self.stats.count_preemption(seq.priority)
                logger.debug("sequence %s (priority %d) preempted after %d tokens", seq.seq_id, seq.priority,
                             len(seq.tokens))
            self._waiting.extend(preempted)
        return chosen

    # ------------------------------------------------------------------ model

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        phase: str,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """One forward pass; returns float32 logits of the last position, shape [B, vocab] (of every position,
        [B, L, vocab], with ``all_positions``).

        ``phase`` is "prefill" or "decode"; tests wrap this method to inject failures.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
            logits_to_keep=0 if all_positions else 1,
        )
        return out.logits.float() if all_positions else out.logits[:, -1, :].float()

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def device_memory(self) -> tuple[int, int]:
        """Bytes of GPU memory (allocated by tensors, reserved by torch's caching allocator); 0, 0 off CUDA."""
        if self.device.type != "cuda":
            return 0, 0
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)

    # ------------------------------------------------------------------ admission

    def _admit(self, new: list[_Seq], outputs: _StepOutputs) -> None:
        """Prefill `new` (a resumed sequence: its prompt and tokens so far), sample each one's next token and merge
        the rows into the running batch."""
        dev = self.device
        contexts = [s.context_ids() for s in new]
        lengths = [len(c) for c in contexts]
        width = max(lengths)
        ids = torch.full((len(new), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, context in enumerate(contexts):
            ids[i, width - lengths[i]:] = torch.tensor(context, dtype=torch.long)
            mask[i, width - lengths[i]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
        try:
            cache = DynamicCache(config=self.model.config)
            if self._wants_prompt_logprobs(new[0]):  # alone in its group (see `step`)
                every = self._forward(ids, mask, position_ids, cache, phase="prefill", all_positions=True)
                new[0].prompt_logprobs = self._prompt_logprobs(every[0], new[0])
                logits = every[:, -1, :]
                del every
            else:
                logits = self._forward(ids, mask, position_ids, cache, phase="prefill")
            # tokens seen so far per row (prompt + generated), for the repetition penalty
            real = mask.bool()
            rows = torch.arange(len(new), device=dev)[:, None].expand_as(ids)
            seen = torch.zeros((len(new), logits.shape[-1]), dtype=torch.bool, device=dev)
            seen[rows[real], ids[real]] = True
            # the output so far (a resumed sequence's) for the presence / frequency penalties
            counts = None
            if any(s.penalized for s in new):
                counts = torch.zeros((len(new), self.vocab_size), dtype=torch.float32, device=dev)
                for i, s in enumerate(new):
                    if s.tokens:
                        made = torch.tensor(s.tokens, dtype=torch.long, device=dev)
                        counts[i].index_add_(0, made, torch.ones(len(s.tokens), dtype=torch.float32, device=dev))
            first, first_dev = sample(logits, [s.params for s in new], [s.generator for s in new], seen,
                                      [s.banned() for s in new], counts=counts, allowed=self._allowed(new))
            first_logprobs = self._logprobs(logits, first_dev, new)
            del logits
            seen[torch.arange(len(new), device=dev), first_dev] = True
            if counts is not None:
                counts[torch.arange(len(new), device=dev), first_dev] += 1.0
        except _OOM_ERRORS as exc:
            self._free_memory()
            logger.warning("out of memory while prefilling %d sequence(s): %s", len(new), exc)
            for s in new:
                self._fail(s, f"out_of_memory: prefill of {len(new)} sequence(s) failed: {exc}", outputs)
            return

        keep = [i for i, s in enumerate(new) if not self._accept(s, first[i], outputs, first_logprobs[i])]
        if not keep:
            return
        rows = torch.tensor(keep, dtype=torch.long, device=dev)
        new_keep = [new[i] for i in keep]
        try:
            if len(keep) < len(new):
                cache.batch_select_indices(rows)
                mask = mask.index_select(0, rows)
                first_dev = first_dev.index_select(0, rows)
                seen = seen.index_select(0, rows)
                if counts is not None:
                    counts = counts.index_select(0, rows) if any(s.penalized for s in new_keep) else None
            # the position of each row's sampled token, fed by the next decode step (its prefill's length)
            pos = torch.tensor([lengths[i] for i in keep], dtype=torch.long, device=dev)
            self._merge(cache, mask, pos, first_dev, seen, counts, new_keep)
        except _OOM_ERRORS as exc:
            self._free_memory()
            logger.warning("out of memory while merging %d new sequence(s): %s", len(keep), exc)
            for s in new_keep:
                self._fail(s, f"out_of_memory: admitting the sequence failed: {exc}", outputs)

    def _merge(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        pos: torch.Tensor,
        last: torch.Tensor,
        seen: torch.Tensor,
        counts: torch.Tensor | None,
        seqs: list[_Seq],
    ) -> None:
        """Append prefilled rows to the running batch. Builds every new tensor first, then assigns,
        so a failure (out of memory) leaves the running batch as it was.

        ``counts`` (the new rows' output counts) is None when none of them uses the count penalties; the merged
        batch keeps counts when either side has them, zeros for the rows that never needed any (their penalties
        are 0, so their counts are never read)."""
        if not self._running:
            self._cache, self._mask, self._pos, self._last, self._seen = cache, mask, pos, last, seen
            self._counts = counts
            self._running = list(seqs)
            self._trim()
            return
        old_len = self._mask.shape[1]
        new_len = mask.shape[1]
        width = max(old_len, new_len)

        def pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
            if length == width:
                return t
            return torch.nn.functional.pad(t, (0, 0, width - length, 0))

        merged = []
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            keys = torch.cat([pad_left(old_layer.keys, old_len), pad_left(new_layer.keys, new_len)], dim=0)
            values = torch.cat([pad_left(old_layer.values, old_len), pad_left(new_layer.values, new_len)], dim=0)
            merged.append((keys, values))
        merged_mask = torch.cat(
            [
                torch.nn.functional.pad(self._mask, (width - old_len, 0)),
                torch.nn.functional.pad(mask, (width - new_len, 0)),
            ],
            dim=0,
        )
        merged_pos = torch.cat([self._pos, pos])
        merged_last = torch.cat([self._last, last])
        merged_seen = torch.cat([self._seen, seen])
        merged_counts = None
        if self._counts is not None or counts is not None:
            def zeros(n: int) -> torch.Tensor:
                return torch.zeros((n, self.vocab_size), dtype=torch.float32, device=self.device)

            merged_counts = torch.cat([
                self._counts if self._counts is not None else zeros(len(self._running)),
                counts if counts is not None else zeros(len(seqs)),
            ])
        for layer, (keys, values) in zip(self._cache.layers, merged):
            layer.keys, layer.values = keys, values
        self._mask, self._pos, self._last, self._seen = merged_mask, merged_pos, merged_last, merged_seen
        self._counts = merged_counts
        self._running.extend(seqs)

    # ------------------------------------------------------------------ decoding

    def _decode(self, outputs: _StepOutputs) -> None:
        while self._running:
            cache_len = self._mask.shape[1]
            mask = torch.nn.functional.pad(self._mask, (0, 1), value=1)
            try:
                logits = self._forward(self._last[:, None], mask, self._pos[:, None], self._cache, phase="decode")
                tokens, tokens_dev = sample(
                    logits, [s.params for s in self._running], [s.generator for s in self._running], self._seen,
                    [s.banned() for s in self._running], counts=self._counts, allowed=self._allowed(self._running),
                )
                token_logprobs = self._logprobs(logits, tokens_dev, self._running)
                del logits
                break
            except _OOM_ERRORS as exc:
                self._rollback(cache_len)
                del mask
                self._free_memory()
                newest = max(range(len(self._running)), key=lambda i: self._running[i].order)
                victim = self._running[newest]
                logger.warning(
                    "out of memory in a decode step of %d sequence(s); failing the newest (%s): %s",
                    len(self._running), victim.seq_id, exc,
                )
                self._fail(victim, f"out_of_memory: decode step failed: {exc}", outputs)
                self._drop_rows({newest})
        else:
            return
        self._mask = mask
        self._pos = self._pos + 1
        self._last = tokens_dev
        self._seen[torch.arange(len(tokens), device=self.device), tokens_dev] = True
        if self._counts is not None:
            self._counts[torch.arange(len(tokens), device=self.device), tokens_dev] += 1.0
        done = {i for i, s in enumerate(self._running) if self._accept(s, tokens[i], outputs, token_logprobs[i])}
        if done:
            self._drop_rows(done)

    def _allowed(self, seqs: list[_Seq]) -> tuple[torch.Tensor, list[int]] | None:
        """This step's structured-output bitmask for `seqs` (the rows of the logits about to be sampled) and the
        rows it constrains; None when none is constrained."""
        return grammar.fill_bitmask([s.matcher for s in seqs], self.device, self.vocab_size)

    def _rollback(self, cache_len: int) -> None:
        """Undo a partial cache update (layers that appended before the failure)."""
        for layer in self._cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 and layer.keys.shape[-2] > cache_len:
                layer.keys = layer.keys[..., :cache_len, :]
                layer.values = layer.values[..., :cache_len, :]

    def _drop_rows(self, rows: set[int]) -> None:
        keep = [i for i in range(len(self._running)) if i not in rows]
        if not keep:
            self._running = []
            self._cache = self._mask = self._pos = self._last = self._seen = self._counts = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self._pos = self._pos.index_select(0, index)
        self._last = self._last.index_select(0, index)
        self._seen = self._seen.index_select(0, index)
        if self._counts is not None:
            # the last row with a count penalty gone: back to the batch that keeps no counts
            penalized = any(self._running[i].penalized for i in keep)
            self._counts = self._counts.index_select(0, index) if penalized else None
        self._running = [self._running[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache columns that are padding for every row."""
        if self._mask is None or self._mask.shape[1] == 0:
            return
        first = int(self._mask.any(dim=0).int().argmax())
        if first == 0:
            return
        for layer in self._cache.layers:
            layer.keys = layer.keys[..., first:, :]
            layer.values = layer.values[..., first:, :]
        self._mask = self._mask[:, first:]

    # ------------------------------------------------------------------ per-sequence bookkeeping

    def _accept(
        self, seq: _Seq, token: int, outputs: _StepOutputs, logprob: TokenLogprobDict | None = None
    ) -> bool:
        """Record one generated token (and its logprobs); returns True when the sequence finished (output already
        added)."""
        seq.tokens.append(token)
        logprobs = None if logprob is None else [logprob]
        n = len(seq.tokens)
        if seq.matcher is not None:
            if not seq.matcher.accept_token(token):  # cannot happen once masked; never let it stop the batch
                logger.error("sequence %s: token %d is not accepted by its grammar", seq.seq_id, token)
                self._fail(seq, f"structured_outputs: token {token} is not accepted by the grammar", outputs)
                return True
            if seq.matcher.is_terminated():  # the grammar complete, and a stop token taken (EOS's place)
                keep = seq.params.include_stop_str_in_output
                self._finish(seq, "stop", outputs, text_ids=None if keep else seq.tokens[:-1], logprobs=logprobs)
                return True
        if token in seq.stop_ids and n > seq.params.min_tokens:  # (masked out of the logits before that)
            # The stop token's own text only with include_stop_str_in_output (vLLM); EOS is skipped as special.
            keep = seq.params.include_stop_str_in_output
            self._finish(seq, "stop", outputs, text_ids=None if keep else seq.tokens[:-1], logprobs=logprobs)
            return True
        seq.text.add(seq.tokens)
        if n == seq.params.min_tokens:
            seq.text.activate_stops()
        if seq.text.cut_at_stop():
            self._finish(seq, "stop", outputs, flush=False, logprobs=logprobs)
            return True
        if n >= seq.params.max_new_tokens or len(seq.prompt_ids) + n >= self.context_length:
            self._finish(seq, "length", outputs, logprobs=logprobs)
            return True
        piece = seq.text.releasable()  # what can no longer be part of a stop string
        if piece or logprobs:
            outputs.add(seq, piece, logprobs=logprobs)
        return False

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_ids_with_special(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ log probabilities

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[_Seq]) -> list[TokenLogprobDict | None]:
        """Each row's chosen token with its logprob and top alternatives, for the rows that asked (else None)."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        found: list[TokenLogprobDict | None] = [None] * len(seqs)
        if not rows:
            return found
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        raw = logits.index_select(0, index).log_softmax(dim=-1)
        chosen = tokens.index_select(0, index)
        picked = top_logprobs(raw, chosen, [seqs[i].params.logprobs for i in rows])
        for i, token, (logprob, top_ids, top_lps) in zip(rows, chosen.tolist(), picked):
            found[i] = self._token_logprob(token, logprob, top_ids, top_lps)
        return found

    def _prompt_logprobs(self, logits: torch.Tensor, seq: _Seq) -> list[TokenLogprobDict | None]:
        """From one left-padded row's logits at every position ([width, vocab]): each prompt token's logprob given
        the tokens before it, and the top alternatives; the first token has none."""
        prompt = seq.prompt_ids
        start = logits.shape[0] - len(prompt)  # the row's first real position
        raw = logits[start:-1].log_softmax(dim=-1)  # position p predicts prompt token p + 1
        targets = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
        picked = top_logprobs(raw, targets, [seq.params.prompt_logprobs] * len(targets))
        return [None] + [self._token_logprob(t, lp, ids, lps) for t, (lp, ids, lps) in zip(prompt[1:], picked)]

    def _token_logprob(self, token: int, logprob: float, top_ids: list[int], top_lps: list[float]) -> TokenLogprobDict:
        def text(token_id: int) -> str:
            return token_text(self.tokenizer, self._token_texts, token_id)

        return {
            "token": text(token), "id": token, "logprob": logprob,
            "top": [{"token": text(t), "id": t, "logprob": lp} for t, lp in zip(top_ids, top_lps)],
        }

    def _finish(
        self,
        seq: _Seq,
        reason: str,
        outputs: _StepOutputs,
        text_ids: list[int] | None = None,
        flush: bool = True,
        logprobs: list[TokenLogprobDict] | None = None,
    ) -> None:
        """Emit everything left (held-back text) and mark the sequence done; the caller drops its row.

        ``flush`` decodes tokens still held back as an incomplete character (a trailing partial
        character is dropped); the flushed text may still complete a stop string.
        """
        if flush:
            seq.text.flush(seq.tokens if text_ids is None else text_ids)
            if seq.text.cut_at_stop() and reason == "length":
                reason = "stop"
        outputs.add(seq, seq.text.rest(), finish_reason=reason, logprobs=logprobs)
        self._release(seq)

    def _fail(self, seq: _Seq, error: str, outputs: _StepOutputs) -> None:
        outputs.add(seq, "", error=error)
        self._release(seq)
