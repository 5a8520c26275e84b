"""What this worker tells Redis about itself: the loaded model's card and a heartbeat for /readyz."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from llamaq_protocol import ModelCard, WorkerInfo
from llamaq_protocol import keys

logger = logging.getLogger(__name__)


def model_mapping(card_fields: dict, tokenizer_json: str) -> dict[str, str]:
    """The `llamaq:model:<name>` hash: the card, and the tokenizer the gateway counts prompt tokens with."""
    card = ModelCard(**card_fields, tokenizer_digest=hashlib.sha256(tokenizer_json.encode()).hexdigest())
    return {"card": card.model_dump_json(), "tokenizer_json": tokenizer_json}


def publish_model(client: redis.Redis, mapping: dict[str, str]) -> ModelCard:
    card = ModelCard.model_validate_json(mapping["card"])
    client.hset(keys.model(card.name), mapping=mapping)
    return card


class Heartbeat(threading.Thread):
    """Refreshes this worker's entry every `interval_s` on its own connection, so a long decoding step or an
    idle blocking dequeue never makes a healthy worker look dead.

    Given the model hash (`model_mapping`), each beat also checks that it is still in Redis and writes it again
    if not: a Redis restarted without persistence has lost it, and without it the gateway would never count a
    worker as ready again.
    """

    def __init__(
        self,
        redis_url: str,
        info: WorkerInfo,
        interval_s: float,
        model: dict[str, str] | None = None,
        metrics: Callable[[], bytes] | None = None,
    ):
        super().__init__(name="llamaq-heartbeat", daemon=True)
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._info = info
        self._interval_s = interval_s
        self._model = model
        # This worker's Prometheus exposition, stored with each beat for the gateway's /metrics.
        self._metrics = metrics
        self._stopped = threading.Event()

    def beat(self) -> None:
        ttl_s = max(60, int(self._interval_s * 10))
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(keys.worker(self._info.name), mapping=self._info.model_dump(mode="json"))
            pipe.expire(keys.worker(self._info.name), ttl_s)
            pipe.zadd(keys.WORKERS, {self._info.name: time.time()})
            if self._metrics is not None:
                pipe.set(keys.worker_metrics(self._info.name), self._metrics(), ex=ttl_s)
            if self._model is not None:
                pipe.exists(keys.model(self._info.model))
            replies = pipe.execute()
        if self._model is not None and not replies[-1]:
            logger.warning("model card of %s missing from Redis (restarted without its data?); publishing it again",
                           self._info.model)
            publish_model(self._client, self._model)

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                logger.warning("heartbeat failed (will retry): %s", exc)
            except Exception:  # a heartbeat thread that dies makes a healthy worker look dead: never let it
                logger.exception("heartbeat failed (will retry)")
            self._stopped.wait(self._interval_s)

    def stop(self) -> None:
        self._stopped.set()
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(keys.WORKERS, self._info.name)
                pipe.delete(keys.worker(self._info.name), keys.worker_metrics(self._info.name))
                pipe.execute()
        except redis.RedisError:
            pass  # its hash expires, and the gateway's sweeper drops its stale entry from the workers set
