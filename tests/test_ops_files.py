"""Static checks of the operations files: compose's `ops` profile (rq-dashboard, Prometheus, Grafana), the
multi-GPU override, the Prometheus scrape configs and the Grafana dashboard.

Offline, as tests/test_deploy_files.py: the real Compose v2 binary validates the files together, promtool (from
Debian's prometheus package) checks the scrape configs and parses every dashboard query as PromQL; hadolint lints
the rq-dashboard image with the other Dockerfiles (tests/test_deploy_files.py). A missing tool fails (never
skips): run `make tools`.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from deploy_tools import COMPOSE_FILE, ROOT, RQ_DASHBOARD_DOCKERFILE, compose, compose_config, find_tool

MULTI_GPU = ROOT / "deploy" / "compose" / "multi-gpu.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llamaq.json"
CORE = {"nginx", "gateway", "redis", "model-download", "worker"}
OPS = {"rq-dashboard", "prometheus", "grafana"}
# What the gateway's /metrics exposes: the queue as Redis holds it (the same on every gateway replica), and its own
# HTTP series (each replica's own); and what each worker's own METRICS_PORT exposes, the one place its series are
# (histograms also as _bucket, _sum, _count).
QUEUE_METRICS = {"llamaq_queue_depth", "llamaq_jobs_running", "llamaq_workers_alive", "llamaq_jobs_finished_total"}
HTTP_METRICS = {"llamaq_http_requests_total", "llamaq_http_request_duration_seconds"}
WORKER_METRICS = {
    "llamaq_job_queue_wait_seconds", "llamaq_job_run_seconds", "llamaq_time_to_first_token_seconds",
    "llamaq_generated_tokens_total", "llamaq_prompt_tokens_total", "llamaq_batch_size",
    "llamaq_gpu_memory_used_bytes", "llamaq_gpu_memory_reserved_bytes",
}
METRICS = QUEUE_METRICS | HTTP_METRICS | WORKER_METRICS
HISTOGRAMS = {"llamaq_job_queue_wait_seconds", "llamaq_job_run_seconds", "llamaq_time_to_first_token_seconds",
              "llamaq_batch_size", "llamaq_http_request_duration_seconds"}


@pytest.fixture(scope="module")
def ops_config() -> dict:
    return compose_config("--profile", "ops")


@pytest.fixture(scope="module")
def multi_gpu_config() -> dict:
    return compose_config("--profile", "*", files=(COMPOSE_FILE, MULTI_GPU))


def _promtool() -> str:
    return find_tool("promtool", ROOT / ".tools" / "promtool", "promtool (.tools/promtool)")


# --- compose: the ops profile ---------------------------------------------------------------------


def test_ops_profile_validates() -> None:
    result = compose("--profile", "ops", "config", "-q")
    assert result.returncode == 0, result.stderr


def test_ops_services_only_with_the_profile(ops_config: dict) -> None:
    assert set(compose_config()["services"]) == CORE  # plain `docker compose up` starts no dashboard
    assert set(ops_config["services"]) == CORE | OPS


def test_ops_services(ops_config: dict) -> None:
    services = ops_config["services"]
    for name in OPS:
        svc = services[name]
        assert svc["profiles"] == ["ops"], name
        assert svc.get("healthcheck", {}).get("test") and not svc["healthcheck"].get("disable"), name
        assert svc["restart"] == "unless-stopped", name
        assert svc["depends_on"], name
        for dep in svc["depends_on"].values():
            assert dep["condition"] in ("service_healthy", "service_completed_successfully"), name
        # Published on the host's loopback only.
        assert svc["ports"] and all(p["host_ip"] == "127.0.0.1" for p in svc["ports"]), name
    published = {(p["target"], str(p["published"])) for name in OPS for p in services[name]["ports"]}
    assert published == {(9181, "9181"), (9090, "9090"), (3000, "3000")}
    # Still only nginx among the core services is published.
    assert [n for n in CORE if services[n].get("ports")] == ["nginx"]


def test_rq_dashboard_reads_the_queue_redis(ops_config: dict) -> None:
    services = ops_config["services"]
    dashboard = services["rq-dashboard"]
    command = dashboard["command"]
    assert command[command.index("--redis-url") + 1] == services["gateway"]["environment"]["REDIS_URL"]
    redis_command = services["redis"]["command"]
    password = redis_command[redis_command.index("--requirepass") + 1]
    assert password and urlparse(command[command.index("--redis-url") + 1]).password == password
    assert "--json" in command  # llamaq queues with RQ's JSON serializer
    assert "--disable-delete" in command
    assert dashboard["build"]["dockerfile"] == RQ_DASHBOARD_DOCKERFILE.name
    assert Path(dashboard["build"]["context"]) == RQ_DASHBOARD_DOCKERFILE.parent
    assert dashboard["depends_on"]["redis"]["condition"] == "service_healthy"


def test_rq_dashboard_image() -> None:
    text = RQ_DASHBOARD_DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"rq-dashboard==[\d.]+", text)
    assert re.search(r'"rq>=2[^"]*,<3"', text)  # the worker's RQ major version
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # hadolint lints it with the other Dockerfiles: tests/test_deploy_files.py::test_hadolint.


def test_worker_serves_metrics_on_a_fixed_port(ops_config: dict) -> None:
    worker = ops_config["services"]["worker"]
    assert worker["environment"]["METRICS_PORT"] == "9100"
    assert "ports" not in worker  # scraped on the compose network only


# --- Prometheus -----------------------------------------------------------------------------------


def _targets(config_file: Path) -> dict[str, list[str]]:
    config = yaml.safe_load(config_file.read_text())
    jobs = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        jobs[job["job_name"]] = [t for sc in job["static_configs"] for t in sc["targets"]]
    return jobs


def _mounted_prometheus_config(config: dict) -> Path:
    volume = next(v for v in config["services"]["prometheus"]["volumes"]
                  if v["target"] == "/etc/prometheus/prometheus.yml")
    assert volume["type"] == "bind" and volume.get("read_only")
    return Path(volume["source"])


def _worker_services(config: dict) -> list[str]:
    return sorted(n for n, s in config["services"].items() if s.get("command") == ["python", "-m", "llamaq_worker"])


def _assert_targets_are_services(config: dict) -> None:
    services = config["services"]
    targets = _targets(_mounted_prometheus_config(config))
    assert targets["llamaq-gateway"] == [f"gateway:{services['gateway']['environment']['GATEWAY_PORT']}"]
    expected = [f"{name}:{services[name]['environment']['METRICS_PORT']}" for name in _worker_services(config)]
    assert sorted(targets["llamaq-worker"]) == sorted(expected)


def test_prometheus_scrapes_the_compose_services(ops_config: dict) -> None:
    assert _mounted_prometheus_config(ops_config) == PROMETHEUS / "prometheus.yml"
    _assert_targets_are_services(ops_config)
    prometheus = ops_config["services"]["prometheus"]
    assert prometheus["depends_on"]["gateway"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.multi-gpu.yml"])
def test_promtool_check_config(name: str) -> None:
    result = subprocess.run([_promtool(), "check", "config", str(PROMETHEUS / name)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose: one worker per GPU ------------------------------------------------------------------


def test_multi_gpu_override_validates() -> None:
    for profile in ("*", ""):
        args = ("--profile", profile) if profile else ()
        result = compose(*args, "config", "-q", files=(COMPOSE_FILE, MULTI_GPU))
        assert result.returncode == 0, result.stderr


def test_multi_gpu_one_worker_per_gpu(multi_gpu_config: dict) -> None:
    services = multi_gpu_config["services"]
    workers = _worker_services(multi_gpu_config)
    assert workers == ["worker", "worker-gpu1"]
    seen: list[str] = []
    for name in workers:
        worker = services[name]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: {devices}"
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device and len(device["device_ids"]) == 1
        seen += device["device_ids"]
        # The rest is the base worker's.
        assert worker["environment"] == services["worker"]["environment"]
        assert worker["depends_on"]["model-download"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["healthcheck"] == services["worker"]["healthcheck"]
        assert worker["stop_grace_period"] == services["worker"]["stop_grace_period"]
        # vLLM's shared memory, and one GPU per tensor-parallel rank (1 by default).
        assert worker["shm_size"] == services["worker"]["shm_size"]
        assert len(device["device_ids"]) == int(worker["environment"]["TENSOR_PARALLEL_SIZE"])
        assert any(v["source"] == "models" and v["target"] == "/models" for v in worker["volumes"])
        assert worker["image"] == services["worker"]["image"]
    assert seen == ["0", "1"]
    # Prometheus, with the ops profile, scrapes every one of them.
    assert _mounted_prometheus_config(multi_gpu_config) == PROMETHEUS / "prometheus.multi-gpu.yml"
    _assert_targets_are_services(multi_gpu_config)


# --- Grafana --------------------------------------------------------------------------------------


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    return exprs


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bllamaq_[a-z0-9_]+", expr))


def _base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def test_grafana_provisioning(ops_config: dict) -> None:
    grafana = ops_config["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    prometheus_port = next(p["target"] for p in ops_config["services"]["prometheus"]["ports"])
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prometheus_port}"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llamaq.yml").read_text())["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["uid"]}


def test_dashboard_uses_only_real_metrics() -> None:
    used = set()
    for expr in _dashboard_exprs():
        names = _metric_names(expr)
        assert names, expr
        used |= {_base_name(n) for n in names}
    assert used <= METRICS, used - METRICS
    # What an operator looks at first.
    assert {
        "llamaq_queue_depth", "llamaq_jobs_finished_total", "llamaq_job_queue_wait_seconds", "llamaq_job_run_seconds",
        "llamaq_time_to_first_token_seconds", "llamaq_generated_tokens_total", "llamaq_batch_size",
        "llamaq_workers_alive", "llamaq_gpu_memory_used_bytes",
    } <= used


def test_dashboard_counts_each_series_once() -> None:
    """Each worker is its own scrape target and the only one with its series: summed as they are, with no `worker`
    label to de-duplicate by (per worker: by `instance`). The queue's series are the same on every gateway replica
    scraped: each query takes one (`max`)."""
    for expr in _dashboard_exprs():
        names = {_base_name(n) for n in _metric_names(expr)}
        assert not re.search(r"\bworker\b", expr), expr
        if names & WORKER_METRICS:
            assert names <= WORKER_METRICS and "max" not in expr, expr
        if names & QUEUE_METRICS:
            assert names <= QUEUE_METRICS and expr.startswith("max"), expr
        if names & HTTP_METRICS:
            assert names <= HTTP_METRICS and "max" not in expr, expr


def test_dashboard_latency_quantiles() -> None:
    exprs = _dashboard_exprs()
    for histogram in ("llamaq_job_queue_wait_seconds", "llamaq_job_run_seconds", "llamaq_time_to_first_token_seconds"):
        for q in ("0.5", "0.95"):
            assert any(f"histogram_quantile({q}," in e and f"{histogram}_bucket" in e for e in exprs), (histogram, q)


def test_dashboard_queries_are_promql(tmp_path: Path) -> None:
    """promtool parses every query (as a recording rule; Grafana's $__rate_interval given a value)."""
    rules = {"groups": [{"name": "llamaq-dashboard", "rules": [
        {"record": f"llamaq_dashboard_check_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(_dashboard_exprs())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
