"""`python -m llamaq_worker`: load the model once, announce it, then serve the queue until stopped."""

from __future__ import annotations

import logging
import os
import sys

import redis
from rq.serializers import JSONSerializer

from llamaq_protocol import WorkerInfo, keys, utc_now
from llamaq_protocol.models import CAPABILITY_TOOLS
from llamaq_protocol.logs import configure_logging

from .decoding_loop import DecodingWorker
from .engines import Engine, build_engine
from .hardware import resolve_dtype
from .metrics import WorkerMetrics
from .model_source import resolve_model_dir
from .presence import Heartbeat, batch_stall_s, model_mapping, publish_model
from .priority_queues import PriorityQueue
from .settings import WorkerSettings
from .tool_calls import load_tool_parser

logger = logging.getLogger("llamaq_worker")


def served_model_name(settings: WorkerSettings) -> str:
    if settings.model_path:
        return os.path.basename(os.path.normpath(settings.model_path))
    return settings.model_id


def main() -> int:
    settings = WorkerSettings()
    configure_logging("worker", settings.log_level, settings.log_format)
    model_dir = resolve_model_dir(settings)
    dtype = resolve_dtype(settings.dtype, settings.device)
    logger.info("loading %s on %s as %s with ENGINE=%s (max batch %d)", model_dir, settings.device, dtype,
                settings.engine, settings.max_batch)
    # Loaded once, in this process, before anything else happens; SimpleWorker never forks.
    engine = build_engine(settings, model_dir)
    try:
        return serve(settings, engine, dtype)
    finally:
        engine.close()


def serve(settings: WorkerSettings, engine: Engine, dtype: str) -> int:
    """Announce the loaded engine's model, then work the queue until stopped; the exit status."""
    name = served_model_name(settings)
    # Engines with a scheduler of their own (vLLM) also keep its figures in `stats` (an EngineStats).
    metrics = WorkerMetrics(engine.device_memory, engine.stats)
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
            logger.info("metrics on :%d/metrics", settings.metrics_port)
        except OSError as exc:  # a second worker on the same host: give each its own METRICS_PORT
            logger.warning("metrics port %d unavailable (%s); serving none", settings.metrics_port, exc)

    connection = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    tokenizer = engine.tokenizer
    tool_parser = load_tool_parser(settings.tool_call_parser, tokenizer)
    capabilities = set(getattr(engine, "capabilities", ())) | ({CAPABILITY_TOOLS} if tool_parser else set())
    model = model_mapping(
        {
            "name": name,
            "context_length": engine.context_length,
            "chat_template": tokenizer.chat_template,
            "special_tokens": tokenizer.special_tokens_map,
            "defaults": engine.defaults,
            "engine": settings.engine,
            "capabilities": sorted(capabilities),
        },
        tokenizer.backend_tokenizer.to_str(),
    )
    publish_model(connection, model)
    info = WorkerInfo(
        name=settings.worker_name, model=name, device=settings.device, dtype=dtype,
        max_batch=settings.max_batch, pid=os.getpid(), started_at=utc_now(),
    )
    # Each beat also publishes the model card again if Redis has lost it.
    heartbeat = Heartbeat(settings.redis_url, info, settings.heartbeat_s, model)
    heartbeat.beat()
    heartbeat.start()
    logger.info("model %s ready; serving queues %s as %s", name, ", ".join(keys.queue_names(settings.queue_name)),
                settings.worker_name)

    # Interactive first: a batch job is claimed only when no interactive one is queued.
    queues = [PriorityQueue(queue_name, connection=connection, serializer=JSONSerializer)
              for queue_name in keys.queue_names(settings.queue_name)]
    worker = DecodingWorker(
        queues, queue_class=PriorityQueue, engine=engine, settings=settings, metrics=metrics, connection=connection,
        serializer=JSONSerializer, tool_parser=tool_parser,
        name=settings.worker_name, log_job_description=False,
    )
    # A wedged decoding loop gets no more beats: its jobs are swept to other workers.
    heartbeat.watch(lambda: batch_stall_s(worker), settings.step_stall_s)
    try:
        worker.work(logging_level=settings.log_level.upper())
    except redis.RedisError as exc:  # RQ's teardown after giving up on Redis
        logger.error("worker stopped: %s", exc)
    finally:
        heartbeat.stop()
    if worker.shutdown_signalled and not worker.gave_up:
        logger.info("stopped on request")
        return 0
    # RQ's work() also returns after an error it could not handle (it logs it): exit non-zero, so the
    # supervisor restarts the worker and the lost-worker sweep re-queues anything it held.
    logger.error("worker loop ended without a stop request; exiting with 1")
    return 1


if __name__ == "__main__":
    sys.exit(main())
