"""Redis key names and the queued function's dotted path: the one place both services agree on them."""

PREFIX = "llamaq"
DEFAULT_QUEUE_NAME = "llamaq"
# Batch-priority jobs wait in an RQ queue of their own beside the interactive one (QUEUE_NAME itself); workers
# serve both in that order (rq's ordered queues), so a queued interactive job is always claimed before a batch one.
BATCH_QUEUE_SUFFIX = ":batch"
# The gateway enqueues this path as a string; only the worker ever imports it.
GENERATE_FUNC = "llamaq_worker.tasks.generate"


def queue_name(base: str, priority: str = "interactive") -> str:
    """The RQ queue a job of this priority waits in (`base`: QUEUE_NAME)."""
    return base + BATCH_QUEUE_SUFFIX if str(getattr(priority, "value", priority)) == "batch" else base


def queue_names(base: str) -> list[str]:
    """Every RQ queue of a deployment, in the order workers claim from them."""
    return [queue_name(base, "interactive"), queue_name(base, "batch")]


CANCEL_REQUESTS = f"{PREFIX}:cancel"
# Jobs with a deadline (a sorted set, scored by it): the sweep cancels each once it has passed.
DEADLINES = f"{PREFIX}:deadlines"
# Jobs a worker holds right now; swept for jobs whose worker stopped sending heartbeats.
RUNNING = f"{PREFIX}:running"
# Held by the one gateway process that runs the lost-worker sweep at a time.
SWEEP_LOCK = f"{PREFIX}:sweep-lock"
WORKERS = f"{PREFIX}:workers"
# Jobs ended so far, by final status (a hash), counted by the job-state scripts.
STATS = f"{PREFIX}:stats"
# Webhook deliveries ("<job id>:<event>") by the time each is next due (a sorted set; the job-state scripts add
# them, due at once), and each one's attempts so far (a hash): the gateway's deliverers work through them.
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"
WEBHOOK_ATTEMPTS = f"{PREFIX}:webhooks:attempts"
# Batch API: batches not yet ended (a set), each ended job of one as "<batch id> <job id>" in the order the job-state
# scripts ended them (a list the gateway's batch driver works through), and the lock of the one driver at a time.
BATCHES_ACTIVE = f"{PREFIX}:batches:active"
BATCH_JOBS_ENDED = f"{PREFIX}:batches:ended"
BATCH_DRIVER_LOCK = f"{PREFIX}:batches:lock"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def worker(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def model(name: str) -> str:
    return f"{PREFIX}:model:{name}"


def owner_jobs(owner: str) -> str:
    """A sorted set of the owner's job ids by creation time (GET /v1/jobs), written with each job's record."""
    return f"{PREFIX}:jobs-of:{owner}"


def file(file_id: str) -> str:
    """A Batch API file's record (a hash); its bytes lie in the gateway's FILES_DIR (batch_api/file_blobs.py)."""
    return f"{PREFIX}:file:{file_id}"


def file_content(file_id: str) -> str:
    """Where a file uploaded before FILES_DIR keeps its bytes, until its first read moves them (FileStore)."""
    return f"{PREFIX}:file:{file_id}:content"


def owner_files(owner: str) -> str:
    return f"{PREFIX}:files-of:{owner}"


def batch(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def batch_lines(batch_id: str, kind: str) -> str:
    """A batch's finished lines by line number (a hash): kind "output" (answered) or "error" (refused or failed)."""
    return f"{PREFIX}:batch:{batch_id}:{kind}"


def owner_batches(owner: str) -> str:
    return f"{PREFIX}:batches-of:{owner}"


def idempotency(owner: str, key: str) -> str:
    return f"{PREFIX}:idem:{owner}:{key}"


# ---- fair share (records.FAIR_LUA) --------------------------------------------------------------------------------
# Queued jobs wait in llamaq's fair queue, not in RQ's lists: per tier (interactive, batch, then over-quota work), a
# list of job ids per client and a sorted set of the clients with jobs waiting, scored by the service each has
# received (tokens / weight); workers claim from the least served client of the first tier with work.
FAIR_TIERS = ("interactive", "batch", "over")
# Each client's service so far, in weighted tokens (a hash client -> float), shared by every tier.
FAIR_SERVICE = f"{PREFIX}:fair:service"
# Each client's running jobs (a hash client -> count) and, for a key with MAX_CONCURRENT, its cap.
FAIR_RUNNING = f"{PREFIX}:fair:running"
FAIR_MAX_RUNNING = f"{PREFIX}:fair:max-running"
# Each client's weight, as its last submission gave it (a hash), for queue positions.
FAIR_WEIGHT = f"{PREFIX}:fair:weight"


def fair_tier(base: str, tier: str) -> str:
    """The key prefix of one tier of a deployment's fair queue (`base`: QUEUE_NAME): `<prefix>:clients` (sorted set
    of clients by service), `<prefix>:jobs:<client>` (a client's waiting job ids, oldest first), `<prefix>:depth`
    (a list as long as the jobs waiting in the tier, one "1" each: what KEDA and the bounds read), `<prefix>:state`
    (a hash: `last`, the client claimed last) and `<prefix>:wake` (a short list idle workers block
    on)."""
    return f"{PREFIX}:fq:{base}:{tier}"


def fair_tiers(base: str) -> list[str]:
    """Every tier's prefix, in the order workers claim from them."""
    return [fair_tier(base, tier) for tier in FAIR_TIERS]


def fair_jobs(tier_prefix: str, client: str) -> str:
    return f"{tier_prefix}:jobs:{client}"


def rate_bucket(client: str) -> str:
    """A client's rate-limit buckets (a hash: requests and tokens, their caps, and when each was last filled)."""
    return f"{PREFIX}:rl:{client}"


def usage(client: str) -> str:
    """A client's usage so far (a hash: requests, prompt_tokens, completion_tokens): GET /v1/usage and /metrics."""
    return f"{PREFIX}:usage:{client}"


# The accounts (key names, or "open") with usage, for /metrics.
USAGE_ACCOUNTS = f"{PREFIX}:usage-accounts"


def webhook_payload(delivery: str) -> str:
    """A webhook delivery's own copy of what it sends ("<job id>:<event>" -> a JSON string {url, body, first}), taken
    by the gateway's deliverer when it first picks the delivery up and kept for WEBHOOK_RETRY_FOR_S (and a margin),
    so its retries outlive the job record."""
    return f"{PREFIX}:webhooks:payload:{delivery}"
