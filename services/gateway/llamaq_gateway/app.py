"""App factory: `gunicorn "llamaq_gateway.app:create_app()"`."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request

from .errors import install_error_handlers
from .jobs import MAX_BLOCK_MS, JobService
from .routers import events, generate, health, jobs, legacy, openai
from .settings import GatewaySettings, get_settings
from .sweeper import LostWorkerSweeper

logger = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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
                # redis-py's default read timeout (5 s) would cut the blocking XREADs that wait for jobs.
                socket_timeout=MAX_BLOCK_MS / 1000 + 15,
                socket_connect_timeout=5,
            )
        )
        # RQ's API is synchronous; it runs in worker threads on its own small pool.
        sync = redis.Redis.from_url(settings.redis_url, health_check_interval=30, socket_timeout=10)
        app.state.settings = settings
        app.state.api_keys = settings.api_key_list()
        app.state.jobs = JobService(settings, aio, sync)
        sweeper = asyncio.create_task(LostWorkerSweeper(app.state.jobs).run_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            await aio.aclose()
            sync.close()

    app = FastAPI(
        title="llamaq",
        version="0.1.0",
        summary="Queue-backed Llama serving: nginx -> gateway -> Redis/RQ -> GPU worker",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        incoming = request.headers.get("x-request-id", "")
        request.state.request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    for router in (legacy.router, jobs.router, events.router, generate.router, openai.router, health.router):
        app.include_router(router)
    return app
