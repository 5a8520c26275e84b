"""Servers to start and stop: llamaq's whole local stack (scripts/devstack.py), the original one-file server
(scripts/baseline_server.py) and `vllm serve`; the small model they serve; a frozen copy of this work tree.

devstack and nginx_local are imported only when a server starts, never with the kit: chaos_soak.py and
bench_fairness.py import a copy's devstack (put first on sys.path) after importing the kit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchkit.paths import ROOT, SCRIPTS

# The name `vllm serve` serves the small model under (its OpenAI `model`).
SERVED_NAME = "SmolLM2-135M-Instruct"
# Tools need a template that renders them (SmolLM2's ignores them): the tests' Llama-3.1-style ChatML one, which
# renders a conversation without tools exactly as the model's own does.
TOOL_TEMPLATE = ROOT / "tests" / "clients" / "chatml_tools.jinja"


def services_path(tree: Path) -> str:
    """PYTHONPATH that makes a copy of the tree's services win over the installed (editable) ones."""
    return os.pathsep.join(str(tree / "services" / s) for s in ("protocol", "gateway", "worker"))


def snapshot_worktree(prefix: str = "llamaq-tree-") -> Path:
    """This work tree as it is now (tracked and untracked files, not the ignored ones), copied to a temporary folder:
    others may edit the tree meanwhile, and every stack and measurement of one run must see the same code."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    dest = Path(tempfile.mkdtemp(prefix=prefix))
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def small_model() -> str:
    """The small model's folder (SmolLM2-135M-Instruct), prepared first if needed."""
    sys.path.insert(0, str(SCRIPTS))
    from prepare_small_model import prepare

    return str(prepare())


def start_stack(env_overrides: dict[str, str]):
    """scripts/devstack.py's Stack (redis-server, the worker, gunicorn, nginx) on a free port, ready: this
    environment without API_KEYS, LOG_LEVEL=INFO, then `env_overrides` over it. Stop it with `.stop()`."""
    sys.path.insert(0, str(SCRIPTS))
    from devstack import Stack
    from nginx_local import free_port

    env = dict(os.environ)
    env.pop("API_KEYS", None)
    env.update({"LOG_LEVEL": "INFO", **env_overrides})
    workdir = Path(tempfile.mkdtemp(prefix="llamaq-bench-"))
    stack = Stack(env, free_port(), workdir)
    try:
        stack.start(wait_ready_s=300)
    except BaseException:
        stack.stop()
        raise
    print(f"stack up on {stack.url} (logs in {workdir})", file=sys.stderr)
    return stack


class Baseline:
    """scripts/baseline_server.py under one uvicorn process on a free loopback port."""

    def __init__(self, model: str, dtype: str, device: str = "cpu"):
        sys.path.insert(0, str(SCRIPTS))
        from devstack import wait_for_port
        from nginx_local import free_port

        self.port = free_port()
        env = dict(os.environ, MODEL_PATH=model, DEVICE=device, DTYPE=dtype)
        self.log = tempfile.NamedTemporaryFile(prefix="llamaq-baseline-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(SCRIPTS), "baseline_server:app",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.proc, 300, "baseline server")
        print(f"baseline up on {self.url} (log {self.log.name})", file=sys.stderr)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class VllmServe:
    """vLLM's own OpenAI server (`vllm serve`, its server module called directly: the CPU build's console script
    fails on package metadata), with the engine options llamaq's worker uses here: `args` carries dtype,
    max_model_len, max_batch (`--max-num-seqs`), eager and kv_cache_gib. `extra_argv` goes at the end of its
    command line."""

    def __init__(self, model: str, args, extra_argv: tuple[str, ...] | list[str] = ()):
        sys.path.insert(0, str(SCRIPTS))
        from devstack import wait_for_port
        from nginx_local import free_port

        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)  # noqa: SIM115
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                "--max-num-seqs", str(args.max_batch), "--disable-log-stats"]
        if args.eager:
            argv.append("--enforce-eager")
        argv += ["--chat-template", str(TOOL_TEMPLATE), *extra_argv]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib))
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_port(self.port, self.proc, 900, "vllm serve")
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:  # the port opens before the engine is ready
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(1)
        print(f"vllm serve up on {self.url} (log {self.log.name})", file=sys.stderr)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
