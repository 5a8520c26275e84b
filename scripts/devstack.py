"""The whole llamaq stack as local processes: its own redis-server, the worker, gunicorn with the gateway,
and nginx with the project's real config (upstream pointed at loopback).

`make dev` runs `python scripts/devstack.py` in the foreground (Ctrl-C stops everything). It survives what compose
survives: its Redis keeps an append-only file under `.cache/devstack/` (`--data-dir` to put it elsewhere), so a Redis
restart, or the next `make dev`, loses no job; and any service whose main process dies (redis-server, the worker,
the gunicorn master, the nginx master) is started again, as compose's `restart: unless-stopped` does, after what is
left of its process group (a gunicorn master's uvicorn workers, nginx's workers) is killed, so no orphan stays
behind. The integration tests start the same `Stack` (each with a Redis in its own temp dir). It honours the
compose variables (HTTP_PORT, MODEL_PATH, DEVICE, DTYPE, MAX_BATCH, QUEUE_NAME, API_KEYS, TRUSTED_PROXIES for nginx,
...); REDIS_URL is always its own Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nginx_local import find_nginx, free_port, run_nginx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("devstack")

# Where `make dev` keeps its Redis data (git-ignored), so a restart loses nothing.
DEFAULT_DATA_DIR = ROOT / ".cache" / "devstack"
# The services the launcher keeps running, in the order they start.
SERVICES = ("redis", "worker", "gateway", "nginx")
# A service restarted again within this long of its last start waits twice as long as before (up to the cap), as
# compose backs off a container that keeps dying.
RESTART_STABLE_S = 10.0
RESTART_MAX_DELAY_S = 30.0


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{name} did not listen on {port} within {timeout_s} s")


class Stack:
    """Starts and stops the processes; `env` is the environment every service sees."""

    def __init__(
        self, env: dict[str, str], http_port: int, workdir: Path, log_to_files: bool = True, redis_aof: bool = False,
        redis_dir: Path | None = None,
    ):
        self.env = env
        self.http_port = http_port
        self.workdir = workdir
        # Append-only file on, as compose runs Redis: its data survives a restart (the Redis restart tests).
        self.redis_aof = redis_aof
        # Where Redis keeps its files: workdir unless given (`make dev`: a fixed dir, kept across runs).
        self.redis_dir = redis_dir or workdir
        # Tests keep one log file per service; `make dev` shows everything in its terminal.
        self.log_dir = workdir if log_to_files else None
        self.redis_port = free_port()
        self.gateway_port = free_port()
        self.env.update(
            REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            GATEWAY_PORT=str(self.gateway_port),
            GATEWAY_HOST="127.0.0.1",
        )
        # The Batch API's files beside Redis's data, which holds their records (`make dev`: kept across runs).
        self.env.setdefault("FILES_DIR", str(self.redis_dir / "files"))
        # The worker's own Prometheus port: METRICS_PORT if given, else a free one (several stacks may run).
        self.env.setdefault("METRICS_PORT", str(free_port()))
        self.worker_metrics_port = int(self.env["METRICS_PORT"])
        self.procs: dict[str, subprocess.Popen] = {}
        self._contexts = contextlib.ExitStack()
        self.nginx = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def worker_metrics_urls(self) -> list[str]:
        """Each worker's own GET /metrics (METRICS_PORT), one target each as Prometheus scrapes them: the worker
        series are there only, not in the gateway's /metrics. This stack runs one worker."""
        return [f"http://127.0.0.1:{self.worker_metrics_port}/metrics"]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else None  # noqa: SIM115
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT if log else None, cwd=ROOT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_redis(self) -> None:
        proc = self._spawn("redis", [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
            "--appendonly", "yes" if self.redis_aof else "no", "--dir", str(self.redis_dir),
        ])
        wait_for_port(self.redis_port, proc, 10, "redis-server")

    def start_worker(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`env`: variables for this worker only (over the stack's)."""
        return self._spawn("worker", [sys.executable, "-m", "llamaq_worker"], env)

    def start_gateway(self) -> None:
        proc = self._spawn("gateway", [
            sys.executable, "-m", "gunicorn", "-c", "python:llamaq_gateway.gunicorn_conf",
            "llamaq_gateway.app:create_app()",
        ])
        wait_for_port(self.gateway_port, proc, 30, "gateway")

    def start_nginx(self) -> None:
        # nginx's output: self.nginx.access_log (JSON lines) and error_log, under workdir/nginx.
        edge = self._contexts.enter_context(run_nginx(
            self.workdir / "nginx", self.http_port, self.gateway_port,
            trusted_proxies=self.env.get("TRUSTED_PROXIES", ""),
        ))
        self.procs["nginx"] = edge.process
        self.nginx = edge

    def start(self, wait_ready_s: float = 180) -> None:
        self.start_redis()
        self.start_worker()
        self.start_gateway()
        self.start_nginx()
        if wait_ready_s:
            self.wait_ready(wait_ready_s)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            worker = self.procs.get("worker")
            if worker is not None and worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}; see its log in {self.workdir}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"stack not ready within {timeout_s} s; see the logs in {self.workdir}")

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int | None:
        """Send `sig` to the service's main process, as `docker compose stop` does to a container's PID 1 (its own
        children, vLLM's EngineCore say, are its business), SIGKILL its process group after `timeout_s`, and kill
        whatever of the group outlived it; returns its exit status (None when it was not running, negative when a
        signal ended it). A main process that died already has its group killed all the same: a killed gunicorn
        master's uvicorn workers, or a killed nginx master's workers, would otherwise run on as orphans (holding
        the port its restart needs), as a container's processes all end with its PID 1."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is not None:
            kill_group(proc.pid)
            return None
        os.kill(proc.pid, sig)
        try:
            status = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
        kill_group(proc.pid)
        return status

    def restart(self, name: str) -> None:
        """Start service `name` again after its main process died, as compose's restart policy does: what is left
        of its process group is killed first, so nothing of the dead one outlives it. Raises what its start raises
        (the service is then not running; call again)."""
        self.stop_process(name, signal.SIGKILL)
        if name == "redis":
            self.start_redis()
        elif name == "worker":
            self.start_worker()
        elif name == "gateway":
            self.start_gateway()
        elif name == "nginx":
            self.start_nginx()
        else:
            raise ValueError(f"no service {name!r}")

    def stop(self) -> None:
        self._contexts.close()
        for name in ("gateway", "worker", "redis"):
            self.stop_process(name)


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of a process group (each service runs in a session, so a group, of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def dev_environment() -> dict[str, str]:
    """Compose's variables with development defaults: the small model on this machine's CPU."""
    env = dict(os.environ)
    env.setdefault("DEVICE", "cpu")
    # DTYPE stays the worker's `auto`: bf16 where this CPU has it natively, float32 otherwise.
    # vLLM (its CPU build): measured faster than the transformers engine at 16 clients on this kind of machine
    # (README, "make dev"); eager, so it is ready in about a minute and a half instead of three and a half.
    env.setdefault("ENGINE", "vllm")
    env.setdefault("ENFORCE_EAGER", "1")
    env.setdefault("KV_CACHE_CPU_GIB", "2")
    env.setdefault("MAX_BATCH", "16")
    env.setdefault("LOG_LEVEL", "INFO")
    if not env.get("MODEL_PATH"):
        sys.path.insert(0, str(ROOT / "scripts"))
        from prepare_small_model import prepare

        env["MODEL_PATH"] = str(prepare())
    return env


class Supervisor:
    """Keeps every service of the stack running: one whose main process died is started again (`Stack.restart`),
    at once the first time, then with a pause that doubles while it keeps dying within RESTART_STABLE_S of its
    start (compose backs off the same way)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.started_at = {name: time.monotonic() for name in SERVICES}
        self.delay_s = dict.fromkeys(SERVICES, 0.0)
        self.next_try = dict.fromkeys(SERVICES, 0.0)
        self.restarts = dict.fromkeys(SERVICES, 0)

    def check(self) -> None:
        for name in SERVICES:
            proc = self.stack.procs.get(name)
            if proc is not None and proc.poll() is None:
                continue
            now = time.monotonic()
            if now < self.next_try[name]:
                continue
            status = "not running" if proc is None else f"exited with {proc.returncode}"
            logger.warning("%s %s; restarting it", name, status)
            try:
                self.stack.restart(name)
            except Exception as exc:  # noqa: BLE001 - whatever failed, try again later
                logger.error("%s did not start again: %s", name, exc)
            self.restarts[name] += 1
            # Died soon after its last start: wait longer before the next try.
            quick = now - self.started_at[name] < RESTART_STABLE_S
            self.delay_s[name] = min(max(1.0, self.delay_s[name] * 2), RESTART_MAX_DELAY_S) if quick else 0.0
            self.started_at[name] = time.monotonic()
            self.next_try[name] = self.started_at[name] + self.delay_s[name]


@contextlib.contextmanager
def locked(data_dir: Path):
    """The data dir for this launcher alone (two Redis servers on one append-only file would corrupt it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "devstack.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"devstack: another `make dev` uses {data_dir}; stop it, or pass --data-dir") from None
        yield data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The llamaq stack as local processes (`make dev`).")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="where Redis keeps its append-only file across restarts (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="devstack: %(message)s")
    if find_nginx() is None or shutil.which("redis-server") is None:
        logger.error("nginx and redis-server are needed: run `make dev` (it installs them)")
        return 1
    with locked(args.data_dir.resolve()) as data_dir:
        return run(data_dir / "redis")


def run(redis_dir: Path) -> int:
    redis_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="llamaq-dev-"))
    stack = Stack(dev_environment(), int(os.environ.get("HTTP_PORT", "6006")), workdir, log_to_files=False,
                  redis_aof=True, redis_dir=redis_dir)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start(wait_ready_s=0)
        logger.info("llamaq on %s (Redis data in %s); waiting for the worker to load the model", stack.url,
                    redis_dir)
        stack.wait_ready(600)
        logger.info("ready: curl -X POST %s -H 'Content-Type: application/json' -d '{\"prompt\": \"你好\"}'",
                    stack.url)
        logger.info("metrics: %s/metrics (gateway, queue), %s (the worker's own)", stack.url,
                    " ".join(stack.worker_metrics_urls))
        supervisor = Supervisor(stack)
        while not stopping:
            supervisor.check()
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
