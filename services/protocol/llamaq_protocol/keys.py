"""Redis key names and the queued function's dotted path: the one place both services agree on them."""

PREFIX = "llamaq"
DEFAULT_QUEUE_NAME = "llamaq"
# The gateway enqueues this path as a string; only the worker ever imports it.
GENERATE_FUNC = "llamaq_worker.tasks.generate"

CANCEL_REQUESTS = f"{PREFIX}:cancel"
# Jobs a worker holds right now; swept for jobs whose worker stopped sending heartbeats.
RUNNING = f"{PREFIX}:running"
# Held by the one gateway process that runs the lost-worker sweep at a time.
SWEEP_LOCK = f"{PREFIX}:sweep-lock"
WORKERS = f"{PREFIX}:workers"
# Jobs ended so far, by final status (a hash), counted by the job-state scripts.
STATS = f"{PREFIX}:stats"


def worker_metrics(name: str) -> str:
    """A worker's own Prometheus exposition, refreshed with its heartbeat, merged into the gateway's /metrics."""
    return f"{PREFIX}:metrics:{name}"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def worker(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def model(name: str) -> str:
    return f"{PREFIX}:model:{name}"


def idempotency(owner: str, key: str) -> str:
    return f"{PREFIX}:idem:{owner}:{key}"
