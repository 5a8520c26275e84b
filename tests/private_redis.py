"""A redis-server of its own on a free port, for tests of what one piece does with Redis (no whole stack)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from devstack import Stack
from nginx_local import free_port


@contextmanager
def private_redis(workdir_prefix: str) -> Iterator[str]:
    """The URL of a fresh redis-server, started as the stacks start theirs and stopped afterwards."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not found: run `make system-deps`", pytrace=False)
    stack = Stack(dict(os.environ), free_port(), Path(tempfile.mkdtemp(prefix=workdir_prefix)))
    try:
        stack.start_redis()
        yield stack.env["REDIS_URL"]
    finally:
        stack.stop()


@contextmanager
def emptied(url: str) -> Iterator[redis.Redis]:
    """A client of the Redis at `url`, emptied first (one test's clean slate), closed afterwards."""
    client = redis.Redis.from_url(url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()
