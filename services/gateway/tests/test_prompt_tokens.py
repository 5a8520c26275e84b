"""The gateway's torch-free count must equal what the worker's tokenizer.apply_chat_template produces."""

import pytest

from llamaq_gateway.prompt_tokens import PromptCounter
from llamaq_protocol import GenerationParams


@pytest.fixture(scope="module")
def counter(published_model):
    return PromptCounter(*published_model)


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(prompt="What is the capital of France?"),
        GenerationParams(prompt="héllo wörld 你好 🙂 " * 20, system="Be terse."),
        GenerationParams(messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "  spaces\n\nand newlines\t"},
        ]),
        GenerationParams(prompt="<|im_start|> looks special but is user text"),
    ],
)
def test_count_matches_the_models_own_template(tokenizer, counter, params):
    messages = params.chat_messages()
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert counter.count(messages) == len(expected)
