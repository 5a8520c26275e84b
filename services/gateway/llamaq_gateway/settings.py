from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaq_protocol.keys import DEFAULT_QUEUE_NAME


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
    max_queue: int = Field(default=1000, ge=1)
    # Times a job whose worker died is put back on the queue before it fails as worker_lost.
    job_retries: int = Field(default=1, ge=0)
    # Comma-separated bearer keys; unset or empty leaves the API open.
    api_keys: SecretStr | None = None

    # How long `POST /` (the original contract) holds the request before answering 504 with the job id. At most
    # 650: nginx/nginx.conf waits 660 s for `location = /`, and must outwait this so the client gets the job id
    # rather than nginx's own 504.
    legacy_wait_s: float = Field(default=600, gt=0, le=650)
    max_poll_wait_s: float = 60
    max_generate_wait_s: float = 300
    # A worker whose heartbeat is older than this is not counted as ready.
    worker_stale_s: float = Field(default=15, gt=0)
    redis_max_connections: int = Field(default=512, ge=8)

    def api_key_list(self) -> list[str]:
        if self.api_keys is None:
            return []
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()
