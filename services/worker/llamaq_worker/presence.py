"""What this worker tells Redis about itself: the loaded model's card and a heartbeat for /readyz."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from llamaq_protocol import ModelCard, WorkerInfo
from llamaq_protocol import keys

logger = logging.getLogger(__name__)

# A loop stalled this many times STEP_STALL_S exits the process (its jobs were re-queued after the first).
STALL_EXIT_FACTOR = 2


def model_mapping(card_fields: dict, tokenizer_json: str) -> dict[str, str]:
    """The `llamaq:model:<name>` hash: the card, and the tokenizer the gateway counts prompt tokens with."""
    card = ModelCard(**card_fields, tokenizer_digest=hashlib.sha256(tokenizer_json.encode()).hexdigest())
    return {"card": card.model_dump_json(), "tokenizer_json": tokenizer_json}


def batch_stall_s(worker) -> float:
    """Seconds the worker's decoding loop has held jobs without starting a new step (`progress_at`, stamped by the
    loop each step); 0 while it holds none."""
    if not worker.slots:
        return 0.0
    return max(0.0, time.monotonic() - worker.progress_at)


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

    Beating from a thread of its own must not hide a wedged decoding loop (a hung `engine.step()`): once `watch`ed,
    it beats only while the loop makes progress. A loop that has held jobs without finishing a step for
    `stall_s` (STEP_STALL_S) gets no more beats, and its entry is withdrawn at once, so the gateway's lost-worker
    sweep re-queues its jobs within a sweep and the container healthcheck (which reads the same entries) fails.
    Should the loop move again, the beats resume (its old jobs are no longer its own: the job scripts refuse it);
    still stalled after STALL_EXIT_FACTOR times `stall_s`, the process exits for its supervisor to replace it.
    """

    def __init__(
        self,
        redis_url: str,
        info: WorkerInfo,
        interval_s: float,
        model: dict[str, str] | None = None,
    ):
        super().__init__(name="llamaq-heartbeat", daemon=True)
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._info = info
        self._interval_s = interval_s
        self._model = model
        self._stopped = threading.Event()
        # Seconds the decoding loop has held jobs without progress (see `watch`); None: not watched.
        self._stalled_for: Callable[[], float] | None = None
        self._stall_s = float("inf")
        self.stalled = False

    def watch(self, stalled_for: Callable[[], float], stall_s: float) -> None:
        """Beat only while `stalled_for()` (seconds the decoding loop has held jobs without progress; 0 when it holds
        none) stays within `stall_s`."""
        self._stall_s = stall_s
        self._stalled_for = stalled_for

    def _check_stall(self) -> bool:
        """True while the decoding loop is stalled (reported once; the entry withdrawn on every check)."""
        stalled_s = self._stalled_for() if self._stalled_for is not None else 0.0
        if stalled_s <= self._stall_s:
            if self.stalled:
                logger.warning("the decoding loop is moving again; heartbeat resumed")
                self.stalled = False
            return False
        if not self.stalled:
            self.stalled = True
            logger.error("the decoding loop has held jobs for %.0f s without finishing a step (STEP_STALL_S %.0f): "
                         "heartbeat stopped, so the lost-worker sweep re-queues its jobs", stalled_s, self._stall_s)
        self._withdraw()
        if stalled_s > STALL_EXIT_FACTOR * self._stall_s:
            # Its jobs went to other workers meanwhile; a process wedged for good (a hung kernel) must not sit on its
            # GPU: exit, for the supervisor (compose's restart policy, Kubernetes) to start a fresh worker.
            logger.error("the decoding loop is still stalled after %.0f s; exiting for a fresh worker", stalled_s)
            os._exit(1)
        return True

    def beat(self) -> None:
        # (Workers before issue 24 also stored their Prometheus text with each beat, `llamaq:metrics:<name>`, under
        # this TTL: one left behind by such a worker expires by itself. Metrics leave a worker on METRICS_PORT only.)
        ttl_s = max(60, int(self._interval_s * 10))
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(keys.worker(self._info.name), mapping=self._info.model_dump(mode="json"))
            pipe.expire(keys.worker(self._info.name), ttl_s)
            pipe.zadd(keys.WORKERS, {self._info.name: time.time()})
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
                if not self._check_stall():
                    self.beat()
            except redis.RedisError as exc:
                logger.warning("heartbeat failed (will retry): %s", exc)
            except Exception:  # a heartbeat thread that dies makes a healthy worker look dead: never let it
                logger.exception("heartbeat failed (will retry)")
            self._stopped.wait(self._interval_s)

    def stop(self) -> None:
        self._stopped.set()
        self._withdraw()

    def _withdraw(self) -> None:
        """This worker out of the workers set, as if it had died."""
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(keys.WORKERS, self._info.name)
                pipe.delete(keys.worker(self._info.name))
                pipe.execute()
        except redis.RedisError:
            pass  # its hash expires, and the gateway's sweeper drops its stale entry from the workers set
