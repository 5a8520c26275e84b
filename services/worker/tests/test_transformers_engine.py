"""Tests of the transformers engine (llamaq's own continuous batching) against the real small Llama-architecture
model (float32, CPU)."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

try:
    import llamaq_worker  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaq_worker.engines.base import SamplingParams, StepOutput, StructuredOutputs
from llamaq_worker.engines.text import IncrementalText
from llamaq_worker.engines.transformers import TransformersEngine
from llamaq_worker.engines.transformers.engine import _Seq, _StepOutputs
from llamaq_worker.engines.transformers.sampling import draw

MODEL = os.environ.get("LLAMAQ_TEST_MODEL", "/tmp/smol")
# Tiers (the root conftest.py): the small model, run in-process.
pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPTS = {
    "france": "What is the capital of France?",
    "sky": "In one sentence, explain why the sky is blue, mentioning Rayleigh scattering and how the human eye sees.",
    "haiku": "Write a haiku about the sea.",
}


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    eng = TransformersEngine(MODEL, device="cpu", dtype="float32", max_batch=4)
    yield eng
    assert eng.active == 0


def chat(engine: TransformersEngine, key: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": PROMPTS[key]}])


def greedy(n: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def drain(engine: TransformersEngine, schedule: dict[int, list[tuple[str, list[int], SamplingParams]]] | None = None,
          max_steps: int = 200) -> tuple[dict[str, str], dict[str, StepOutput]]:
    """Step until idle; ``schedule`` maps a step number to sequences added just before that step."""
    schedule = dict(schedule or {})
    texts: dict[str, str] = {}
    final: dict[str, StepOutput] = {}
    for step in range(max_steps):
        for seq_id, ids, params in schedule.pop(step, []):
            engine.add(seq_id, ids, params)
        if not engine.active and not schedule:
            break
        for out in engine.step():
            texts[out.seq_id] = texts.get(out.seq_id, "") + out.text
            if out.finish_reason is not None or out.error is not None:
                assert out.seq_id not in final, "a sequence finished twice"
                final[out.seq_id] = out
    assert engine.active == 0
    return texts, final


def solo(engine: TransformersEngine, key: str, params: SamplingParams) -> tuple[str, StepOutput]:
    texts, final = drain(engine, {0: [(key, chat(engine, key), params)]})
    return texts.get(key, ""), final[key]


@pytest.fixture(scope="module")
def solo_greedy(engine: TransformersEngine) -> dict[str, tuple[str, StepOutput]]:
    return {key: solo(engine, key, greedy()) for key in PROMPTS}


def test_metadata(engine: TransformersEngine) -> None:
    assert engine.model_name == os.path.basename(os.path.normpath(MODEL))
    assert engine.context_length == engine.model.config.max_position_embeddings
    assert engine.defaults == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    ids = chat(engine, "france")
    assert isinstance(ids, list) and ids and all(type(t) is int for t in ids)
    assert engine.free_slots == 4 and engine.active == 0


def test_greedy_chat(engine: TransformersEngine) -> None:
    text, out = solo(engine, "france", greedy(24))
    assert "Paris" in text
    assert text == "The capital of France is Paris."
    assert out.finish_reason == "stop" and out.error is None
    # the eos token counts as a generated token; the text never contains it
    assert out.completion_tokens == len(engine.tokenizer.encode(text, add_special_tokens=False)) + 1


def test_batch_invariance(engine: TransformersEngine, solo_greedy) -> None:
    ids = {key: chat(engine, key) for key in PROMPTS}
    assert len({len(v) for v in ids.values()}) == 3, "prompts must have different lengths"
    texts, final = drain(
        engine,
        {
            0: [("france", ids["france"], greedy())],
            3: [("sky", ids["sky"], greedy()), ("haiku", ids["haiku"], greedy())],
        },
    )
    for key in PROMPTS:
        assert texts.get(key, "") == solo_greedy[key][0], key
        assert final[key].finish_reason == solo_greedy[key][1].finish_reason
        assert final[key].completion_tokens == solo_greedy[key][1].completion_tokens


def test_max_new_tokens_length(engine: TransformersEngine, solo_greedy) -> None:
    text, out = solo(engine, "sky", greedy(5))
    assert out.finish_reason == "length"
    assert out.completion_tokens == 5
    assert solo_greedy["sky"][0].startswith(text) and text


@pytest.mark.parametrize(
    "stop, expected",
    [
        ("of Fra", "The capital "),  # spans " of" + " France"
        (" Paris", "The capital of France is"),
        ("Parisian", "The capital of France is Paris."),  # held back as a prefix, then released
    ],
)
def test_stop_string(engine: TransformersEngine, stop: str, expected: str) -> None:
    ids = chat(engine, "france")
    chunks: list[str] = []
    engine.add("s", ids, greedy(24, stop=(stop, "never-matches")))
    final = None
    while engine.active:
        for out in engine.step():
            chunks.append(out.text)
            if out.finish_reason:
                final = out
    text = "".join(chunks)
    assert text == expected
    assert stop not in text
    assert final is not None and final.finish_reason == "stop"


def test_seed_reproducible(engine: TransformersEngine) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=1234)
    a, out_a = solo(engine, "haiku", params)
    b, out_b = solo(engine, "haiku", params)
    assert a == b and out_a.completion_tokens == out_b.completion_tokens
    # the same seed gives the same text inside a batch that it joins late (float32)
    texts, _ = drain(
        engine,
        {
            0: [("other", chat(engine, "sky"), greedy(12))],
            2: [("haiku", chat(engine, "haiku"), params)],
        },
    )
    assert texts["haiku"] == a


def test_cancel(engine: TransformersEngine, solo_greedy) -> None:
    engine.add("c", chat(engine, "sky"), greedy())
    text = ""
    for _ in range(4):
        for out in engine.step():
            assert out.finish_reason is None
            text += out.text
    assert engine.free_slots == 3
    engine.cancel("c")
    engine.cancel("unknown-id")  # no-op
    outs = engine.step()
    assert [o.finish_reason for o in outs] == ["canceled"]
    text += outs[0].text
    assert outs[0].completion_tokens == 5  # 2 from the admitting step, then one per step
    assert text and solo_greedy["sky"][0].startswith(text)
    assert engine.active == 0 and engine.free_slots == 4
    # a cancelled pending sequence finishes without running
    engine.add("p", chat(engine, "sky"), greedy())
    engine.cancel("p")
    outs = engine.step()
    assert [(o.seq_id, o.finish_reason, o.completion_tokens) for o in outs] == [("p", "canceled", 0)]
    assert engine.active == 0


def test_add_rejects(engine: TransformersEngine) -> None:
    ids = chat(engine, "france")
    for i in range(4):
        engine.add(f"r{i}", ids, greedy(2))
    with pytest.raises(ValueError):
        engine.add("r0", ids, greedy(2))
    with pytest.raises(ValueError):
        engine.add("r4", ids, greedy(2))
    for i in range(4):
        engine.cancel(f"r{i}")
    assert {o.finish_reason for o in engine.step()} == {"canceled"}
    assert engine.free_slots == 4


def test_oom_in_prefill_fails_only_new(engine: TransformersEngine, monkeypatch, solo_greedy) -> None:
    real_forward = engine._forward
    calls = {"n": 0}

    def flaky(input_ids, attention_mask, position_ids, cache, phase):
        if phase == "prefill" and input_ids.shape[0] == 1 and calls["n"] == 0 and engine.active == 2:
            calls["n"] += 1
            raise torch.OutOfMemoryError("injected")
        return real_forward(input_ids, attention_mask, position_ids, cache, phase)

    monkeypatch.setattr(engine, "_forward", flaky)
    texts, final = drain(
        engine,
        {0: [("france", chat(engine, "france"), greedy())], 3: [("victim", chat(engine, "haiku"), greedy())]},
    )
    assert calls["n"] == 1
    assert final["victim"].error and final["victim"].error.startswith("out_of_memory")
    assert final["victim"].finish_reason is None
    assert texts["france"] == solo_greedy["france"][0]
    assert final["france"].finish_reason == "stop"


def test_oom_in_decode_fails_newest(engine: TransformersEngine, monkeypatch, solo_greedy) -> None:
    # fail inside a decoder layer halfway through the model, so earlier layers already grew the cache
    layer = engine.model.model.layers[len(engine.model.model.layers) // 2]
    real_layer_forward = layer.forward
    state = {"armed": False, "fired": 0}

    def flaky_layer(hidden_states, *args, **kwargs):
        if state["armed"] and hidden_states.shape[1] == 1:
            state["armed"] = False
            state["fired"] += 1
            raise torch.OutOfMemoryError("injected")
        return real_layer_forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", flaky_layer)
    ids = {key: chat(engine, key) for key in PROMPTS}
    texts: dict[str, str] = {}
    final: dict[str, StepOutput] = {}
    engine.add("france", ids["france"], greedy())
    plan = {2: "sky", 4: "haiku"}
    for step in range(100):
        if step in plan:
            engine.add(plan[step], ids[plan[step]], greedy())
        if step == 5:
            state["armed"] = True  # haiku (newest) is in the batch now
        if not engine.active:
            break
        for out in engine.step():
            texts[out.seq_id] = texts.get(out.seq_id, "") + out.text
            if out.finish_reason or out.error:
                final[out.seq_id] = out
    assert state["fired"] == 1
    assert final["haiku"].error and final["haiku"].error.startswith("out_of_memory")
    assert final["haiku"].finish_reason is None
    for key in ("france", "sky"):
        assert texts[key] == solo_greedy[key][0], key
        assert final[key].finish_reason == solo_greedy[key][1].finish_reason
    assert engine.active == 0


def test_per_sequence_params(engine: TransformersEngine, solo_greedy) -> None:
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7)
    texts, final = drain(
        engine,
        {
            0: [("sampled", chat(engine, "haiku"), sampled), ("france", chat(engine, "france"), greedy())],
            1: [("sky", chat(engine, "sky"), greedy())],
        },
    )
    assert texts["france"] == solo_greedy["france"][0]
    assert texts["sky"] == solo_greedy["sky"][0]
    assert final["sampled"].finish_reason in ("stop", "length")
    assert 1 <= final["sampled"].completion_tokens <= 16


def test_degenerate_sampling_equals_greedy(engine: TransformersEngine, solo_greedy) -> None:
    """top_k=1, or a tiny top_p, leave one candidate: the sampled rows must equal greedy ones."""
    texts, _ = drain(
        engine,
        {
            0: [
                ("k1", chat(engine, "sky"), SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1)),
                ("p0", chat(engine, "haiku"), SamplingParams(max_new_tokens=16, temperature=1.5, top_p=1e-6)),
                ("mix", chat(engine, "france"),
                 SamplingParams(max_new_tokens=16, temperature=0.7, top_k=3, top_p=1e-6)),
            ]
        },
    )
    assert texts["k1"] == solo_greedy["sky"][0]
    assert texts["p0"] == solo_greedy["haiku"][0]
    assert texts["mix"] == solo_greedy["france"][0]


def test_repetition_penalty_matches_transformers(engine: TransformersEngine) -> None:
    ids = chat(engine, "haiku")
    text, _ = solo(engine, "haiku", greedy(16, repetition_penalty=1.5))
    with torch.inference_mode():
        ref = engine.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
        )
    expected = engine.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert text == expected


def test_incremental_detokenization_utf8(engine: TransformersEngine) -> None:
    """Multi-byte characters split over byte-level tokens are never emitted half-done."""
    text = "Prix: 10€ 😀 日本語 ok"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    seq = _Seq("u", [1], greedy(len(ids) + 1), order=0, generator=torch.Generator(),
               text=IncrementalText(engine._decode_ids))
    chunks = []
    for tok in ids:
        outs = _StepOutputs()
        engine._accept(seq, tok, outs)
        chunks += [o.text for o in outs.result()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == engine.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_draw_matches_distribution() -> None:
    """The inverse-CDF draw samples softmax(scores), never picks a -inf entry, and is reproducible per seed."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    scores = probs.log().expand(4000, -1).contiguous()  # zeros -> -inf
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([draw(scores, [g] * 4000) for _ in range(5)])
    freq = torch.bincount(picks, minlength=5).double() / picks.numel()
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs.double(), atol=0.015)
    again = draw(scores[:3], [torch.Generator().manual_seed(7) for _ in range(3)])
    assert again.tolist() == draw(scores[:1], [torch.Generator().manual_seed(7)]).tolist() * 3


# ---- vLLM's sampling extensions and logprobs ------------------------------------------------------------------


def run_collecting(engine: TransformersEngine, ids: list[int], params: SamplingParams, batch_with: int = 0):
    """One sequence (alongside `batch_with` greedy others): its text, its outputs' logprobs, its prompt logprobs
    and its final output."""
    schedule = [("x", ids, params)] + [(f"o{i}", chat(engine, "sky"), greedy(8)) for i in range(batch_with)]
    for seq_id, prompt, p in schedule:
        engine.add(seq_id, prompt, p)
    text, logprobs, prompt_logprobs, final = "", [], None, None
    while engine.active:
        for out in engine.step():
            if out.seq_id != "x":
                continue
            text += out.text
            logprobs += out.logprobs or []
            if out.prompt_logprobs is not None:
                assert prompt_logprobs is None, "prompt logprobs come once"
                prompt_logprobs = out.prompt_logprobs
            if out.finish_reason:
                final = out
    return text, logprobs, prompt_logprobs, final


@pytest.mark.parametrize("batch_with", [0, 2])
def test_logprobs_agree_with_the_model(engine: TransformersEngine, batch_with: int) -> None:
    """Each generated token's logprob (and its top alternatives) is log_softmax of the model's own logits at that
    position, the raw distribution vLLM reports by default; the prompt's likewise, the first token's none."""
    ids = chat(engine, "france")
    text, logprobs, prompt_logprobs, final = run_collecting(
        engine, ids, greedy(12, logprobs=3, prompt_logprobs=2), batch_with)
    assert text == "The capital of France is Paris."
    assert len(logprobs) == final.completion_tokens  # the ending EOS too
    with torch.inference_mode():
        full = torch.tensor([ids + [e["id"] for e in logprobs]])
        reference = engine.model(full).logits[0].float().log_softmax(-1)
    for j, entry in enumerate(logprobs):
        row = reference[len(ids) - 1 + j]
        assert entry["logprob"] == pytest.approx(row[entry["id"]].item(), abs=1e-4)
        assert entry["logprob"] <= 0
        top_lp, top_ids = row.topk(3)
        assert [t["id"] for t in entry["top"]] == top_ids.tolist()
        assert [t["logprob"] for t in entry["top"]] == pytest.approx(top_lp.tolist(), abs=1e-4)
        assert entry["top"][0]["id"] == entry["id"]  # greedy: the chosen token is the most likely
        assert entry["token"] == engine.tokenizer.decode([entry["id"]])
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    for j in range(1, len(ids)):
        entry = prompt_logprobs[j]
        assert entry["id"] == ids[j] and len(entry["top"]) == 2
        assert entry["logprob"] == pytest.approx(reference[j - 1, ids[j]].item(), abs=1e-4)


def test_sampled_logprobs_are_of_the_raw_distribution(engine: TransformersEngine) -> None:
    """Temperature and top-k change the draw, not the logprobs reported (vLLM's raw_logprobs)."""
    ids = chat(engine, "haiku")
    _, sampled, _, _ = run_collecting(engine, ids, SamplingParams(
        max_new_tokens=6, temperature=1.5, top_k=5, seed=3, logprobs=5))
    with torch.inference_mode():
        reference = engine.model(torch.tensor([ids + [e["id"] for e in sampled]])).logits[0].float().log_softmax(-1)
    for j, entry in enumerate(sampled):
        assert entry["logprob"] == pytest.approx(reference[len(ids) - 1 + j, entry["id"]].item(), abs=1e-4)
        assert entry["id"] in [t["id"] for t in entry["top"]]  # top_k=5 draws among the 5 best


def test_ignore_eos_runs_to_max_new_tokens(engine: TransformersEngine) -> None:
    text, _, _, final = run_collecting(engine, chat(engine, "france"), greedy(40, ignore_eos=True))
    assert final.completion_tokens == 40 and final.finish_reason == "length"
    assert text.startswith("The capital of France is Paris.") and "<|im_end|>" not in text


def test_min_tokens_holds_eos_back(engine: TransformersEngine) -> None:
    ids = chat(engine, "france")
    _, plain, _, first = run_collecting(engine, ids, greedy(40, logprobs=0))
    assert first.completion_tokens == 8 and plain[-1]["id"] in engine.eos_token_ids  # alone: EOS after 8
    _, held, _, final = run_collecting(engine, ids, greedy(40, min_tokens=12, logprobs=0))
    assert final.completion_tokens > 12
    assert not any(e["id"] in engine.eos_token_ids for e in held[:12])


def test_stop_token_ids_end_generation(engine: TransformersEngine) -> None:
    paris = engine.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    ids = chat(engine, "france")
    text, _, _, final = run_collecting(engine, ids, greedy(40, stop_token_ids=(paris,)))
    assert (text, final.finish_reason, final.completion_tokens) == ("The capital of France is", "stop", 6)
    kept, _, _, _ = run_collecting(engine, ids, greedy(40, stop_token_ids=(paris,), include_stop_str_in_output=True))
    assert kept == "The capital of France is Paris"
    # not before min_tokens: the stop token is masked out until then
    later, _, _, held = run_collecting(engine, ids, greedy(40, stop_token_ids=(paris,), min_tokens=6))
    assert held.completion_tokens > 6 and not later.startswith("The capital of France is Paris")


def test_include_stop_str_and_skip_special_tokens(engine: TransformersEngine) -> None:
    ids = chat(engine, "france")
    text, _, _, final = run_collecting(engine, ids, greedy(40, stop=("Paris",), include_stop_str_in_output=True))
    assert (text, final.finish_reason) == ("The capital of France is Paris", "stop")
    special, _, _, _ = run_collecting(engine, ids, greedy(40, ignore_eos=True, skip_special_tokens=False))
    assert special.startswith("The capital of France is Paris.<|im_end|>")
    eos_kept, _, _, _ = run_collecting(engine, ids, greedy(40, skip_special_tokens=False,
                                                           include_stop_str_in_output=True))
    assert eos_kept == "The capital of France is Paris.<|im_end|>"


def test_min_p_keeps_only_the_likely_tokens(engine: TransformersEngine) -> None:
    """min_p 1: only the most likely token survives, so sampling is greedy whatever the seed."""
    ids = chat(engine, "haiku")
    greedy_text, _, _, _ = run_collecting(engine, ids, greedy(12))
    for seed in (1, 2):
        text, _, _, _ = run_collecting(engine, ids, SamplingParams(max_new_tokens=12, temperature=1.5, min_p=1.0,
                                                                   seed=seed))
        assert text == greedy_text


def test_add_rejects_the_extensions_out_of_range(engine: TransformersEngine) -> None:
    ids = chat(engine, "france")
    for bad in ({"min_p": 1.5}, {"min_tokens": 20}, {"stop_token_ids": (10**7,)}, {"logprobs": 21}):
        with pytest.raises(ValueError):
            engine.add("bad", ids, greedy(16, **bad))
    assert engine.active == 0


# ---- structured outputs, logit_bias, presence / frequency penalties ------------------------------------------

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def ask(engine: TransformersEngine, prompt: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": prompt}])


def constrained(kind: str, spec: str | tuple[str, ...] = "", n: int = 48, **kw) -> SamplingParams:
    return greedy(n, structured_outputs=StructuredOutputs(kind, spec), **kw)


def test_json_schema_output(engine: TransformersEngine) -> None:
    text, _, _, final = run_collecting(engine, ask(engine, "What is the capital of France? Answer in JSON."),
                                       constrained("json", json.dumps(CITY_SCHEMA)))
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"city", "country"}
    assert all(isinstance(v, str) for v in value.values())
    assert final.finish_reason == "stop"
    assert "<|im_end|>" not in text


def test_json_object_choice_and_regex(engine: TransformersEngine) -> None:
    text, _, _, final = run_collecting(engine, ask(engine, "What is the capital of France? Answer in JSON."),
                                       constrained("json_object"))
    assert isinstance(json.loads(text), dict) and final.finish_reason == "stop"
    text, _, _, final = run_collecting(engine, ask(engine, "Is Paris in France? Answer yes or no."),
                                       constrained("choice", ("yes", "no")))
    assert text in ("yes", "no") and final.finish_reason == "stop"
    text, _, _, final = run_collecting(engine, ask(engine, "Give me a phone number."),
                                       constrained("regex", "[0-9]{3}-[0-9]{4}"))
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", text) and final.finish_reason == "stop"
    text, _, _, final = run_collecting(engine, ask(engine, "Say hi."), constrained("grammar", 'root ::= "hi" | "ho"'))
    assert text in ("hi", "ho") and final.finish_reason == "stop"


def test_grammar_wins_over_min_tokens_and_ignore_eos(engine: TransformersEngine) -> None:
    """A complete grammar allows only a stop token: the sequence ends there, whatever min_tokens or ignore_eos say
    (vLLM lets the grammar's stop token through min_tokens too)."""
    ids = ask(engine, "Is Paris in France? Answer yes or no.")
    for extra in ({"min_tokens": 10}, {"ignore_eos": True}):
        params = constrained("choice", ("yes", "no"), logprobs=0, **extra)
        text, logprobs, _, final = run_collecting(engine, ids, params)
        assert text in ("yes", "no") and final.finish_reason == "stop", extra
        assert logprobs[-1]["id"] in engine.eos_token_ids


def test_uncompilable_constraints_fail_in_add(engine: TransformersEngine, solo_greedy) -> None:
    ids = chat(engine, "france")
    for kind, spec in [("grammar", 'root ::= "a" | '), ("grammar", "root ::= undefined_rule"),
                       ("json", '{"type": "no-such-type"}'), ("json", "not json"), ("regex", "[0-9"),
                       ("choice", ())]:
        with pytest.raises(ValueError, match="structured_outputs"):
            engine.add("bad", ids, constrained(kind, spec))
        assert engine.active == 0, (kind, spec)
    assert solo(engine, "france", greedy())[0] == solo_greedy["france"][0]


def test_constrained_row_leaves_its_batch_alone(engine: TransformersEngine, solo_greedy) -> None:
    """A grammar-masked row next to unconstrained ones: theirs are the same as alone (float32), and it is the same
    as alone too."""
    json_ids = ask(engine, "What is the capital of France? Answer in JSON.")
    json_params = constrained("json", json.dumps(CITY_SCHEMA))
    alone, _, _, _ = run_collecting(engine, json_ids, json_params)
    texts, final = drain(
        engine,
        {
            0: [("france", chat(engine, "france"), greedy()), ("json", json_ids, json_params)],
            2: [("sky", chat(engine, "sky"), greedy())],
        },
    )
    assert texts["france"] == solo_greedy["france"][0]
    assert texts["sky"] == solo_greedy["sky"][0]
    assert texts["json"] == alone and final["json"].finish_reason == "stop"


def test_logit_bias(engine: TransformersEngine, solo_greedy) -> None:
    ids = chat(engine, "france")
    forced = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    text, logprobs, _, _ = run_collecting(engine, ids, greedy(6, logit_bias=((forced, 100.0),), logprobs=0))
    assert [e["id"] for e in logprobs] == [forced] * 6
    assert text == engine.tokenizer.decode([forced] * 6)
    assert logprobs[0]["logprob"] < -1.0  # logprobs stay those of the raw distribution (vLLM)
    _, plain, _, _ = run_collecting(engine, ids, greedy(6, logprobs=0))
    first = plain[0]["id"]
    _, biased, _, _ = run_collecting(engine, ids, greedy(6, logit_bias=((first, -100.0),), logprobs=0))
    assert biased[0]["id"] != first


def test_frequency_penalty_cuts_repeats(engine: TransformersEngine) -> None:
    ids = ask(engine, "Write the word hello 20 times, separated by spaces.")

    def most_common(**kw) -> int:
        _, logprobs, _, _ = run_collecting(engine, ids, greedy(40, logprobs=0, **kw))
        return Counter(e["id"] for e in logprobs).most_common(1)[0][1]

    plain = most_common()
    assert plain >= 10
    assert most_common(frequency_penalty=2.0) < plain
    assert most_common(presence_penalty=2.0) < plain


def test_zero_penalties_change_nothing(engine: TransformersEngine, solo_greedy) -> None:
    params = greedy(presence_penalty=0.0, frequency_penalty=0.0, logit_bias=())
    for key in PROMPTS:
        text, out = solo(engine, key, params)
        assert text == solo_greedy[key][0] and out.completion_tokens == solo_greedy[key][1].completion_tokens


def test_count_penalties_match_their_definition(engine: TransformersEngine) -> None:
    """Greedy with OpenAI's penalties, recomputed from the model's logits one token at a time:
    logit[t] -= presence * (count[t] > 0) + frequency * count[t], counting the output only (not the prompt)."""
    ids = chat(engine, "haiku")
    presence, frequency = 0.7, 1.3
    _, got, _, _ = run_collecting(engine, ids, greedy(12, presence_penalty=presence, frequency_penalty=frequency,
                                                      logprobs=0, ignore_eos=True))
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(12):
            logits = engine.model(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            out.append(int(logits.argmax()))
    assert [e["id"] for e in got] == out


def test_penalized_row_joins_and_leaves_a_batch(engine: TransformersEngine, solo_greedy) -> None:
    """The output counts follow the rows through admission, merging and dropping: a penalized sequence joining a
    running batch late, then joined by another, gives the same text as alone (and so do the others); the batch
    keeps counts only while a penalized row runs."""
    params = greedy(16, frequency_penalty=1.0, presence_penalty=0.5, ignore_eos=True)
    alone, _, _, _ = run_collecting(engine, chat(engine, "haiku"), params)
    plan = {0: ("france", greedy()), 2: ("pen", params), 4: ("sky", greedy())}
    texts: dict[str, str] = {}
    states = set()  # (rows running, whether the batch keeps counts) after each step
    for step in range(100):
        if step in plan:
            seq_id, p = plan[step]
            engine.add(seq_id, chat(engine, "haiku" if seq_id == "pen" else seq_id), p)
        if not engine.active and step > max(plan):
            break
        for out in engine.step():
            texts[out.seq_id] = texts.get(out.seq_id, "") + out.text
        states.add((tuple(s.seq_id for s in engine._running), engine._counts is not None))
    assert all(counts == ("pen" in rows) for rows, counts in states), states
    assert (("france",), False) in states and (("sky",), False) in states  # before it came, after it went
    assert (("france", "pen", "sky"), True) in states  # a row without counts merged into a batch with them
    assert texts["pen"] == alone
    assert texts["france"] == solo_greedy["france"][0] and texts["sky"] == solo_greedy["sky"][0]
