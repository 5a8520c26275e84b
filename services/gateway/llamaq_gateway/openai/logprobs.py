"""Log probabilities in OpenAI's shapes: chat's `logprobs.content`, and the completions API's (vLLM's) lists."""

from __future__ import annotations

from typing import Any

# JSON has no -inf: OpenAI and vLLM report at least this.
MIN_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: each token with its `top` most likely alternatives (by rank)."""
    return {"content": [
        {"token": e["token"], "logprob": _logprob(e["logprob"]), "bytes": _bytes(e["token"]),
         "top_logprobs": [{"token": t["token"], "logprob": _logprob(t["logprob"]), "bytes": _bytes(t["token"])}
                          for t in e["top"][:top]]}
        for e in entries
    ]}


def text_logprobs(
    entries: list[dict[str, Any] | None], top: int, offset: int = 0, first_token: str = ""
) -> dict[str, Any]:
    """The completions API's `logprobs` (vLLM's shape): tokens, their logprobs, up to `top` + 1 alternatives each
    (the chosen token first, then by rank), and each token's offset in the text from `offset`; a None entry (the
    prompt's first token) is `first_token` with null logprobs."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        if e is None:
            token, logprob, alternatives = first_token, None, None
        else:
            token, logprob, alternatives = e["token"], _logprob(e["logprob"]), {}
            for alt in [e, *e["top"][:top]]:
                alternatives.setdefault(alt["token"], _logprob(alt["logprob"]))
        tokens.append(token)
        token_logprobs.append(logprob)
        top_logprobs.append(alternatives)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
