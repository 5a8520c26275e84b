"""Structured outputs for the transformers engine: xgrammar (vLLM's default structured-output backend) compiles a
sequence's constraint into a token-level matcher, which gives a bitmask of the tokens allowed next.

One ``Grammars`` per engine holds the ``xgr.GrammarCompiler`` (built on first use: reading the vocabulary takes
~0.1 s) with its compile cache; ``matcher`` compiles one ``StructuredOutputs`` the way vLLM's xgrammar backend does
(``json_object`` as the schema ``{"type": "object"}``, ``choice`` as an EBNF alternation, a ``grammar`` without
``::=`` as Lark) and raises ValueError for what xgrammar cannot compile. ``fill_bitmask`` builds one step's bitmask
for the rows that carry a matcher; ``apply_bitmask`` masks those rows' logits with it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..base import StructuredOutputs

try:
    import xgrammar as xgr
except ImportError:  # a worker dependency, but an install without it still serves, without structured outputs
    xgr = None

logger = logging.getLogger(__name__)

AVAILABLE = xgr is not None

# How deep a JSON schema's objects and arrays may nest (vLLM's MAX_STRUCTURED_OUTPUT_JSON_NESTING): xgrammar's
# converter recurses in C++, so a hostile schema could otherwise overflow the worker's stack.
MAX_JSON_NESTING = 64

# xgrammar's compile cache, per engine (vLLM's VLLM_XGRAMMAR_CACHE_MB default).
_CACHE_BYTES = 512 * 1024 * 1024


def choice_as_grammar(choices: Iterable[str]) -> str:
    """The EBNF grammar that accepts exactly one of `choices` (vLLM's ``choice_as_grammar``)."""
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        if ord(ch) < 0x20 or ord(ch) == 0x7F:  # other C0 controls and DEL
            return f"\\u{ord(ch):04x}"
        return ch

    return "root ::= " + " | ".join('"' + "".join(escape(ch) for ch in c) + '"' for c in choices)


def grammar_is_likely_lark(grammar: str) -> bool:
    """Whether a grammar reads as Lark rather than EBNF: no line defines a rule with ``::=`` (vLLM's test)."""
    for line in grammar.split("\n"):
        line = re.sub(r"(#|//).*$", "", line).strip()
        if line and "::=" in line:
            return False
    return True


def _too_deep(spec: Any, limit: int) -> bool:
    level = [spec]
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


class Grammars:
    """One engine's xgrammar compiler (with its cache), built on first use; ``matcher`` may be called from any
    thread (the worker's, in ``engine.add``)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        # The model's vocabulary (its logits' width), which may be larger than the tokenizer's: the extra ids are
        # never allowed by a grammar, and the bitmask covers every logit.
        self.vocab_size = vocab_size
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=True,
                                                     cache_limit_bytes=_CACHE_BYTES)
                logger.info("xgrammar compiler ready: vocab_size=%d vocab_type=%s", self.vocab_size,
                            info.vocab_type)
            return self._compiler

    def compile(self, constraint: StructuredOutputs) -> Any:
        """The constraint compiled (an ``xgr.CompiledGrammar``); ValueError for what xgrammar cannot compile."""
        if xgr is None:
            raise ValueError("structured_outputs: this worker has no xgrammar installed")
        kind, spec = constraint.kind, constraint.spec
        if kind == "choice":
            if isinstance(spec, str) or not spec or not all(isinstance(c, str) and c for c in spec):
                raise ValueError("structured_outputs: choice takes a non-empty list of non-empty strings")
        elif not isinstance(spec, str):
            raise ValueError(f"structured_outputs: {kind} takes a string")
        elif kind != "json_object" and not spec:
            raise ValueError(f"structured_outputs: {kind} must not be empty")
        if kind == "json":
            try:
                schema = json.loads(spec)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"structured_outputs: the JSON schema is not valid JSON: {exc}") from None
            if isinstance(schema, (dict, list)) and _too_deep(schema, MAX_JSON_NESTING):
                raise ValueError(f"structured_outputs: the JSON schema nests deeper than {MAX_JSON_NESTING} levels")
        if kind == "regex" and "\x00" in spec:  # never meaningful, and xgrammar's regex parser does not handle it
            raise ValueError("structured_outputs: regex must not contain a NUL character")
        compiler = self._get_compiler()
        try:
            if kind == "json":
                return compiler.compile_json_schema(spec, any_whitespace=True)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=True)
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "choice":
                return compiler.compile_grammar(choice_as_grammar(spec))
            if grammar_is_likely_lark(spec):
                return compiler.compile_lark(spec)
            return compiler.compile_grammar(spec)
        except Exception as exc:  # xgrammar reports every bad spec as a RuntimeError from its C++ core
            raise ValueError(f"structured_outputs: cannot compile the {kind}: {_short(exc)}") from None

    def matcher(self, constraint: StructuredOutputs, stop_token_ids: Iterable[int]) -> Any:
        """A fresh ``xgr.GrammarMatcher`` for one sequence. Once its grammar is complete it allows only
        `stop_token_ids` (the model's EOS and the sequence's stop tokens, vLLM's ``all_stop_token_ids``), and
        accepting one of those terminates it."""
        compiled = self.compile(constraint)
        stops = sorted({int(t) for t in stop_token_ids})
        return xgr.GrammarMatcher(compiled, override_stop_tokens=stops or None)


def _short(exc: Exception) -> str:
    """xgrammar's message without its ``[hh:mm:ss] /project/cpp/file.cc:line:`` prefix."""
    text = str(exc).strip()
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", text).splitlines()[0] if text else type(exc).__name__


def fill_bitmask(
    matchers: Sequence[Any], device: torch.device, vocab_size: int
) -> tuple[torch.Tensor, list[int]] | None:
    """One step's token bitmask ([rows, ceil(vocab / 32)] int32 on `device`) for a batch whose row i carries
    `matchers[i]` (None: unconstrained), and the rows it must be applied to; None when no row is constrained now.
    Does not change any matcher."""
    if xgr is None or not any(m is not None for m in matchers):
        return None
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)  # CPU: xgrammar fills it there
    rows = [i for i, m in enumerate(matchers) if m is not None and m.fill_next_token_bitmask(bitmask, i)]
    if not rows:  # every constrained row may pick any token now
        return None
    return bitmask.to(device), rows


def apply_bitmask(logits: torch.Tensor, allowed: tuple[torch.Tensor, list[int]]) -> torch.Tensor:
    """A copy of `logits` ([B, vocab]) with the tokens `allowed`'s bitmask forbids at -inf in its rows."""
    bitmask, rows = allowed
    logits = logits.clone()
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1],
                                    indices=None if len(rows) == logits.shape[0] else rows)
    return logits
