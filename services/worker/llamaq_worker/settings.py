import os
import socket
import uuid
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaq_protocol.keys import DEFAULT_QUEUE_NAME

DEFAULT_MODEL_ID = "LLM-Research/Meta-Llama-3.1-8B-Instruct"


def default_worker_name() -> str:
    """`<hostname>:<pid>:<random>`, new at every start. Host first, so a container's healthcheck can find its own
    worker by hostname. The random part because a container keeps its hostname across restarts and its worker is
    always PID 1: after an unclean exit RQ's `rq:worker:<name>` key outlives the process by minutes, and a
    restarted worker under the same name would fail RQ's registration ("There exists an active worker named ...")
    until it expired."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class WorkerSettings(BaseSettings):
    """Every knob of the worker, read from the environment (names documented in .env.example)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", protected_namespaces=())

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = DEFAULT_QUEUE_NAME
    log_level: str = "INFO"
    # json: one object per line with job_id and request_id; text: for reading in a terminal.
    log_format: Literal["json", "text"] = "json"
    # Log each job's messages (off: prompts are the users' data).
    log_prompts: bool = False
    # Prometheus metrics of this worker on GET :METRICS_PORT/metrics; 0 serves none (the gateway's /metrics
    # still shows them, via Redis).
    metrics_port: int = Field(default=9100, ge=0, le=65535)

    model_id: str = DEFAULT_MODEL_ID
    # A local model folder; when unset the model is fetched with modelscope's snapshot_download.
    model_path: str | None = None
    model_cache: str = "/models"
    device: str = "cuda"
    dtype: str = "bfloat16"
    max_batch: int = Field(default=32, ge=1)
    # Test only: "echo" runs no model and answers each job with its last user message (queue-overhead benchmarks).
    engine: Literal["transformers", "echo"] = "transformers"

    result_ttl_s: int = Field(default=3600, ge=1)
    heartbeat_s: float = Field(default=2.0, gt=0)
    # Read by the container healthcheck; the gateway uses the same variable to declare a worker gone.
    worker_stale_s: float = Field(default=15, gt=0)
    # How often RQ's own job/execution heartbeats are refreshed while a batch runs.
    rq_heartbeat_s: float = Field(default=10.0, gt=0)
    # How long a running batch waits for Redis to come back (decoding paused, tokens held) before the worker
    # exits non-zero and leaves its jobs to the lost-worker sweep.
    redis_outage_tolerance_s: float = Field(default=120, gt=0)
    # On SIGTERM: time for the running jobs to finish before they are handed back to the queue. Below compose's
    # stop_grace_period (60 s), after which the container is killed.
    drain_timeout_s: float = Field(default=50, ge=0)
    worker_name: str = Field(default_factory=default_worker_name)
