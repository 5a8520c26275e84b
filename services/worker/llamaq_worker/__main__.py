"""`python -m llamaq_worker`: load the model once, announce it, then serve the queue until stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from llamaq_protocol import WorkerInfo, utc_now
from llamaq_protocol.logs import configure_logging

from .batch_worker import BatchWorker
from .metrics import WorkerMetrics
from .model_source import resolve_model_dir
from .periodic import PeriodicReporter
from .presence import Heartbeat, model_mapping, publish_model
from .settings import WorkerSettings

logger = logging.getLogger("llamaq_worker")


def served_model_name(settings: WorkerSettings) -> str:
    if settings.model_path:
        return os.path.basename(os.path.normpath(settings.model_path))
    return settings.model_id


def build_engine(settings: WorkerSettings, model_dir: str):
    if settings.engine == "echo":
        from .echo_engine import EchoEngine

        logger.warning("ENGINE=echo: no model runs; every job is answered with its own prompt (tests only)")
        return EchoEngine(model_dir, max_batch=settings.max_batch)
    from .engine import Engine

    with loading_progress(model_dir):
        return Engine(model_dir, device=settings.device, dtype=settings.dtype, max_batch=settings.max_batch)


@contextlib.contextmanager
def loading_progress(model_dir: str, every_s: float = 10.0):
    """Log what is being loaded, a line every `every_s` while it loads (an 8B model takes minutes), and the time."""
    weights = [entry for entry in os.scandir(model_dir)
               if entry.is_file() and entry.name.endswith((".safetensors", ".bin", ".pt"))]
    total_gib = sum(entry.stat().st_size for entry in weights) / 2**30
    logger.info("loading model weights: %d file(s), %.2f GiB from %s", len(weights), total_gib, model_dir)
    started = time.monotonic()

    def still_loading() -> None:
        logger.info("still loading the model (%.0f s so far)", time.monotonic() - started)

    with PeriodicReporter(every_s, still_loading, thread_name="llamaq-loading"):
        yield
    logger.info("model loaded in %.1f s", time.monotonic() - started)


def main() -> int:
    settings = WorkerSettings()
    configure_logging("worker", settings.log_level, settings.log_format)
    model_dir = resolve_model_dir(settings)
    logger.info("loading %s on %s as %s (max batch %d)", model_dir, settings.device, settings.dtype, settings.max_batch)
    # Loaded once, in this process, before anything else happens; SimpleWorker never forks.
    engine = build_engine(settings, model_dir)
    name = served_model_name(settings)
    metrics = WorkerMetrics(engine.device_memory)
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
            logger.info("metrics on :%d/metrics", settings.metrics_port)
        except OSError as exc:  # a second worker on the same host; its series still reach the gateway's /metrics
            logger.warning("metrics port %d unavailable (%s); serving none", settings.metrics_port, exc)

    connection = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    tokenizer = engine.tokenizer
    model = model_mapping(
        {
            "name": name,
            "context_length": engine.context_length,
            "chat_template": tokenizer.chat_template,
            "special_tokens": tokenizer.special_tokens_map,
            "defaults": engine.defaults,
        },
        tokenizer.backend_tokenizer.to_str(),
    )
    publish_model(connection, model)
    info = WorkerInfo(
        name=settings.worker_name, model=name, device=settings.device, dtype=settings.dtype,
        max_batch=settings.max_batch, pid=os.getpid(), started_at=utc_now(),
    )
    # Each beat also publishes the model card again if Redis has lost it.
    heartbeat = Heartbeat(settings.redis_url, info, settings.heartbeat_s, model, metrics.exposition)
    heartbeat.beat()
    heartbeat.start()
    logger.info("model %s ready; serving queue %s as %s", name, settings.queue_name, settings.worker_name)

    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    worker = BatchWorker(
        [queue], engine=engine, settings=settings, metrics=metrics, connection=connection, serializer=JSONSerializer,
        name=settings.worker_name, log_job_description=False,
    )
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
