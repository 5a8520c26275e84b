"""One log format for every llamaq process: a JSON object per line, carrying the request id that nginx assigned.

nginx logs the request id in its access log and passes it as X-Request-ID; the gateway keeps it in
`request_id_var` while it handles the request and stores it with the job, and the worker adds it (`extra=`) to
every line about that job. `grep <request id>` across the three services' logs then follows one request.
Prompts are never logged unless LOG_PROMPTS=1.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

# The request being handled by this task (the gateway sets it per request).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("llamaq_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
# (uvicorn adds `color_message`, the message again with terminal colours.)
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message",
}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and not name.startswith("_"):
                entry[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if entry.get("request_id") is None:
            request_id = request_id_var.get()
            if request_id is not None:
                entry["request_id"] = request_id
            else:
                entry.pop("request_id", None)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(service: str, log_format: str) -> logging.Formatter:
    return JsonFormatter(service) if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(service: str, level: str, log_format: str = "json") -> None:
    """Once per entry point: one handler on the root logger, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(service, log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def logging_dict_config(service: str, level: str, log_format: str, logger_name: str) -> dict:
    """The same format as `configure_logging`, as a `logging.config.dictConfig` document, for libraries that
    configure their own loggers in processes of their own (vLLM's EngineCore: VLLM_LOGGING_CONFIG_PATH)."""
    if log_format == "json":
        chosen = {"()": f"{__name__}.JsonFormatter", "service": service}
    else:
        chosen = {"format": TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "llamaq", "stream": "ext://sys.stderr"}
    target = {"handlers": ["llamaq"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"llamaq": chosen},
        "handlers": {"llamaq": handler},
        "loggers": {logger_name: target},
    }
