"""What a generation engine takes and gives back, without torch.

`SamplingParams` (one sequence's settings) and `StepOutput` (what one `step` produced for one sequence) are
shared by the real engine (`engine.Engine`, the only torch module) and the test-only `echo_engine.EchoEngine`,
so the batch worker and the echo engine never need torch for them. The generation-config helpers read a
model folder's `generation_config.json` the same way for both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


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
