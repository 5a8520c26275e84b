from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llamaq_gateway.metrics import ClusterState, render


def worker_exposition(tokens: int, waits: list[float]) -> str:
    registry = CollectorRegistry()
    Counter("llamaq_generated_tokens", "Completion tokens generated", registry=registry).inc(tokens)
    wait = Histogram("llamaq_job_queue_wait_seconds", "wait", buckets=(0.1, 1), registry=registry)
    for seconds in waits:
        wait.observe(seconds)
    return generate_latest(registry).decode()


def parse(text: bytes) -> dict:
    families = {}
    for family in text_string_to_metric_families(text.decode()):
        assert family.name not in families, f"{family.name} appears twice: an invalid exposition"
        families[family.name] = family
    return families


def test_workers_are_merged_into_one_family_each_labelled_by_worker():
    state = ClusterState(
        queue_depths={"llamaq": 3, "llamaq:batch": 40}, jobs_running=2, finished={"succeeded": 5, "failed": 1},
        workers_alive=2,
        worker_metrics={"a:1": worker_exposition(7, [0.05]), "b:2": worker_exposition(4, [0.5, 2.0])},
    )
    families = parse(render(state))
    tokens = {s.labels["worker"]: s.value for s in families["llamaq_generated_tokens"].samples}
    assert tokens == {"a:1": 7, "b:2": 4}
    counts = {s.labels["worker"]: s.value for s in families["llamaq_job_queue_wait_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"a:1": 1, "b:2": 2}
    assert [(s.labels, s.value) for s in families["llamaq_queue_depth"].samples] == [
        ({"queue": "llamaq"}, 3), ({"queue": "llamaq:batch"}, 40)]
    finished = {s.labels["status"]: s.value for s in families["llamaq_jobs_finished"].samples}
    assert finished == {"succeeded": 5, "failed": 1, "canceled": 0}
    assert families["llamaq_workers_alive"].samples[0].value == 2
    assert families["llamaq_jobs_running"].samples[0].value == 2
