"""A test-only engine that runs no model: each sequence's answer is its prompt's last user message.

`ENGINE=echo` makes the worker use it, so a benchmark can measure what the queue itself adds (nginx, gateway,
Redis, RQ, the worker loop) with the model's cost taken out. It has the `Engine` interface (`engines.base`) and
loads only the tokenizer. A sequence added before a `step` is answered in that step,
whole, with `finish_reason` "stop" (or "length", cut at `max_new_tokens`) and `completion_tokens` = the token
count of the answer. It is not for serving: its answers are the questions.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from .base import PRIORITY_INTERACTIVE, SamplingParams, StepOutput, chat_token_ids
from .tokenizer_only import TokenizerOnlyEngine

logger = logging.getLogger(__name__)

# encode_chat remembers the last user message of this many recent prompts for `add` to echo.
_REMEMBERED_PROMPTS = 4096


@dataclass(eq=False)
class _EchoSeq:
    seq_id: str
    text: str
    params: SamplingParams
    canceled: bool = False


class EchoEngine(TokenizerOnlyEngine[_EchoSeq]):
    def __init__(self, model_path: str, max_batch: int = 8, headroom: int = 0, **_ignored) -> None:
        """Same arguments as `TransformersEngine` (``device`` and ``dtype`` are accepted and ignored)."""
        super().__init__(model_path, max_batch, headroom)
        self._user_text: OrderedDict[tuple[int, ...], str] = OrderedDict()
        logger.info("echo engine ready (no model): tokenizer of %s, max_batch=%d", self.model_name, max_batch)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        ids = chat_token_ids(self.tokenizer, messages, tools)
        user = [m.get("content", "") for m in messages if m.get("role") == "user"]
        with self._lock:
            self._user_text[tuple(ids)] = user[-1] if user else ""
            while len(self._user_text) > _REMEMBERED_PROMPTS:
                self._user_text.popitem(last=False)
        return ids

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
            priority: int = PRIORITY_INTERACTIVE) -> None:
        # (answered whole in the next step: no batch to be preempted from)
        self._check(prompt_ids, params)
        self._enqueue(seq_id, lambda: _EchoSeq(seq_id, self._answer_text(prompt_ids), params), priority)

    def _answer_text(self, prompt_ids: list[int]) -> str:
        """The text to echo (call with the lock held: encode_chat fills the same map)."""
        # Prompts not built by encode_chat echo their own decoded text.
        text = self._user_text.pop(tuple(int(t) for t in prompt_ids), None)
        if text is None:
            text = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        return text

    def step(self) -> list[StepOutput]:
        batch = self._take_pending()
        outputs = []
        for seq in batch:
            if seq.canceled:
                outputs.append(StepOutput(seq.seq_id, "", 0, "canceled"))
            else:
                ids = self.tokenizer.encode(seq.text, add_special_tokens=False)
                reason = "stop"
                if len(ids) > seq.params.max_new_tokens:
                    ids, reason = ids[: seq.params.max_new_tokens], "length"
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                else:
                    text = seq.text
                outputs.append(StepOutput(seq.seq_id, text, len(ids), reason))
        self._release(*batch)
        return outputs
