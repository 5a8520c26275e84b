"""App factory: `gunicorn "llamaq_gateway.app:create_app()"`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI

from llamaq_protocol.logs import request_id_var

from .callers import Keyring
from .errors import error_response, install_error_handlers, is_openai_scope
from .event_hub import BLOCK_MS, EventHub
from .jobs import REDIS_BLIP_S, JobService
from .limits import StreamLimiter
from .metrics import HTTP_DURATION, HTTP_REQUESTS
from .routers import (
    batch_api, events, generate, health, jobs, legacy, metrics, openai, responses, usage, vllm_compat,
)
from .settings import GatewaySettings, get_settings
from .batch_api.batches import BatchDriver, BatchService
from .batch_api.file_blobs import FileBlobs
from .batch_api.files import FileStore
from .sweeper import LostWorkerSweeper
from .webhooks import WebhookDeliverer

logger = logging.getLogger(__name__)
access_log = logging.getLogger("llamaq_gateway.access")
# Probes and scrapes, every few seconds: counted in the metrics, not logged.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/health", "/metrics"})

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
COMMANDS_CLIENT_NAME = "llamaq-gateway"
RQ_CLIENT_NAME = "llamaq-gateway-rq"
# The longest startup waits for Redis to tell RQ its version (see _warm_rq).
RQ_WARM_S = 5.0


class RequestContext:
    """Per request: its id (the client's or nginx's X-Request-ID, else a new one) in `request.state`, in every
    log line written meanwhile and on the response; then one access-log line and the HTTP metrics.

    An exception no handler took is logged and answered with the API's 500 here, while the id is still set:
    Starlette's `Exception` handler would run outside this middleware, after it.

    Plain ASGI rather than `@app.middleware("http")`, which runs every request in an extra task.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        context = request_id_var.set(request_id)
        status = 500
        started_response = False

        async def send_with_id(message):
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                # OpenAI's x-ratelimit-* headers, where an admission read the caller's limits (jobs.enqueue).
                caller = scope["state"].get("caller")
                if caller is not None:
                    headers += [(k.encode(), v.encode()) for k, v in caller.rate_headers.items()]
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if started_response:
                raise  # too late for an error response: the server drops the connection
            response = error_response(500, "internal_error", "internal error", openai=is_openai_scope(scope))
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            # The route's template, not the path: one series per endpoint, whatever the job ids.
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_DURATION.labels(scope["method"], route).observe(elapsed)
            if route not in QUIET_ROUTES:
                access_log.info("%s %s %d", scope["method"], route, status,
                                extra={"status": status, "duration_ms": round(elapsed * 1000, 1)})
            request_id_var.reset(context)


async def _warm_rq(jobs: JobService) -> None:
    """Ask Redis its version now, in a thread: RQ asks it (a blocking INFO) at its first enqueue, which runs on
    the event loop. A Redis that is down or slow is no reason not to start: the requests meanwhile get 503s, and
    the first enqueue once it is back asks instead (or finds the answer the abandoned thread got)."""
    with anyio.move_on_after(RQ_WARM_S) as waited:
        try:
            await anyio.to_thread.run_sync(jobs.queue.get_redis_server_version, abandon_on_cancel=True)
        except Exception as exc:  # only a warm-up: nothing here may keep the gateway from starting
            logger.warning("could not ask Redis its version at startup: %s", exc)
    if waited.cancelled_caught:
        logger.warning("Redis did not tell its version within %s s of startup; starting anyway", RQ_WARM_S)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aio = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.redis_max_connections,
                timeout=5,
                health_check_interval=30,
                # Nothing blocks here (the event hub has its own connections), but a slow Redis is not a dead one.
                socket_timeout=BLOCK_MS / 1000 + 15,
                socket_connect_timeout=5,
                # Named, so CLIENT LIST tells the gateway's connections apart (tests count them).
                client_name=COMMANDS_CLIENT_NAME,
            )
        )
        # RQ's API is synchronous; it runs in worker threads on its own small pool.
        sync = redis.Redis.from_url(settings.redis_url, health_check_interval=30, socket_timeout=10,
                                    client_name=RQ_CLIENT_NAME)
        app.state.settings = settings
        app.state.keyring = Keyring.load(settings.api_key_list(), settings.api_keys_file)
        hub = EventHub(settings.redis_url, aio, readers=settings.stream_readers, outage_limit_s=REDIS_BLIP_S,
                       max_pending=settings.stream_max_pending_events)
        app.state.jobs = JobService(settings, aio, sync, hub)
        app.state.stream_limiter = StreamLimiter(settings.max_streams_per_client)
        hub.start()
        await _warm_rq(app.state.jobs)
        sweeper = asyncio.create_task(LostWorkerSweeper(app.state.jobs).run_forever())
        app.state.files = FileStore(aio, settings.file_ttl_s, FileBlobs(settings.files_dir))
        app.state.batches = BatchService(settings, aio, app.state.files)
        batch_driver = asyncio.create_task(BatchDriver(app.state.jobs, app.state.files).run_forever())
        # Only a deployment with a secret takes webhooks, so only then is there anything to deliver.
        deliverer = (asyncio.create_task(WebhookDeliverer(settings, aio).run_forever())
                     if settings.webhook_secret is not None else None)
        try:
            yield
        finally:
            sweeper.cancel()
            batch_driver.cancel()
            if deliverer is not None:
                deliverer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await deliverer
            await hub.aclose()
            await aio.aclose()
            sync.close()

    app = FastAPI(
        title="llamaq",
        version="0.1.0",
        summary="Queue-backed Llama serving: nginx -> gateway -> Redis/RQ -> GPU worker",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    app.add_middleware(RequestContext)
    for router in (legacy.router, jobs.router, events.router, generate.router, openai.router, responses.router,
                   batch_api.router, usage.router, vllm_compat.router, health.router, metrics.router):
        app.include_router(router)
    return app
