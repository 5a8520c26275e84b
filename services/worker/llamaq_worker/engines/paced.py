"""A test-only engine that runs no model and makes tokens at a GPU host's pace.

`ENGINE=paced` makes the worker use it, to load the gateway and the Redis relay as a GPU host would (say 256
sequences at 25 tokens/s each) on a machine without one. Each sequence emits exactly `max_new_tokens` tokens (it
never stops early: no EOS, no stop strings), each token one piece of text: the prompt's own token ids, cycled,
each decoded alone. Tokens come as a GPU's batched decoding steps make them: the engine keeps one step clock, a
tick every 1 / tokens_per_s seconds (40 ms at 25 tokens/s), and every tick gives one token to every running
sequence; a sequence added between two ticks gets its first token at the next one. So one `step` carries a token
for every running sequence, as one of vLLM's steps does, rather than a few sequences each on a schedule of its
own. A `step` returns what has come due since the last one, several tokens of a sequence joined into one
`StepOutput` when the loop fell behind (the rate is kept); when nothing is due it sleeps until the next tick (at
most MAX_SLEEP_S), so the decoding loop does not spin. The last token ends with "length"; a canceled sequence
ends with "canceled" at the next step. It has the `Engine` interface (`engines.base`) and loads only the
tokenizer.

Priorities as a GPU engine honours them: a tick gives a token to at most `max_batch` sequences, the highest priority
first, then the earliest added; the `headroom` more it may hold (interactive ones, in place of lower-priority ones)
take their ticks, and those get no token while they are left out (preempted, counted in `stats`), then continue
where they were.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import PRIORITY_INTERACTIVE, EngineStats, SamplingParams, StepOutput
from .tokenizer_only import TokenizerOnlyEngine

logger = logging.getLogger(__name__)

# Longest sleep of one `step` with nothing due, so that sequences added meanwhile are not kept waiting long.
MAX_SLEEP_S = 0.05


@dataclass(eq=False)
class _PacedSeq:
    seq_id: str
    pieces: list[str]  # the text of each prompt token, cycled as the output
    max_new_tokens: int
    added_tick: int  # the tick it was added in: its token k (from 1) comes with tick added_tick + k
    canceled: bool = False
    emitted: int = 0  # tokens made so far
    ids: list[int] = field(default_factory=list)  # the prompt's token ids, cycled as the output's
    priority: int = PRIORITY_INTERACTIVE
    order: int = 0  # admission order
    reported: int = 0  # tokens handed out so far
    decoding: bool = False  # it had a token in the last tick

    def rank(self) -> tuple[int, int]:
        return self.priority, self.order


class PacedEngine(TokenizerOnlyEngine[_PacedSeq]):
    def __init__(
        self,
        model_path: str,
        max_batch: int = 8,
        tokens_per_s: float = 25.0,
        headroom: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        **_ignored,
    ) -> None:
        """Like `EchoEngine` (``device`` and ``dtype`` are accepted and ignored); ``clock`` and ``sleep`` are for
        tests."""
        if not tokens_per_s > 0:
            raise ValueError("tokens_per_s must be > 0")
        super().__init__(model_path, max_batch, headroom)
        self.stats = EngineStats()  # running, waiting (left out of the last tick), preemptions
        self.tokens_per_s = float(tokens_per_s)
        self.tick_s = 1.0 / self.tokens_per_s
        self._clock = clock
        self._sleep = sleep
        self._epoch = clock()  # tick 0
        self._ticked = 0  # the last tick whose tokens were made
        self._order = 0
        self._running: list[_PacedSeq] = []
        self._piece_of: dict[int, str] = {}
        logger.info("paced engine ready (no model): %.1f tokens/s per sequence, tokenizer of %s, max_batch=%d",
                    self.tokens_per_s, self.model_name, max_batch)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
            priority: int = PRIORITY_INTERACTIVE) -> None:
        self._check(prompt_ids, params)
        pieces = [self._piece(int(t)) for t in prompt_ids]

        def admitted() -> _PacedSeq:
            self._order += 1
            return _PacedSeq(seq_id, pieces, params.max_new_tokens, self._tick(self._clock()),
                             ids=[int(t) for t in prompt_ids], priority=priority, order=self._order)

        self._enqueue(seq_id, admitted, priority)

    def _tick(self, at: float) -> int:
        """The number of the last tick at or before `at`."""
        # (the epsilon: woken exactly at a tick, float rounding must not make its tokens wait a round)
        return math.floor((at - self._epoch) / self.tick_s + 1e-9)

    def _piece(self, token_id: int) -> str:
        """One token's text alone (special tokens spelled out, so that every token is an event with text)."""
        piece = self._piece_of.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False) or " "
            self._piece_of[token_id] = piece
        return piece

    def step(self) -> list[StepOutput]:
        self._running.extend(self._take_pending())
        outputs = self._due()
        if not outputs and self._running:
            wait = min(self._next_due() - self._clock(), MAX_SLEEP_S)
            if wait > 0:
                self._sleep(wait)
            outputs = self._due()
        return outputs

    def _due(self) -> list[StepOutput]:
        self._make_tokens(self._tick(self._clock()))
        outputs, done = [], []
        for seq in self._running:
            if seq.canceled:
                outputs.append(StepOutput(seq.seq_id, "", seq.reported, "canceled"))
                done.append(seq)
                continue
            if seq.emitted <= seq.reported:
                continue
            cycle = len(seq.pieces)
            text = "".join(seq.pieces[i % cycle] for i in range(seq.reported, seq.emitted))
            ids = [seq.ids[i % cycle] for i in range(seq.reported, seq.emitted)]
            seq.reported = seq.emitted
            finished = seq.emitted == seq.max_new_tokens
            outputs.append(StepOutput(seq.seq_id, text, seq.emitted, "length" if finished else None, token_ids=ids))
            if finished:
                done.append(seq)
        if done:
            gone = set(map(id, done))
            self._running = [s for s in self._running if id(s) not in gone]
            self._release(*done)
        return outputs

    def _make_tokens(self, tick: int) -> None:
        """The tokens of every tick up to `tick`: each to the `max_batch` best-ranked sequences due one."""
        if not self._running:
            self._ticked = tick
            self.stats.running = self.stats.waiting = 0
            return
        # (ticks before the earliest sequence was added made nothing: skipped, however long the engine was idle)
        self._ticked = max(self._ticked, min(s.added_tick for s in self._running))
        while self._ticked < tick:
            self._ticked += 1
            due = sorted((s for s in self._running if not s.canceled and s.added_tick < self._ticked
                          and s.emitted < s.max_new_tokens), key=_PacedSeq.rank)
            for seq in due[:self.max_batch]:
                seq.emitted += 1
                seq.decoding = True
            for seq in due[self.max_batch:]:
                if seq.decoding:
                    seq.decoding = False
                    self.stats.preemptions += 1
                    self.stats.count_preemption(seq.priority)
            self.stats.steps += 1
            self.stats.running = min(len(due), self.max_batch)
            self.stats.waiting = len(due) - self.stats.running

    def _next_due(self) -> float:
        """When the next tick is (every running sequence has a token due then)."""
        return self._epoch + (self._tick(self._clock()) + 1) * self.tick_s
