from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaq_protocol.keys import DEFAULT_QUEUE_NAME

from .webhook_signing import secret_key


class GatewaySettings(BaseSettings):
    """Every knob of the gateway, read from the environment (names documented in .env.example)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = DEFAULT_QUEUE_NAME
    log_level: str = "INFO"
    # json: one object per line carrying the request id; text: for reading in a terminal.
    log_format: Literal["json", "text"] = "json"
    # Where gunicorn listens, and how many worker processes it runs.
    gateway_host: str = "0.0.0.0"
    gateway_port: int = 8000
    web_concurrency: int = Field(default=2, ge=1)

    result_ttl_s: int = Field(default=3600, ge=1)
    job_timeout_s: int = Field(default=600, ge=1)
    max_new_tokens_limit: int = Field(default=4096, ge=1)
    max_prompt_tokens: int = Field(default=8192, ge=1)
    # Most choices (`n`) one request may ask for: each is a sequence of its own on the worker.
    max_n: int = Field(default=16, ge=1, le=128)
    max_queue: int = Field(default=1000, ge=1)
    # The batch-priority queue's own bound (`priority: batch` submissions); it never refuses interactive ones.
    max_batch_queue: int = Field(default=10000, ge=1)
    # Times a job whose worker died is put back on the queue before it fails as worker_lost.
    job_retries: int = Field(default=1, ge=0)
    # Comma-separated bearer keys; unset or empty (and no API_KEYS_FILE) leaves the API open.
    api_keys: SecretStr | None = None
    # A TOML file of keys by their SHA-256, each with a name, a fair-share weight and limits (callers.py).
    api_keys_file: str = ""
    # The most of a queue's bound (MAX_QUEUE, MAX_BATCH_QUEUE) one client (key, or address with the API open) may
    # hold waiting, so one client's backlog never refuses everyone else's submissions.
    max_client_share: float = Field(default=0.5, gt=0, le=1)

    # How long `POST /` (the original contract) holds the request before answering 504 with the job id. At most
    # 650: nginx/nginx.conf waits 660 s for `location = /`, and must outwait this so the client gets the job id
    # rather than nginx's own 504.
    legacy_wait_s: float = Field(default=600, gt=0, le=650)
    max_poll_wait_s: float = 60
    max_generate_wait_s: float = 300
    # The OpenAI routes (chat/completions, completions, responses without background) cancel the job of a client
    # that disconnects before its answer is complete, as vLLM does (not with an Idempotency-Key; never the job API).
    cancel_on_disconnect: bool = True
    # A worker whose heartbeat is older than this is not counted as ready.
    worker_stale_s: float = Field(default=15, gt=0)
    # Each process's pool for short commands; nothing blocks in it (waiters share the event hub's readers).
    redis_max_connections: int = Field(default=64, ge=8)
    # Redis connections each process's event hub reads every job stream through (one blocking XREAD each).
    stream_readers: int = Field(default=1, ge=1, le=16)
    # Events one stream's reader may fall behind (read from Redis, not yet sent to its client) before its stream is
    # ended with an end it resumes from: the job events SSE closes after the last event sent (reconnect with
    # Last-Event-ID), the OpenAI streams end with an error chunk. Bounds a slow client's memory in the gateway. At
    # least one read's worth (512 events, the event hub's READ_COUNT), which a reader hands over at once.
    stream_max_pending_events: int = Field(default=4096, ge=512)
    # Open event streams and waits one client (API key, or address with the API open) may hold per process;
    # over it: 429 + Retry-After.
    max_streams_per_client: int = Field(default=1000, ge=1)

    # Webhooks (`webhook` on POST /v1/jobs and /v1/generate): the Standard Webhooks signing secret, `whsec_` +
    # base64; unset, submissions with a webhook are refused (400).
    webhook_secret: SecretStr | None = None
    # Let webhook URLs resolve to loopback, link-local or private addresses (a private network, tests).
    webhook_allow_private: bool = False
    # A failed delivery is tried again after WEBHOOK_BACKOFF_S, doubling each time (at most an hour apart), until
    # WEBHOOK_RETRY_FOR_S have passed since its first attempt (whether or not the job record is still there: each
    # delivery keeps its own copy of the payload); each whole attempt takes WEBHOOK_TIMEOUT_S at most.
    webhook_backoff_s: float = Field(default=5, gt=0)
    webhook_retry_for_s: float = Field(default=86400, gt=0)
    webhook_timeout_s: float = Field(default=10, gt=0, le=60)

    # The Batch API (/v1/files, /v1/batches): an uploaded file's size and request count at most (nginx's
    # `location = /v1/files` lets 33 MiB through, so a MAX_FILE_BYTES above 32 MiB needs nginx.conf raised too), and
    # how long files (inputs, outputs) and batches are kept after creation.
    max_file_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # Bytes of uploaded files one key (with the API open, one address) may keep at once (0: no bound); the Batch
    # API's output files do not count.
    max_file_storage_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Where the files' bytes lie (their records are in Redis): a directory every gateway process shares, a volume in
    # compose and Kubernetes (batch_api/file_blobs.py says why not Redis).
    files_dir: str = "/data/files"
    max_batch_requests: int = Field(default=50_000, ge=1)
    file_ttl_s: int = Field(default=30 * 24 * 3600, ge=60)

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_is_standard(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        if value is not None:
            secret_key(value.get_secret_value())
        return value

    def api_key_list(self) -> list[str]:
        if self.api_keys is None:
            return []
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()
