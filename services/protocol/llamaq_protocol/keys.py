"""Redis key names and the queued function's dotted path: the one place both services agree on them."""

PREFIX = "llamaq"
DEFAULT_QUEUE_NAME = "llamaq"
# The gateway enqueues this path as a string; only the worker ever imports it.
GENERATE_FUNC = "llamaq_worker.tasks.generate"

CANCEL_REQUESTS = f"{PREFIX}:cancel"
WORKERS = f"{PREFIX}:workers"


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
