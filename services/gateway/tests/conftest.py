"""A real redis-server for the gateway's own tests of what it does with Redis (the event hub, the SSE reader)."""

import hashlib
import os

import pytest

from llamaq_protocol import ModelCard
from private_redis import emptied, private_redis


@pytest.fixture(scope="session")
def redis_url():
    with private_redis("llamaq-gw-redis-") as url:
        yield url


@pytest.fixture
def store(redis_url):
    """The test Redis, emptied for each test."""
    with emptied(redis_url) as client:
        yield client



@pytest.fixture(scope="session")
def tokenizer():
    """The small test model's transformers tokenizer: what the worker loads and publishes."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.environ["LLAMAQ_TEST_MODEL"])


@pytest.fixture(scope="session")
def published_model(tokenizer) -> tuple[ModelCard, str]:
    """The card (named "small") and tokenizer JSON a worker publishes for that tokenizer (worker/presence.py)."""
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    card = ModelCard(
        name="small", context_length=8192, chat_template=tokenizer.chat_template,
        special_tokens=tokenizer.special_tokens_map,
        tokenizer_digest=hashlib.sha256(tokenizer_json.encode()).hexdigest(),
    )
    return card, tokenizer_json
