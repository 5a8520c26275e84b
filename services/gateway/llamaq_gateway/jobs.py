"""Job submission, lookup, waiting and cancelling: everything the routers do with Redis and RQ."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import redis
import redis.exceptions
import redis.asyncio as aioredis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from llamaq_protocol import GenerationParams, Job, JobPayload, ModelCard, Priority, utc_now
from llamaq_protocol.models import CAPABILITY_LOGPROBS, CAPABILITY_PROMPT_LOGPROBS
from llamaq_protocol import keys
from llamaq_protocol.records import ADMIT_SCRIPT, CANCEL_SCRIPT, end_keys, job_from_record, new_record

from .callers import Caller, KeyLimits, bucket_state, duration, rate_headers, system_caller
from .constraints import check_constraints
from .event_hub import EventHub
from .errors import (
    IdempotencyConflict, InvalidParameter, InvalidRequest, JobNotFound, NoReadyWorker, PromptTooLong, QueueFull,
    RateLimited,
)
from .prompt_tokens import PromptCounter
from .rq_adapter import enqueue_commands, intermediate_key
from .settings import GatewaySettings

logger = logging.getLogger(__name__)

# Ids are ours (uuid4 hex); anything else cannot name a job, so it is a 404 before Redis is asked.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A record outlives a job that is never finished (a lost worker) long enough to be diagnosed, not forever.
UNFINISHED_RECORD_TTL_S = 7 * 24 * 3600
# An entry of an owner's job index (job_list.py) older than this cannot name a live record (UNFINISHED_RECORD_TTL_S,
# the longest a record lives); the set expires this long after its newest entry.
INDEX_TTL_S = 7 * 24 * 3600
# Waiting clients a queue position estimate looks at, least served first.
MAX_POSITION_CLIENTS = 1000
# A request already waiting on its job rides out a Redis restart this long (the job itself is safe) before 503.
REDIS_BLIP_S = 30.0
# Prompts shorter than this are counted on the event loop (well under a millisecond); longer ones in a thread.
INLINE_COUNT_CHARS = 4000
# How long the record read after a job's `done` is shared by the waiters that read that `done`.
ENDED_RECORD_SHARED_S = 5.0
# The served model's card is read from Redis at most this often (it changes only when a worker's model does).
MODEL_CARD_CACHE_S = 1.0

T = TypeVar("T")


class JobService:
    def __init__(self, settings: GatewaySettings, aio: aioredis.Redis, sync: redis.Redis, hub: EventHub):
        self.settings = settings
        self.aio = aio
        self.sync = sync
        # Every wait on a job's events goes through it: no Redis connection held per waiter.
        self.hub = hub
        # One RQ queue per priority (workers claim interactive jobs first); `queue` is the interactive one.
        self.queues = {
            priority: Queue(keys.queue_name(settings.queue_name, priority), connection=sync, serializer=JSONSerializer)
            for priority in Priority
        }
        self.queue = self.queues[Priority.interactive]
        self._counters: dict[tuple[str, str], PromptCounter] = {}
        self._card: ModelCard | None = None
        # Job id -> the read of its record after `done` (see `ended`).
        self._endings: dict[str, asyncio.Future] = {}
        self._card_read_at = float("-inf")
        self._admit = aio.register_script(ADMIT_SCRIPT)
        self._cancel = aio.register_script(CANCEL_SCRIPT)

    # ---- readiness -------------------------------------------------------------------------------------------

    def fresh_since(self) -> float:
        """The oldest heartbeat time of a worker still counted as alive."""
        return time.time() - self.settings.worker_stale_s

    async def ready_workers(self) -> list[str]:
        names = await self.aio.zrangebyscore(keys.WORKERS, self.fresh_since(), "+inf")
        return [n.decode() if isinstance(n, bytes) else n for n in names]

    async def served_model(self) -> ModelCard:
        """The model card of a ready worker (as of at most MODEL_CARD_CACHE_S ago), or 503 when none is ready."""
        if time.monotonic() - self._card_read_at < MODEL_CARD_CACHE_S and self._card is not None:
            return self._card
        for name in await self.ready_workers():
            model_name = await self.aio.hget(keys.worker(name), "model")
            if model_name:
                card_json = await self.aio.hget(keys.model(model_name.decode()), "card")
                if card_json:
                    self._card = ModelCard.model_validate_json(card_json)
                    self._card_read_at = time.monotonic()
                    return self._card
        raise NoReadyWorker("no worker has a model loaded and a fresh heartbeat")

    async def prompt_counter(self, card: ModelCard) -> PromptCounter:
        """The model's tokenizer and chat template (kept while its tokenizer is unchanged)."""
        cache_key = (card.name, card.tokenizer_digest)
        counter = self._counters.get(cache_key)
        if counter is None:
            tokenizer_json = await self.aio.hget(keys.model(card.name), "tokenizer_json")
            if tokenizer_json is None:
                raise NoReadyWorker(f"model {card.name} has no published tokenizer yet")
            counter = PromptCounter(card, tokenizer_json.decode())
            self._counters = {cache_key: counter}
        return counter

    # ---- submit ----------------------------------------------------------------------------------------------

    async def check_params(
        self, params: GenerationParams, card: ModelCard | None = None, names: dict[str, str] | None = None
    ) -> int:
        """Refuse before queueing what the model could not run; returns the prompt's token count.

        `card`: the served model's card when the caller has just read it (one read per request); `names`: the
        request's own field for each GenerationParams one, for the refusals' `param` (the OpenAI routes')."""
        check_max_new_tokens(params.max_new_tokens, self.settings.max_new_tokens_limit)
        if params.n > self.settings.max_n:
            raise InvalidRequest(f"n: at most {self.settings.max_n} choices per request (MAX_N)", param="n")
        if card is None:
            card = await self.served_model()
        check_capabilities(params, card, names)
        check_constraints(params, card, names)
        counter = await self.prompt_counter(card)
        check_token_ids(params, counter.vocab_size, names)
        if params.prompt_token_ids is not None:
            prompt_tokens = len(params.prompt_token_ids)
        elif not params.templated:  # raw text, tokenized as the worker does (special tokens added, no template)
            prompt = params.prompt or ""
            prompt_tokens = len(await tokenize_sized(len(prompt), counter.encode, prompt, True))
        else:
            messages, tools = params.chat_messages(), params.template_tools()
            try:
                prompt_tokens = await tokenize_sized(
                    sum(len(m.get("content") or "") for m in messages), counter.count, messages, tools
                )
            except Exception as exc:  # a template that refuses this conversation (e.g. roles out of order)
                raise InvalidRequest(f"messages: the model's chat template rejected them: {exc}") from exc
        if prompt_tokens > self.settings.max_prompt_tokens:
            raise PromptTooLong(
                f"prompt is {prompt_tokens} tokens; at most {self.settings.max_prompt_tokens} are accepted"
            )
        if prompt_tokens + params.max_new_tokens > card.context_length:
            raise PromptTooLong(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {card.context_length} tokens"
            )
        return prompt_tokens

    async def submit(
        self,
        params: GenerationParams,
        owner: str,
        request_id: str | None,
        idempotency_key: str | None = None,
        card: ModelCard | None = None,
        priority: Priority = Priority.interactive,
        webhook: dict[str, str] | None = None,
        caller: Caller | None = None,
        deadline: float | None = None,
    ) -> Job:
        """`webhook`: the record fields of the job's webhook (JobRequest.webhook_record). With an `idempotency_key`
        the same key and body give the same job (a different body is 400). `deadline`: see `enqueue`."""
        prompt_tokens = await self.check_params(params, card)
        job_id, _ = await self.enqueue(params, owner, request_id, idempotency_key, priority, webhook, caller=caller,
                                       prompt_tokens=prompt_tokens, deadline=deadline)
        return await self.get(job_id, owner)

    async def submit_and_wait(
        self,
        params: GenerationParams,
        owner: str,
        request_id: str | None,
        timeout_s: float,
        card: ModelCard | None = None,
        priority: Priority = Priority.interactive,
        webhook: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        caller: Caller | None = None,
        deadline: float | None = None,
    ) -> Job:
        """Queue a job and wait for it (see `wait`), reading its events from the moment it was queued; a retry under
        the same `idempotency_key` waits on the job its first try queued."""
        prompt_tokens = await self.check_params(params, card)
        job_id, queued_event_id = await self.enqueue(params, owner, request_id, idempotency_key, priority, webhook,
                                                     caller=caller, prompt_tokens=prompt_tokens, deadline=deadline)
        return await self.wait(job_id, owner, timeout_s, since=queued_event_id)

    async def enqueue(
        self,
        params: GenerationParams,
        owner: str,
        request_id: str | None,
        idempotency_key: str | None,
        priority: Priority = Priority.interactive,
        webhook: dict[str, str] | None = None,
        job_id: str | None = None,
        record_extra: dict[str, str] | None = None,
        body: str = "",
        caller: Caller | None = None,
        prompt_tokens: int = 0,
        deadline: float | None = None,
    ) -> tuple[str, bytes | None]:
        """Queue a job whose parameters `check_params` accepted (`prompt_tokens`: its count): the new job's id, and
        the id of its `queued` event. Should `idempotency_key` already name a job of this owner for the same body,
        that job's id and None instead (its events are read from wherever it is); another body is
        IdempotencyConflict (400).

        One script admits it (records.ADMIT_SCRIPT): the Idempotency-Key, the queue's bound and the caller's, the
        caller's rate limits, then every write (record, first event, owner's list, RQ's job record, the job in the
        caller's fair queue) at once, so no crash can leave a key held by no job or a bound exceeded.

        `job_id`: the caller's own (the Batch API's, one per line); `record_extra`: more fields of its record (the
        webhook's, a batch line's); `body`: more of the request an `idempotency_key` is bound to; `caller`: who is
        asking (scheduled, limited and counted as such); without one, the owner alone (the Batch API's driver).
        `deadline` (Unix time): past it the job never starts, or stops, and ends `canceled` (the sweep's
        `_cancel_past_deadlines`, CLAIM_SCRIPT); not part of the body an Idempotency-Key is bound to (a retry's
        `Cancel-After` gives another time)."""
        caller = caller or system_caller(owner)
        if deadline is not None and deadline <= time.time():
            raise InvalidParameter("deadline: it has passed already", param="deadline")
        digest = _digest(params, priority, webhook, body) if idempotency_key else ""
        if idempotency_key:
            existing = await self._idempotent_job(params, owner, idempotency_key, priority, webhook, body)
            if existing is not None:
                return existing.id, None
        job_id = job_id or uuid.uuid4().hex
        payload = JobPayload(job_id=job_id, params=params, request_id=request_id)
        limits = caller.limits
        # What the job may cost: reserved against the key's tokens per minute, and the unit of queue positions.
        cost = prompt_tokens + params.max_new_tokens * params.n
        if limits.tpm and cost > limits.tpm:
            raise InvalidRequest(f"this request reserves {cost} tokens (prompt + max tokens x n), more than this key's "
                                 f"{limits.tpm} tokens per minute (tpm): lower max tokens")
        queue = self.queues[priority]
        created_at = utc_now()
        record = {**new_record(created_at, request_id, owner, priority), **(webhook or {}), **(record_extra or {}),
                  "account": caller.account, "prompt_tokens": str(prompt_tokens), "cost": str(cost),
                  "resumable": "1" if params.resumable() else "0",
                  "fq_hold": intermediate_key(queue)}
        if deadline is not None:
            record["deadline"] = f"{deadline:.3f}"
        base = self.settings.queue_name
        # Each priority has its own bound, so a batch backlog never refuses an interactive submission.
        bound = self.settings.max_batch_queue if priority is Priority.batch else self.settings.max_queue
        over_tier = keys.fair_tier(base, "over") if limits.over_limit == "queue" else ""
        commands = [arg for command in self._rq_enqueue_commands(payload, queue) if command[:2] != ("RPUSH", queue.key)
                    for arg in (len(command), *command)]
        idem_key = keys.idempotency(owner, idempotency_key) if idempotency_key else keys.job(job_id)
        # The script runs whole or not at all; should only its reply be lost, a retry under the same Idempotency-Key
        # finds the job it queued.
        outcome = await self._admit(
            keys=[keys.job(job_id), keys.events(job_id), keys.owner_jobs(caller.list_owner), idem_key,
                  keys.rate_bucket(caller.client), keys.usage(caller.client)],
            args=[job_id, f"{job_id}:{digest}" if idempotency_key else "", self.settings.result_ttl_s,
                  json.dumps(record), UNFINISHED_RECORD_TTL_S, created_at.timestamp(), INDEX_TTL_S,
                  keys.fair_tier(base, priority.value), bound, over_tier,
                  caller.client, caller.weight, self._client_queue_bound(limits, bound), limits.max_concurrent,
                  limits.rpm, limits.tpm, cost, *commands],
        )
        kind = outcome[0].decode()
        if kind == "existing":
            stored_id, _, stored_digest = outcome[1].decode().partition(":")
            if stored_digest != digest:
                raise IdempotencyConflict("Idempotency-Key was already used with a different body")
            return stored_id, None
        if kind == "queue_full":
            raise QueueFull(f"the {priority.value} queue holds {int(outcome[1])} jobs already; retry later")
        if kind == "key_queue_full":
            raise QueueFull(f"this client has {int(outcome[1])} jobs waiting already, its most; retry later")
        caller.rate_headers = rate_headers(*(int(v) for v in outcome[3:9]))
        if kind == "rate_limited":
            which, wait_ms = outcome[1].decode(), int(outcome[2])
            raise RateLimited(
                f"rate limit reached for {which} per minute (key {caller.client}); retry in {duration(wait_ms)}",
                retry_after_s=max(1, math.ceil(wait_ms / 1000)),
            )
        logger.info("job queued", extra={"job_id": job_id, "request_id": request_id})
        return job_id, outcome[1]  # the `queued` event's id

    def _client_queue_bound(self, limits: KeyLimits, tier_bound: int) -> int:
        """How many jobs one client may have waiting: its key's `max_queued`, and never so many that it alone fills
        a tier (MAX_CLIENT_SHARE of its bound)."""
        share = max(1, int(tier_bound * self.settings.max_client_share))
        return min(limits.max_queued, share) if limits.max_queued else share

    async def _idempotent_job(
        self, params: GenerationParams, owner: str, key: str, priority: Priority = Priority.interactive,
        webhook: dict[str, str] | None = None, body: str = "",
    ) -> Job | None:
        stored = await self.aio.get(keys.idempotency(owner, key))
        if stored is None:
            return None
        job_id, _, digest = stored.decode().partition(":")
        if digest != _digest(params, priority, webhook, body):
            raise IdempotencyConflict("Idempotency-Key was already used with a different body")
        try:
            return await self.get(job_id, owner)
        except JobNotFound:
            return None  # the earlier job expired: the key is free again

    def _rq_enqueue_commands(self, payload: JobPayload, queue: Queue) -> list[tuple]:
        """RQ's commands for enqueueing the job (its job hash, the queue's registration, the push), collected by
        RQ itself in a pipeline that is never executed: RQ's client is synchronous, and this way a submission
        needs no worker thread and no second connection, and RQ's records stay RQ's own."""
        return enqueue_commands(
            self.sync, queue,
            func=keys.GENERATE_FUNC,
            args=(payload.model_dump(mode="json"),),
            timeout=self.settings.job_timeout_s,
            result_ttl=self.settings.result_ttl_s,
            failure_ttl=self.settings.result_ttl_s,
            job_id=payload.job_id,
            # RQ shows the description in `rq info` and logs: never the prompt.
            description=f"llamaq.generate {payload.job_id}",
        )

    async def queued(self, priority: Priority) -> int:
        """How many jobs of this priority wait (in its fair queue tier)."""
        return await self.aio.llen(keys.fair_tier(self.settings.queue_name, priority.value) + ":depth")

    async def usage(self, caller: Caller) -> dict:
        """The caller's usage so far (counted as its jobs are admitted, claimed and generate), its jobs running and
        waiting now, its weight and limits, and the rate budget left (GET /v1/usage)."""
        tiers = keys.fair_tiers(self.settings.queue_name)
        async with self.aio.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.usage(caller.client))
            pipe.hget(keys.FAIR_RUNNING, caller.client)
            for tier in tiers:
                pipe.llen(keys.fair_jobs(tier, caller.client))
            pipe.hgetall(keys.rate_bucket(caller.client))
            used, running, *waiting, bucket = await pipe.execute()
        used = {k.decode(): int(v) for k, v in used.items()}
        limits = caller.limits
        body = {
            "object": "usage",
            "key": caller.account if caller.keyed else None,
            "requests": used.get("requests", 0),
            "prompt_tokens": used.get("prompt_tokens", 0),
            "completion_tokens": used.get("completion_tokens", 0),
            "running": int(running or 0),
            "queued": sum(waiting),
            "weight": caller.weight,
            "limits": limits.model_dump(),
        }
        if limits.rpm or limits.tpm:
            body["remaining"] = {name: left for name, (left, _) in bucket_state(bucket, limits).items()}
        return body

    # ---- read ------------------------------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str) -> Job:
        if not JOB_ID_PATTERN.match(job_id):
            raise JobNotFound(f"no job {job_id!r}")
        return await self.job_of(job_id, await self.aio.hgetall(keys.job(job_id)), owner)

    async def ended(self, job_id: str, owner: str) -> Job:
        """The job once its `done` event has been read. Every waiter of this process that reads that `done` (a
        thousand streams on one job) shares one read of the record, which no longer changes."""
        read = self._endings.get(job_id)
        if read is None:
            read = asyncio.ensure_future(self.aio.hgetall(keys.job(job_id)))
            self._endings[job_id] = read
            read.add_done_callback(lambda _: asyncio.get_running_loop().call_later(
                ENDED_RECORD_SHARED_S, self._endings.pop, job_id, None))
        try:
            record = await asyncio.shield(read)
        except Exception:
            if self._endings.get(job_id) is read:
                del self._endings[job_id]  # the next waiter reads again
            raise
        return await self.job_of(job_id, record, owner)

    async def job_of(self, job_id: str, record: dict, owner: str) -> Job:
        if not record or record.get(b"owner", b"").decode() != owner:
            raise JobNotFound(f"no job {job_id!r}")
        position = None
        if record.get(b"status") == b"queued":
            position = (await queue_positions(self, [(job_id, record)])).get(job_id)
        return job_from_record(job_id, record, position)

    async def wait(self, job_id: str, owner: str, timeout_s: float, since: bytes | None = None) -> Job:
        """The job once terminal, or as it is when `timeout_s` runs out; wakes on the job's event stream.

        `since`: the id of an event of this job's stream known to be no later than its current state (the job
        was just queued by this caller), which spares reading the stream's tail and the job before waiting.
        """
        events_key = keys.events(job_id)
        job: Job | None = None
        if since is None:
            latest = await self.aio.xrevrange(events_key, count=1) if JOB_ID_PATTERN.match(job_id) else []
            last_id = latest[0][0] if latest else b"0-0"
            # Read the record after taking the stream position: a change made after that wakes the wait below.
            job = await self.get(job_id, owner)
        else:
            last_id = since
        deadline = time.monotonic() + timeout_s
        # Only an ending changes what this returns: `running` and tokens do not wake it. A Redis outage meanwhile
        # is ridden out (the hub reads on from where it was) until the hub has gone REDIS_BLIP_S without it.
        if job is None or not job.status.is_terminal():
            with await self.hub.subscribe(events_key, last_id, done_only=True) as subscription:
                while job is None or not job.status.is_terminal():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if await subscription.next_batch(remaining):
                        job = await self.ended(job_id, owner)
        if job is None or not job.status.is_terminal():
            job = await self.get(job_id, owner)  # the wait ran out: the job as it is now
        return job

    # ---- cancel ----------------------------------------------------------------------------------------------

    async def cancel(self, job_id: str, owner: str) -> Job:
        job = await self.get(job_id, owner)
        if job.status.is_terminal():
            return job
        outcome = await self._cancel(keys=end_keys(job_id),
                                     args=[utc_now().isoformat(), job_id, self.settings.result_ttl_s])
        if outcome == b"canceled":
            await anyio.to_thread.run_sync(self._cancel_queued_rq_job, job_id)
            logger.info("queued job canceled", extra={"job_id": job_id})
        elif outcome == b"running":
            # The worker stops it within one decoding step; answer once it has, if that is quick.
            return await self.wait(job_id, owner, timeout_s=5)
        return await self.get(job_id, owner)

    def _cancel_queued_rq_job(self, job_id: str) -> None:
        try:
            RQJob.fetch(job_id, connection=self.sync, serializer=JSONSerializer).cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass  # already claimed: the worker sees the canceled record and closes the RQ job itself


# ---- queue positions ------------------------------------------------------------------------------------------


async def queue_positions(jobs: JobService, queued: list[tuple[str, dict]]) -> dict[str, int | None]:
    """The 0-based places in the claim order of these queued jobs (id, record): the jobs of earlier tiers (every
    queued interactive job is ahead of a batch one, and those that arrive later too: its position can grow), its own
    client's jobs ahead of it, and of every other waiting client as many as the fair share will claim first. That is
    an estimate: a client's service grows by what its jobs really generate, counted as if each job cost this one's
    tokens (prompt + max tokens), weighted by each client's weight."""
    if not queued:
        return {}
    base = jobs.settings.queue_name
    tiers = keys.fair_tiers(base)
    wanted = {}
    for job_id, record in queued:
        tier, client = record.get(b"fq_tier", b"").decode(), record.get(b"client", b"").decode()
        if tier in tiers:
            wanted[job_id] = (tier, client, float(record.get(b"cost") or 1) or 1.0)
    if not wanted:
        return {}
    used = sorted({tier for tier, _, _ in wanted.values()}, key=tiers.index)
    async with jobs.aio.pipeline(transaction=False) as pipe:
        for tier in tiers:
            pipe.llen(tier + ":depth")
        for tier in used:
            pipe.zrange(tier + ":clients", 0, MAX_POSITION_CLIENTS - 1)
        for job_id, (tier, client, _) in wanted.items():
            pipe.lpos(keys.fair_jobs(tier, client), job_id)
        replies = await pipe.execute()
    depth = {tier: int(count or 0) for tier, count in zip(tiers, replies)}
    members = {tier: [m.decode() for m in found] for tier, found in zip(used, replies[len(tiers):])}
    places = replies[len(tiers) + len(used):]
    clients = sorted({c for found in members.values() for c in found} | {c for _, c, _ in wanted.values()})
    async with jobs.aio.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.FAIR_SERVICE, clients)
        pipe.hmget(keys.FAIR_WEIGHT, clients)
        for tier in used:
            for client in members[tier]:
                pipe.llen(keys.fair_jobs(tier, client))
        service, weights, *lengths = await pipe.execute()
    service = {c: float(v or 0) for c, v in zip(clients, service)}
    weight = {c: float(v or 1) for c, v in zip(clients, weights)}
    waiting = {}
    for tier in used:
        for client in members[tier]:
            waiting[(tier, client)] = lengths[len(waiting)]
    positions: dict[str, int | None] = {}
    for (job_id, (tier, client, cost)), place in zip(wanted.items(), places):
        if place is None:
            positions[job_id] = None  # claimed meanwhile
            continue
        ahead = sum(depth[t] for t in tiers[:tiers.index(tier)]) + place
        # Its client's service when this job comes up; another client's jobs that start below it go first.
        reached = service[client] + place * cost / weight[client]
        for other in members[tier]:
            if other != client:
                first = math.ceil((reached - service[other]) * weight[other] / cost)
                ahead += min(max(first, 0), waiting[(tier, other)])
        positions[job_id] = ahead
    return positions


async def tokenize_sized(chars: int, tokenize: Callable[..., T], *args: Any) -> T:
    """Run `tokenize` on the event loop for short text (well under a millisecond), in a thread for long."""
    if chars < INLINE_COUNT_CHARS:
        return tokenize(*args)
    return await anyio.to_thread.run_sync(tokenize, *args)


def check_max_new_tokens(
    max_new_tokens: int, limit: int, field: str = "max_new_tokens", refusal: type[InvalidRequest] = InvalidRequest
) -> None:
    """The one cap on a job's new tokens. The OpenAI routes check it while translating, naming their own field
    (`max_tokens`, `max_completion_tokens`) and refusal, before the protocol's looser bound can answer instead."""
    if max_new_tokens > limit:
        raise refusal(f"{field}: must be at most {limit}", param=field)


def check_capabilities(params: GenerationParams, card: ModelCard, names: dict[str, str] | None = None) -> None:
    """400 before queueing for what the serving engine cannot do (its model card says what it can); `names`: the
    request's own field for each GenerationParams one (the OpenAI routes')."""
    for field in (CAPABILITY_LOGPROBS, CAPABILITY_PROMPT_LOGPROBS):
        if getattr(params, field) is not None and field not in card.capabilities:
            param = (names or {}).get(field, field)
            raise InvalidRequest(
                f"{param}: the {card.engine or 'serving'} engine of model {card.name} cannot compute log "
                "probabilities", param=param,
            )


def check_token_ids(params: GenerationParams, vocab_size: int, names: dict[str, str] | None = None) -> None:
    """Token ids the tokenizer does not have are refused before queueing; `names` as for check_capabilities."""
    for field in ("prompt_token_ids", "stop_token_ids", "logit_bias"):
        ids = getattr(params, field) or ()
        if any(i >= vocab_size for i in ids):
            param = (names or {}).get(field, field)
            raise InvalidRequest(f"{param}: token ids must be below the vocabulary size, {vocab_size}", param=param)


def _digest(
    params: GenerationParams, priority: Priority = Priority.interactive, webhook: dict[str, str] | None = None,
    body: str = "",
) -> str:
    """The body an Idempotency-Key is bound to (a plain interactive job's digest is that of its parameters); `body`:
    what else of the request it is bound to (a Responses request's own fields)."""
    bound = params.model_dump_json()
    if priority is not Priority.interactive:
        bound += f"|priority={priority.value}"
    if webhook:
        bound += f"|webhook={webhook['webhook']}|{webhook['webhook_events']}"
    if body:
        bound += f"|body={body}"
    return hashlib.sha256(bound.encode()).hexdigest()
