from prometheus_client.parser import text_string_to_metric_families

from llamaq_gateway.metrics import ClusterState, render


def parse(text: bytes) -> dict:
    families = {}
    for family in text_string_to_metric_families(text.decode()):
        assert family.name not in families, f"{family.name} appears twice: an invalid exposition"
        families[family.name] = family
    return families


def test_the_queue_as_redis_holds_it_and_no_worker_series():
    state = ClusterState(
        queue_depths={"llamaq": 3, "llamaq:batch": 40}, jobs_running=2, finished={"succeeded": 5, "failed": 1},
        workers_alive=2, usage={"team-a": {"requests": 4, "prompt_tokens": 30, "completion_tokens": 12}},
    )
    families = parse(render(state))
    assert [(s.labels, s.value) for s in families["llamaq_queue_depth"].samples] == [
        ({"queue": "llamaq"}, 3), ({"queue": "llamaq:batch"}, 40)]
    finished = {s.labels["status"]: s.value for s in families["llamaq_jobs_finished"].samples}
    assert finished == {"succeeded": 5, "failed": 1, "canceled": 0}
    assert families["llamaq_workers_alive"].samples[0].value == 2
    assert families["llamaq_jobs_running"].samples[0].value == 2
    assert [(s.labels, s.value) for s in families["llamaq_key_completion_tokens"].samples] == [({"key": "team-a"}, 12)]
    # The workers' series are on their own METRICS_PORT only (Prometheus scrapes each worker): none here, and no
    # sample carries a `worker` label.
    for worker_series in ("llamaq_generated_tokens", "llamaq_job_queue_wait_seconds", "llamaq_batch_size",
                          "llamaq_worker_preemptions", "llamaq_gpu_memory_used_bytes"):
        assert worker_series not in families
    assert not [s for family in families.values() for s in family.samples if "worker" in s.labels]
