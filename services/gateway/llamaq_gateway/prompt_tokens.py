"""Exact prompt token counts without torch: the worker publishes its tokenizer and chat template to Redis,
and this renders the template the way transformers' `apply_chat_template` does, then encodes with `tokenizers`.
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
    def __init__(self, card: ModelCard, tokenizer_json: str):
        self.card = card
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._template = _compile(card.chat_template)

    def render(self, messages: list[dict[str, str]]) -> str:
        return self._template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True, **self.card.special_tokens
        )

    def count(self, messages: list[dict[str, str]]) -> int:
        # apply_chat_template encodes the rendered text without adding special tokens again.
        return len(self._tokenizer.encode(self.render(messages), add_special_tokens=False).ids)
