"""What the test-only engines (echo, paced) share: a model folder's tokenizer and metadata, and no model.

(transformers' `AutoTokenizer` imports torch when torch is installed, but no model is built or run.)
"""

from __future__ import annotations

import json
import os
from typing import TypeVar

from transformers import AutoTokenizer

from .base import (
    ActiveSequence,
    SamplingParams,
    SequenceSlots,
    chat_token_ids,
    check_capabilities,
    read_generation_config,
    sampling_defaults,
)

SeqT = TypeVar("SeqT", bound=ActiveSequence)


class TokenizerOnlyEngine(SequenceSlots[SeqT]):
    """The `Engine` metadata of a model folder (tokenizer, name, context length, sampling defaults), no weights.

    No model, so no log probabilities: a job asking for them is refused (the gateway refuses it before queueing,
    from the model card's capabilities); the other sampling settings are accepted and have nothing to act on."""

    capabilities: frozenset[str] = frozenset()
    stats = None  # no scheduler of its own

    def __init__(self, model_path: str, max_batch: int = 8, headroom: int = 0) -> None:
        super().__init__(max_batch, headroom)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model_name = os.path.basename(os.path.normpath(model_path))
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
            self.context_length = int(json.load(fh).get("max_position_embeddings", 2048))
        self.vocab_size = len(self.tokenizer)
        self.defaults = sampling_defaults(read_generation_config(model_path))

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, tools)

    def device_memory(self) -> tuple[int, int]:
        return 0, 0  # no model, no GPU

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        check_capabilities(params, self.capabilities, type(self).__name__.removesuffix("Engine").lower())
