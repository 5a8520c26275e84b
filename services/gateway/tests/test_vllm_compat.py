"""vLLM's `/health`, `/version`, `/tokenize`, `/detokenize` and `/v1/models` fields, against a real Redis holding
what a worker publishes for the small model; every token id must be what the model's own transformers tokenizer
(and `apply_chat_template`) gives."""

import time

import pytest
from fastapi.testclient import TestClient

from llamaq_gateway.app import create_app
from llamaq_gateway.jobs import MODEL_CARD_CACHE_S
from llamaq_gateway.settings import GatewaySettings
from llamaq_gateway.vllm_compat import VLLM_DIALECT
from llamaq_protocol import keys

CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? héllo 你好 🙂"},
]


def publish(store, card, tokenizer_json) -> None:
    """A ready worker serving `card`, as the worker's presence.py writes it."""
    store.hset(keys.model(card.name), mapping={"card": card.model_dump_json(), "tokenizer_json": tokenizer_json})
    store.hset(keys.worker("w1"), mapping={"model": card.name})
    store.zadd(keys.WORKERS, {"w1": time.time()})


@pytest.fixture
def client(store, redis_url, published_model):
    publish(store, *published_model)
    with TestClient(create_app(GatewaySettings(redis_url=redis_url))) as http:
        yield http


def assert_error(reply, status: int, error_type: str, param: str | None = "absent") -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == error_type and error["code"] == status and error["message"], error
    if param != "absent":
        assert error["param"] == param, error
    return error


def test_tokenize_a_prompt_as_the_models_tokenizer_does(client, tokenizer):
    prompt = "What is the capital of France? héllo 你好 🙂"
    reply = client.post("/tokenize", json={"prompt": prompt})
    assert reply.status_code == 200, reply.text
    expected = tokenizer(prompt)["input_ids"]
    assert reply.json() == {"count": len(expected), "max_model_len": 8192, "tokens": expected, "token_strs": None}
    bare = client.post("/tokenize", json={"model": "small", "prompt": prompt, "add_special_tokens": False,
                                          "return_token_strs": True}).json()
    assert bare["tokens"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(bare["tokens"])


@pytest.mark.parametrize("add_generation_prompt", [None, True, False])
def test_tokenize_messages_renders_the_chat_template(client, tokenizer, add_generation_prompt):
    body = {"messages": CONVERSATION}
    if add_generation_prompt is not None:
        body["add_generation_prompt"] = add_generation_prompt
    reply = client.post("/tokenize", json=body)
    assert reply.status_code == 200, reply.text
    expected = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt is not False, tokenize=True
    )["input_ids"]
    assert reply.json()["tokens"] == expected and reply.json()["count"] == len(expected)


def test_tokenize_takes_openai_text_parts_and_the_developer_role(client, tokenizer):
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
                {"role": "user", "content": "Hi"}]
    reply = client.post("/tokenize", json={"messages": messages})
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, tokenize=True,
    )["input_ids"]
    assert reply.json()["tokens"] == expected


def test_detokenize_is_the_tokenizers_decode(client, tokenizer):
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)["input_ids"]
    reply = client.post("/detokenize", json={"model": "small", "tokens": ids})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"prompt": tokenizer.decode(ids)}
    assert "<|im_start|>" in reply.json()["prompt"]  # special tokens kept, as vLLM decodes
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "param"),
    [
        ("/tokenize", {}, 422, "invalid_request_error", None),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422,
         "invalid_request_error", None),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, 422, "invalid_request_error", None),
        ("/tokenize", {"prompt": "a", "nonsense": 1}, 422, "invalid_request_error", "nonsense"),
        ("/tokenize", {"prompt": 7}, 422, "invalid_request_error", "prompt"),
        ("/tokenize", {"messages": []}, 422, "invalid_request_error", "messages"),
        ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request_error",
         "messages.0.tool_call_id"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "invalid_request_error", "messages.0.content.0"),
        ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model_not_found", "model"),
        ("/detokenize", {"tokens": [1, -1]}, 422, "invalid_request_error", "tokens.1"),
        ("/detokenize", {"tokens": [1, 2**40]}, 400, "invalid_request_error", "tokens.1"),
        ("/detokenize", {"tokens": "1 2"}, 422, "invalid_request_error", "tokens"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model_not_found", "model"),
        ("/detokenize", {"prompt": "a"}, 422, "invalid_request_error", None),
    ],
)
def test_bad_input_is_the_one_error_shape(client, path, body, status, error_type, param):
    reply = client.post(path, json=body)
    error = assert_error(reply, status, error_type)
    if param is not None:
        assert error["param"] == param, error


def test_malformed_json_is_400(client):
    reply = client.post("/tokenize", content=b"{", headers={"Content-Type": "application/json"})
    assert_error(reply, 400, "invalid_request_error", None)


def test_health_version_and_models(client, store):
    reply = client.get("/health")
    assert reply.status_code == 200 and reply.content == b""
    version = client.get("/version").json()
    assert version == {"version": client.app.version, "server": "llamaq", "vllm_api": VLLM_DIALECT}
    (entry,) = client.get("/v1/models").json()["data"]
    assert entry["id"] == "small" and entry["root"] == "small" and entry["parent"] is None
    assert entry["max_model_len"] == 8192
    store.delete(keys.WORKERS)
    reply = client.get("/health")
    assert_error(reply, 503, "no_ready_worker")
    assert reply.headers["retry-after"]
    time.sleep(MODEL_CARD_CACHE_S)  # the served model's card, read at most this often
    assert_error(client.post("/tokenize", json={"prompt": "a"}), 503, "no_ready_worker")


def test_api_keys_guard_all_but_health(store, redis_url, published_model):
    publish(store, *published_model)
    with TestClient(create_app(GatewaySettings(redis_url=redis_url, api_keys="k1"))) as http:
        assert http.get("/health").status_code == 200
        for method, path, body in (("GET", "/version", None), ("POST", "/tokenize", {"prompt": "a"}),
                                   ("POST", "/detokenize", {"tokens": [1]})):
            assert_error(http.request(method, path, json=body), 401, "unauthorized")
            reply = http.request(method, path, json=body, headers={"Authorization": "Bearer k1"})
            assert reply.status_code == 200, reply.text
