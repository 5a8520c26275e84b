"""The test-only paced engine: no model, exactly max_new_tokens tokens per sequence at a fixed rate each."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

try:
    import llamaq_worker  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaq_worker.engines.base import PRIORITY_BATCH, PRIORITY_INTERACTIVE, SamplingParams
from llamaq_worker.engines.paced import MAX_SLEEP_S, PacedEngine

MODEL = os.environ.get("LLAMAQ_TEST_MODEL", "/tmp/smol")
# Tiers (the root conftest.py): the small model's tokenizer.
pytestmark = pytest.mark.model


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def params(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> PacedEngine:
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    return PacedEngine(MODEL, max_batch=3, tokens_per_s=10.0, clock=clock, sleep=clock.sleep)


def test_one_tick_gives_every_running_sequence_a_token(engine: PacedEngine, clock: FakeClock) -> None:
    """As in a GPU's batched decoding step: a tick every 1 / tokens_per_s (0.1 s here) gives one token to every
    running sequence, whenever each was added; a sequence added between ticks starts at the next one."""
    prompt = engine.encode_chat([{"role": "user", "content": "Hi there"}])
    clock.now += 0.01
    engine.add("a", prompt, params(5))  # in tick 0
    clock.now += 0.24  # ticks 1 and 2 passed: "a" has two tokens due; "b" joins in tick 2
    engine.add("b", prompt, params(2))
    (a,) = engine.step()
    assert (a.seq_id, a.completion_tokens, a.finish_reason) == ("a", 2, None)
    assert a.text == engine._piece(prompt[0]) + engine._piece(prompt[1])
    # Nothing due at once: the step sleeps to the next tick (at 0.3 s) and returns a token of each sequence.
    outs = {o.seq_id: o.completion_tokens for o in engine.step()}
    assert outs == {"a": 3, "b": 1}
    assert clock.sleeps == [pytest.approx(0.05)]
    clock.now += 0.07  # still in tick 3: the next step sleeps to tick 4 (0.03 s), not to a schedule of b's own
    outs = {o.seq_id: o for o in engine.step()}
    assert clock.sleeps[1:] == [pytest.approx(0.03)]
    assert (outs["a"].completion_tokens, outs["a"].finish_reason) == (4, None)
    assert (outs["b"].completion_tokens, outs["b"].finish_reason) == (2, "length")
    clock.now += 1.0  # far behind: everything left is due, in one output per sequence
    (a,) = engine.step()
    assert (a.completion_tokens, a.finish_reason) == (5, "length")
    assert engine.active == 0 and engine.free_slots == 3


def test_a_tick_serves_max_batch_sequences_interactive_first(clock: FakeClock) -> None:
    """With a headroom, the engine holds more sequences than a tick serves: an interactive one added while batch
    sequences fill the batch gets the next tick's token in place of the batch sequence admitted last, which gets none
    until a slot frees and then continues where it was (every token, in order)."""
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    engine = PacedEngine(MODEL, max_batch=2, headroom=1, tokens_per_s=10.0, clock=clock, sleep=clock.sleep)
    prompt = [11, 12, 13]
    engine.add("a", prompt, params(4), PRIORITY_BATCH)
    engine.add("b", prompt, params(4), PRIORITY_BATCH)
    assert (engine.free_slots_for(PRIORITY_BATCH), engine.free_slots_for(PRIORITY_INTERACTIVE)) == (0, 1)
    with pytest.raises(ValueError, match="no free slot"):
        engine.add("c", prompt, params(4), PRIORITY_BATCH)
    clock.now += 0.1  # tick 1: both batch sequences decode
    assert {o.seq_id: o.completion_tokens for o in engine.step()} == {"a": 1, "b": 1}
    engine.add("i", prompt, params(2), PRIORITY_INTERACTIVE)
    clock.now += 0.1  # tick 2: "i" in place of "b"
    assert {o.seq_id: o.completion_tokens for o in engine.step()} == {"a": 2, "i": 1}
    assert (engine.stats.running, engine.stats.waiting, engine.stats.preempted) == (2, 1, {PRIORITY_BATCH: 1})
    clock.now += 0.1  # tick 3: "i" ends
    outs = {o.seq_id: o for o in engine.step()}
    assert (outs["i"].completion_tokens, outs["i"].finish_reason) == (2, "length") and "b" not in outs
    clock.now += 1.0  # "b" back: it gets all its tokens, the prompt cycled from where it stopped
    outs = {o.seq_id: o for o in engine.step()}
    assert (outs["b"].completion_tokens, outs["b"].finish_reason) == (4, "length")
    assert outs["b"].token_ids == [12, 13, 11]
    assert engine.active == 0 and engine.stats.preemptions == 1


def test_output_cycles_the_prompt_and_ignores_eos(engine: PacedEngine, clock: FakeClock) -> None:
    prompt = [engine.tokenizer.eos_token_id, *engine.tokenizer.encode("ab", add_special_tokens=False)]
    engine.add("a", prompt, params(7))
    clock.now += 10
    (out,) = engine.step()
    pieces = [engine._piece(t) for t in prompt]
    assert out.text == "".join(pieces[i % len(prompt)] for i in range(7))
    assert (out.completion_tokens, out.finish_reason) == (7, "length")
    assert all(pieces)


def test_sleep_is_capped_and_cancel_ends_at_once(engine: PacedEngine, clock: FakeClock) -> None:
    slow = PacedEngine(MODEL, max_batch=2, tokens_per_s=0.5, clock=clock, sleep=clock.sleep)
    slow.add("a", [1, 2], params(3))
    assert slow.step() == []  # first token due in 2 s: one capped sleep, then nothing yet
    assert clock.sleeps == [MAX_SLEEP_S]
    slow.cancel("a")
    (out,) = slow.step()
    assert (out.seq_id, out.text, out.completion_tokens, out.finish_reason) == ("a", "", 0, "canceled")
    assert clock.sleeps == [MAX_SLEEP_S]  # a cancel is due at once
    assert slow.active == 0


def test_rejects_like_the_other_engines(engine: PacedEngine) -> None:
    with pytest.raises(ValueError):
        engine.add("a", [], params(3))
    with pytest.raises(ValueError):
        engine.add("a", [1], params(0))
    with pytest.raises(ValueError):
        PacedEngine(MODEL, tokens_per_s=0)
    assert engine.device_memory() == (0, 0)
    engine.close()


def test_real_time_rate() -> None:
    """On the real clock: 4 sequences × 10 tokens at 50 tokens/s take about 0.2 s (a tick every 20 ms), and the loop
    does not spin."""
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    engine = PacedEngine(MODEL, max_batch=4, tokens_per_s=50.0)
    for i in range(4):
        engine.add(str(i), [10 + i, 20 + i], params(10))
    started, steps, tokens = time.monotonic(), 0, {}
    while engine.active:
        steps += 1
        for out in engine.step():
            tokens[out.seq_id] = out.completion_tokens
    elapsed = time.monotonic() - started
    assert tokens == {str(i): 10 for i in range(4)}
    assert 0.1 <= elapsed <= 1.0
    assert steps <= 40  # about one step per tick (10), never a busy loop
