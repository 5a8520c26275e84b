"""The test-only echo engine: the Engine interface, no model, answers with the last user message."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    import llamaq_worker  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaq_worker.engines.base import SamplingParams
from llamaq_worker.engines.echo import EchoEngine
from llamaq_worker.settings import WorkerSettings

MODEL = os.environ.get("LLAMAQ_TEST_MODEL", "/tmp/smol")
# Tiers (the root conftest.py): the small model's tokenizer.
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine() -> EchoEngine:
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    return EchoEngine(MODEL, device="cpu", dtype="float32", max_batch=2)


def params(n: int = 64) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def test_echoes_last_user_message_in_the_next_step(engine: EchoEngine) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ids = engine.encode_chat(messages)
    assert ids and all(type(t) is int for t in ids)
    engine.add("a", ids, params())
    assert engine.active == 1 and engine.free_slots == 1
    (out,) = engine.step()
    expected = len(engine.tokenizer.encode("What is the capital of France?", add_special_tokens=False))
    assert (out.seq_id, out.text, out.finish_reason, out.error) == ("a", "What is the capital of France?", "stop", None)
    assert out.completion_tokens == expected
    assert engine.active == 0 and engine.step() == []


def test_cap_cancel_and_slots(engine: EchoEngine) -> None:
    text = "one two three four five six seven eight"
    engine.add("long", engine.encode_chat([{"role": "user", "content": text}]), params(3))
    engine.add("gone", engine.encode_chat([{"role": "user", "content": "bye"}]), params())
    assert engine.free_slots == 0
    with pytest.raises(ValueError):
        engine.add("third", [1, 2], params())
    with pytest.raises(ValueError):
        engine.add("long", [1, 2], params())
    engine.cancel("gone")
    outs = {o.seq_id: o for o in engine.step()}
    assert outs["long"].finish_reason == "length" and outs["long"].completion_tokens == 3
    assert text.startswith(outs["long"].text) and outs["long"].text
    assert (outs["gone"].finish_reason, outs["gone"].text) == ("canceled", "")
    assert engine.free_slots == 2


def test_metadata_like_engine(engine: EchoEngine) -> None:
    assert engine.model_name == os.path.basename(os.path.normpath(MODEL))
    assert engine.context_length > 0
    assert set(engine.defaults) == {"temperature", "top_p", "top_k", "repetition_penalty"}
    assert engine.tokenizer.chat_template


def test_selected_by_engine_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().engine == "transformers"
    monkeypatch.setenv("ENGINE", "echo")
    assert WorkerSettings().engine == "echo"
    monkeypatch.setenv("ENGINE", "tgi")
    with pytest.raises(ValueError):
        WorkerSettings()


def test_logprobs_are_refused_not_invented(engine: EchoEngine) -> None:
    """No model, no log probabilities: the job is refused in `add` (the gateway refuses it before queueing)."""
    assert engine.capabilities == frozenset()
    for wanted in ({"logprobs": 0}, {"prompt_logprobs": 1}):
        with pytest.raises(ValueError, match="cannot compute log probabilities"):
            engine.add("lp", [1, 2], SamplingParams(max_new_tokens=4, temperature=0.0, **wanted))
    assert engine.active == 0
    # the other sampling settings are accepted
    engine.add("ok", [1, 2], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True, min_tokens=2,
                                            stop_token_ids=(3,), min_p=0.1, skip_special_tokens=False))
    assert [o.seq_id for o in engine.step()] == ["ok"]
