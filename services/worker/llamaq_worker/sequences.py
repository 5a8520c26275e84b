"""What a generation engine takes and gives back, without torch.

`SamplingParams` (one sequence's settings) and `StepOutput` (what one `step` produced for one sequence) are
shared by the real engine (`engine.Engine`, the only torch module) and the test-only `echo_engine.EchoEngine`,
so the batch worker and the echo engine never need torch for them. So is `SequenceSlots`, the bookkeeping of
which sequences hold one of the `max_batch` slots. The generation-config helpers read a model folder's
`generation_config.json` the same way for both.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float  # 0.0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class StepOutput:
    seq_id: str
    text: str  # new text since this sequence's previous output (may be "")
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None  # "stop" | "length" | "canceled" | None while running
    error: str | None = None  # set when the sequence failed; then finish_reason is None and the sequence is gone


class ActiveSequence(Protocol):
    seq_id: str
    canceled: bool


SeqT = TypeVar("SeqT", bound=ActiveSequence)


class SequenceSlots(Generic[SeqT]):
    """An engine's active sequences (pending or running), at most `max_batch`, behind one lock.

    `add`, `cancel`, `active` and `free_slots` may be called from another thread than `step`; the engine's own
    step-thread state needs no lock. Subclasses queue with `_enqueue`, take the queued ones with
    `_take_pending` and give a finished sequence's slot back with `_release`.
    """

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[SeqT] = []
        self._by_id: dict[str, SeqT] = {}

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._by_id)

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self.max_batch - len(self._by_id)

    def cancel(self, seq_id: str) -> None:
        with self._lock:
            seq = self._by_id.get(seq_id)
            if seq is not None:
                seq.canceled = True

    def _enqueue(self, seq_id: str, build: Callable[[], SeqT]) -> None:
        """Queue the sequence `build` makes; it runs under the lock, only once the id has a free slot."""
        with self._lock:
            if seq_id in self._by_id:
                raise ValueError(f"sequence {seq_id!r} is already active")
            if len(self._by_id) >= self.max_batch:
                raise ValueError(f"no free slot (max_batch={self.max_batch})")
            seq = build()
            self._by_id[seq_id] = seq
            self._pending.append(seq)

    def _take_pending(self) -> list[SeqT]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def _release(self, *seqs: SeqT) -> None:
        with self._lock:
            for seq in seqs:
                if self._by_id.get(seq.seq_id) is seq:
                    del self._by_id[seq.seq_id]


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
    return {
        "temperature": float(temperature),
        "top_p": float(top_p) if top_p is not None else 1.0,
        "top_k": int(top_k) if top_k is not None else 0,
        "repetition_penalty": float(rep) if rep is not None else 1.0,
    }


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids from the model's own chat template, whatever container transformers returns them
    in (a list, a BatchEncoding in 5.x, a tensor, or a batch of one)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(t) for t in out]
