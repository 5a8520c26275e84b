"""`/tokenize` and `/detokenize`: token ids from the served model's own tokenizer and chat template, published by
the worker (prompt_tokens.py), so they are the ids the worker would run, with no model files and no torch here."""

from ..errors import InvalidParameter, InvalidRequest
from ..jobs import JobService, tokenize_sized
from ..openai import chat_messages, check_model, template_messages
from .requests import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


async def tokenize(body: TokenizeRequest, jobs: JobService) -> TokenizeResponse:
    """The token ids the model would see: a prompt as plain text, or messages rendered with the chat template."""
    card = await jobs.served_model()
    check_model(body.model, card)
    counter = await jobs.prompt_counter(card)
    if body.messages is not None:
        messages = template_messages(chat_messages(body.messages))
        agp = True if body.add_generation_prompt is None else body.add_generation_prompt
        try:
            ids = await tokenize_sized(sum(len(m["content"]) for m in messages), counter.encode_chat, messages, agp,
                                       bool(body.add_special_tokens))
        except Exception as exc:  # a template that refuses this conversation (e.g. roles out of order)
            raise InvalidRequest(f"messages: the model's chat template rejected them: {exc}", param="messages") from exc
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await tokenize_sized(len(body.prompt or ""), counter.encode, body.prompt or "", special)
    return TokenizeResponse(
        count=len(ids), max_model_len=card.context_length, tokens=ids,
        token_strs=counter.token_strs(ids) if body.return_token_strs else None,
    )


async def detokenize(body: DetokenizeRequest, jobs: JobService) -> DetokenizeResponse:
    """The text of these token ids, special tokens included (as vLLM decodes them)."""
    card = await jobs.served_model()
    check_model(body.model, card)
    counter = await jobs.prompt_counter(card)
    for i, token in enumerate(body.tokens):
        if token >= counter.vocab_size:
            raise InvalidParameter(f"tokens.{i}: {token} is not a token id (the vocabulary has {counter.vocab_size})",
                                   param=f"tokens.{i}")
    return DetokenizeResponse(prompt=await tokenize_sized(len(body.tokens) * 4, counter.decode, body.tokens))
