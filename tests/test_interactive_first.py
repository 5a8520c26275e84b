"""Interactive first, inside the engine, through the whole stack (the session stack: ENGINE=transformers, the small
model, MAX_BATCH 2; tests/test_vllm_stack.py runs the same test with ENGINE=vllm): with batch jobs in every slot, an
interactive job is claimed at once and decoded ahead of them, and the batch jobs, preempted and resumed, give the text
they give alone (greedy, float32)."""

from __future__ import annotations

from helpers import wait_for_job_status, worker_metric

BATCH_PROMPTS = ["Write a long story about a lighthouse keeper.", "Describe the history of bread in detail.",
                 "Explain how rivers shape valleys.", "List facts about the moon, one per line."]
BATCH_TOKENS = 48


def preemptions(stack, priority: str) -> float:
    """llamaq_worker_preemptions_total{priority} over every worker, each read from its own METRICS_PORT."""
    return worker_metric(stack, "llamaq_worker_preemptions_total", priority=priority)


def test_an_interactive_job_overtakes_a_full_batch_whose_text_stays_the_same(stack, client) -> None:
    prompts = BATCH_PROMPTS[:int(stack.env["MAX_BATCH"])]
    body = [{"prompt": p, "max_new_tokens": BATCH_TOKENS, "temperature": 0, "ignore_eos": True} for p in prompts]
    alone = []
    for one in body:
        answer = client.post("/v1/generate", json={**one, "wait_s": 240}).json()
        assert answer["status"] == "succeeded", answer
        alone.append(answer["output"]["text"])

    batch = [client.post("/v1/jobs", json={**one, "priority": "batch"}).json() for one in body]
    for job in batch:  # every MAX_BATCH slot held by batch work
        wait_for_job_status(client, job["id"], "running", 120)
    before = preemptions(stack, "batch")
    interactive = client.post("/v1/generate", json={"prompt": "Say hi.", "max_new_tokens": 4, "temperature": 0,
                                                    "wait_s": 240}).json()
    done = [wait_for_job_status(client, job["id"], "succeeded", 240) for job in batch]

    assert interactive["status"] == "succeeded", interactive
    for job, text in zip(done, alone):
        assert job["output"]["usage"]["completion_tokens"] == BATCH_TOKENS, job
        assert job["output"]["text"] == text  # preempted or not, the same greedy text
    # Claimed at once and decoded ahead: it ended while every batch job still ran.
    assert interactive["finished_at"] < min(job["finished_at"] for job in done), (interactive, done)
    if stack.env.get("ENGINE", "transformers") == "transformers":
        # MAX_BATCH sequences decode at once: the interactive one took a batch sequence's place.
        assert preemptions(stack, "batch") > before
