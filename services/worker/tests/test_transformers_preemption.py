"""Priorities in the transformers engine, against the real small model (float32, CPU): an interactive sequence added
while batch sequences fill every slot takes the place of one of them at once, and the preempted one resumes later
with nothing lost or made twice (the same greedy text, the same seeded sample, the same token counts)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    import llamaq_worker  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaq_worker.engines.base import PRIORITY_BATCH, PRIORITY_INTERACTIVE, SamplingParams, StepOutput
from llamaq_worker.engines.transformers import TransformersEngine

MODEL = os.environ.get("LLAMAQ_TEST_MODEL", "/tmp/smol")
# Tiers (the root conftest.py): the small model, run in-process.
pytestmark = [pytest.mark.model, pytest.mark.slow]

BATCH = {
    # greedy, with a stop string (its state must survive the preemption)
    "sky": ("In one sentence, explain why the sky is blue.",
            SamplingParams(max_new_tokens=20, temperature=0.0, stop=("blah",))),
    # sampled with a seed and the count penalties: its generator and output counts must survive too; its prompt's
    # logprobs are sent once, its tokens' one each
    "sea": ("Write a haiku about the sea.",
            SamplingParams(max_new_tokens=20, temperature=0.8, seed=7, presence_penalty=0.5, frequency_penalty=0.3,
                           logprobs=1, prompt_logprobs=1)),
}
INTERACTIVE = ("france", "What is the capital of France?", SamplingParams(max_new_tokens=12, temperature=0.0))


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    # Two sequences decode together; a third, interactive only, is held beside them.
    eng = TransformersEngine(MODEL, device="cpu", dtype="float32", max_batch=2, headroom=1)
    yield eng
    assert eng.active == 0


def prompt(engine: TransformersEngine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def run(engine: TransformersEngine, adds: dict[int, list[tuple[str, str, SamplingParams, int]]]
        ) -> tuple[dict[str, str], dict[str, StepOutput], dict[str, list[int]]]:
    """Step until idle, adding `adds[step]` (id, text, params, priority) before that step; each sequence's text,
    final output (its logprobs and prompt logprobs: all its outputs') and the steps it had an output in."""
    texts: dict[str, str] = {}
    logprobs: dict[str, list] = {}
    prompt_logprobs: dict[str, list] = {}
    final: dict[str, StepOutput] = {}
    steps: dict[str, list[int]] = {}
    for step in range(200):
        for seq_id, text, params, priority in adds.pop(step, []):
            engine.add(seq_id, prompt(engine, text), params, priority)
        if not engine.active and not adds:
            break
        for out in engine.step():
            assert out.error is None, out
            texts[out.seq_id] = texts.get(out.seq_id, "") + out.text
            steps.setdefault(out.seq_id, []).append(step)
            logprobs.setdefault(out.seq_id, []).extend(out.logprobs or [])
            if out.prompt_logprobs is not None:
                prompt_logprobs.setdefault(out.seq_id, []).append(out.prompt_logprobs)
            if out.finish_reason is not None:
                assert out.seq_id not in final, "a sequence finished twice"
                final[out.seq_id] = out
                out.logprobs, out.prompt_logprobs = logprobs[out.seq_id], prompt_logprobs.get(out.seq_id)
    assert engine.active == 0
    return texts, final, steps


def test_an_interactive_sequence_preempts_a_batch_one_which_resumes_losing_nothing(engine) -> None:
    batch = [(key, text, params, PRIORITY_BATCH) for key, (text, params) in BATCH.items()]
    key, text, params = INTERACTIVE
    alone_texts, alone_final, _ = run(engine, {0: batch})  # unpreempted: the two batch sequences fill the batch
    solo_texts, _, _ = run(engine, {0: [(key, text, params, PRIORITY_INTERACTIVE)]})
    before = dict(engine.stats.preempted)

    assert engine.free_slots_for(PRIORITY_INTERACTIVE) == 2  # (the headroom only beside batch work)
    texts, final, steps = run(engine, {0: batch, 3: [(key, text, params, PRIORITY_INTERACTIVE)]})

    # Its first token came in the step it was added in (prefilled in place of a batch sequence).
    assert steps[key][0] == 3, steps[key]
    assert texts[key] == solo_texts[key] and texts[key].startswith("The capital of France is Paris")
    # The batch sequence admitted last ("sea") gave way: no output while the interactive one ran, then it resumed.
    assert engine.stats.preempted.get(PRIORITY_BATCH, 0) == before.get(PRIORITY_BATCH, 0) + 1
    assert not [s for s in steps["sea"] if 3 <= s <= steps[key][-1]], (steps["sea"], steps[key])
    assert [s for s in steps["sky"] if 3 <= s <= steps[key][-1]], "the other batch sequence kept decoding"
    # Nothing lost or made twice: the greedy text, the seeded sample and the counts of the unpreempted run.
    for seq_id in BATCH:
        assert texts[seq_id] == alone_texts[seq_id], seq_id
        assert final[seq_id].completion_tokens == alone_final[seq_id].completion_tokens, seq_id
        assert final[seq_id].finish_reason == alone_final[seq_id].finish_reason, seq_id
    sea = final["sea"]
    assert [entry["id"] for entry in sea.logprobs] == [entry["id"] for entry in alone_final["sea"].logprobs]
    assert len(sea.logprobs) == sea.completion_tokens
    (prompt_logprobs,) = sea.prompt_logprobs  # once, at its first prefill
    assert len(prompt_logprobs) == len(prompt(engine, BATCH["sea"][0]))
    assert engine.stats.running == engine.stats.waiting == 0


def test_batch_work_is_held_to_max_batch_and_a_preempted_sequence_can_be_canceled(engine) -> None:
    key, text, params = INTERACTIVE
    for seq_id, (batch_text, batch_params) in BATCH.items():
        engine.add(seq_id, prompt(engine, batch_text), batch_params, PRIORITY_BATCH)
    engine.step()
    # Batch work holds MAX_BATCH: no slot for more of it, one for interactive work.
    assert (engine.free_slots_for(PRIORITY_BATCH), engine.free_slots_for(PRIORITY_INTERACTIVE)) == (0, 1)
    with pytest.raises(ValueError, match="no free slot"):
        engine.add("more", prompt(engine, batch_text), batch_params, PRIORITY_BATCH)
    engine.add(key, prompt(engine, text), params, PRIORITY_INTERACTIVE)
    engine.step()
    assert (engine.stats.running, engine.stats.waiting) == (2, 1)
    engine.cancel("sea")  # the preempted one
    ended = {out.seq_id: out for out in engine.step() if out.finish_reason}
    assert ended["sea"].finish_reason == "canceled"
    assert engine.stats.waiting == 0
    for seq_id in ("sky", key):
        engine.cancel(seq_id)
    while engine.active:
        engine.step()
