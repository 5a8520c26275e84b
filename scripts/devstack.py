"""The whole llamaq stack as local processes: its own redis-server, the worker, gunicorn with the gateway,
and nginx with the project's real config (upstream pointed at loopback).

`make dev` runs `python scripts/devstack.py` in the foreground (Ctrl-C stops everything; a crashed worker is
restarted). The integration tests start the same `Stack`. It honours the compose variables (HTTP_PORT,
MODEL_PATH, DEVICE, DTYPE, MAX_BATCH, QUEUE_NAME, API_KEYS, TRUSTED_PROXIES for nginx, ...); REDIS_URL is always its
own Redis.
"""

from __future__ import annotations

import contextlib
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
        self, env: dict[str, str], http_port: int, workdir: Path, log_to_files: bool = True, redis_aof: bool = False
    ):
        self.env = env
        self.http_port = http_port
        self.workdir = workdir
        # Append-only file on, as compose runs Redis: its data survives a restart (the Redis restart tests).
        self.redis_aof = redis_aof
        # Tests keep one log file per service; `make dev` shows everything in its terminal.
        self.log_dir = workdir if log_to_files else None
        self.redis_port = free_port()
        self.gateway_port = free_port()
        self.env.update(
            REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            GATEWAY_PORT=str(self.gateway_port),
            GATEWAY_HOST="127.0.0.1",
        )
        # The worker's own Prometheus port: METRICS_PORT if given, else a free one (several stacks may run).
        self.env.setdefault("METRICS_PORT", str(free_port()))
        self.worker_metrics_port = int(self.env["METRICS_PORT"])
        self.procs: dict[str, subprocess.Popen] = {}
        self._contexts = contextlib.ExitStack()
        self.nginx = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else None  # noqa: SIM115
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT if log else None, cwd=ROOT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_redis(self) -> None:
        proc = self._spawn("redis", [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
            "--appendonly", "yes" if self.redis_aof else "no", "--dir", str(self.workdir),
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
        signal ended it)."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return None
        os.kill(proc.pid, sig)
        try:
            status = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return status

    def stop(self) -> None:
        self._contexts.close()
        for name in ("gateway", "worker", "redis"):
            self.stop_process(name)


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


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="devstack: %(message)s")
    if find_nginx() is None or shutil.which("redis-server") is None:
        logger.error("nginx and redis-server are needed: run `make dev` (it installs them)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="llamaq-dev-"))
    stack = Stack(dev_environment(), int(os.environ.get("HTTP_PORT", "6006")), workdir, log_to_files=False)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start(wait_ready_s=0)
        logger.info("llamaq on %s; waiting for the worker to load the model", stack.url)
        stack.wait_ready(600)
        logger.info("ready: curl -X POST %s -H 'Content-Type: application/json' -d '{\"prompt\": \"你好\"}'",
                    stack.url)
        while not stopping:
            for name, proc in list(stack.procs.items()):
                if proc.poll() is None:
                    continue
                if name == "worker":
                    logger.warning("worker exited with %s; restarting it", proc.returncode)
                    time.sleep(1)
                    stack.start_worker()
                else:
                    logger.error("%s exited with %s; stopping", name, proc.returncode)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
