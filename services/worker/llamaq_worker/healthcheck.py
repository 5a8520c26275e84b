"""Container healthcheck: exit 0 when a worker on this host has its model loaded and a fresh heartbeat. A worker
whose decoding loop is wedged (no step finished for STEP_STALL_S while it holds jobs) stops beating and withdraws
its entry (presence.Heartbeat), so it fails this check too."""

import socket
import sys
import time

import redis

from llamaq_protocol import keys

from .settings import WorkerSettings


def main() -> int:
    settings = WorkerSettings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3)
    fresh = client.zrangebyscore(keys.WORKERS, time.time() - settings.worker_stale_s, "+inf")
    host_prefix = f"{socket.gethostname()}:".encode()
    return 0 if any(name.startswith(host_prefix) for name in fresh) else 1


if __name__ == "__main__":
    sys.exit(main())
