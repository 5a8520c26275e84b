"""The one error shape, `{"error": {"type", "message", "code"}}`, mapped in one place from domain exceptions."""

from __future__ import annotations

import logging

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaq_protocol import ErrorBody, ErrorDetail

logger = logging.getLogger(__name__)


class LlamaqError(Exception):
    status_code = 500
    error_type = "internal_error"
    retry_after_s: int | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(LlamaqError):
    status_code = 400
    error_type = "invalid_request"


class PromptTooLong(InvalidRequest):
    error_type = "prompt_too_long"


class IdempotencyConflict(InvalidRequest):
    error_type = "idempotency_key_reused"


class Unauthorized(LlamaqError):
    status_code = 401
    error_type = "unauthorized"


class JobNotFound(LlamaqError):
    status_code = 404
    error_type = "not_found"


class QueueFull(LlamaqError):
    status_code = 429
    error_type = "queue_full"
    retry_after_s = 2


class ServiceUnavailable(LlamaqError):
    status_code = 503
    error_type = "unavailable"
    retry_after_s = 2


class NoReadyWorker(ServiceUnavailable):
    error_type = "no_ready_worker"
    retry_after_s = 5


class WaitTimeout(LlamaqError):
    status_code = 504
    error_type = "timeout"


class JobFailed(LlamaqError):
    """A job the client waited on ended failed; the job's own error type is passed through."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def error_response(status_code: int, error_type: str, message: str, retry_after_s: int | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(type=error_type, message=message, code=status_code))
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return 400, "invalid_json", "request body is not valid JSON"
    parts = []
    for err in errors:
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{location or 'body'}: {err.get('msg')}")
    return 422, "invalid_request", "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LlamaqError)
    async def _domain(_: Request, exc: LlamaqError) -> JSONResponse:
        return error_response(exc.status_code, exc.error_type, exc.message, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*_describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, error_type, str(exc.detail))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        logger.warning("redis unavailable: %s", exc)
        return error_response(503, "unavailable", "the job store (Redis) is unreachable; retry shortly", 2)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
