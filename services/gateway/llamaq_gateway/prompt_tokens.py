"""Exact prompt token counts, `/tokenize` and `/detokenize` without torch: the worker publishes its tokenizer and
chat template to Redis, and this renders the template the way transformers' `apply_chat_template` does, then
encodes with `tokenizers`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from llamaq_protocol import ModelCard


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Same override as transformers: jinja's own tojson escapes HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(chat_template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(chat_template)


class PromptCounter:
    """The served model's tokenizer and chat template, torch-free: prompt counts, and /tokenize and /detokenize."""

    def __init__(self, card: ModelCard, tokenizer_json: str):
        self.card = card
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._template = _compile(card.chat_template)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        return self._template.render(
            messages=messages, tools=tools or None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.card.special_tokens,
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, add_special_tokens: bool = False,
        tools: list[dict] | None = None,
    ) -> list[int]:
        # apply_chat_template encodes the rendered text without adding special tokens again.
        return self.encode(self.render(messages, add_generation_prompt, tools), add_special_tokens)

    def count(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        """The prompt's tokens as the worker renders it, its tools included."""
        return len(self.encode_chat(messages, tools=tools))

    def decode(self, ids: list[int]) -> str:
        """As transformers' `decode` with its defaults: special tokens kept. Ids must be below `vocab_size`."""
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def token_strs(self, ids: list[int]) -> list[str]:
        return [self._tokenizer.id_to_token(i) or "" for i in ids]
