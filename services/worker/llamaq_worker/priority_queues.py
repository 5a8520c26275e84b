"""Claiming from llamaq's fair queue in RQ's place: interactive before batch before over-quota work, and within each
tier the least served client first (records.POP_SCRIPT; the gateway's admission puts jobs there).

RQ's queue lists stay empty: RQ pops FIFO, and fairness needs a choice between clients. What RQ keeps is the rest:
its job records, the intermediate list a popped id waits on until the claim (the gateway's sweep rescues ids
stranded there), the started, finished, failed and canceled registries, and its worker records (`rq info` shows the
workers and registries; the waiting jobs are in /metrics' llamaq_queue_depth). One POP_SCRIPT call pops and moves a
job onto its queue's intermediate list atomically. Redis has no blocking pop over a choice like this: an idle worker
blocks on the tiers' short wake lists (every admission pushes one) for at most WAKE_POLL_S at a time, then tries the
pop again, so a new job wakes it at once and a wake it missed costs at most that long.

A batch worker with room for interactive work only (its engine's headroom) pops from the interactive tier alone
(`tiers`): the pop looks at the tiers it is given, so its cost still follows the clients waiting in them.
"""

from __future__ import annotations

import time

from collections.abc import Sequence

from rq import Queue
from rq.exceptions import DequeueTimeout, NoSuchJobError

from llamaq_protocol import keys
from llamaq_protocol.records import POP_SCRIPT

from .rq_adapter import intermediate_key

# Longest an idle worker blocks on the wake lists before it tries the pop again.
WAKE_POLL_S = 0.5
# Clients of a tier one pop looks at per try, least served first (past those at their MAX_CONCURRENT).
POP_WIDTH = 16


class PriorityQueue(Queue):
    @classmethod
    def dequeue_any(cls, queues, timeout, connection, job_class=None, serializer=None, death_penalty_class=None,
                    tiers: Sequence[str] = keys.FAIR_TIERS):
        """The next job of the fair queue, and the RQ queue it runs from (RQ's contract: None when none waits and
        `timeout` is None, DequeueTimeout when `timeout` seconds pass). `queues`: the worker's, interactive first;
        the first one's name is the deployment's QUEUE_NAME. `tiers`: the tiers to take from (keys.FAIR_TIERS'
        names), all by default."""
        queues = list(queues)
        by_name = {queue.name: queue for queue in queues}
        tiers = [keys.fair_tier(queues[0].name, tier) for tier in keys.FAIR_TIERS if tier in tiers]
        job_cls = job_class or cls.job_class
        deadline = None if timeout is None else time.monotonic() + timeout
        pop = connection.register_script(POP_SCRIPT)  # (EVALSHA: the script's text is not sent on every pop)
        while True:
            job_id = pop(args=[POP_WIDTH, keys.job(""), *tiers])
            if job_id is None:
                if deadline is None:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DequeueTimeout(timeout, [q.key for q in queues])
                connection.blpop([tier + ":wake" for tier in tiers], min(remaining, WAKE_POLL_S))
                continue
            job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
            try:
                job = job_cls.fetch(job_id, connection=connection, serializer=serializer)
            except NoSuchJobError:
                # Its RQ record expired meanwhile: nothing to run (its own record ends with it).
                for queue in queues:
                    connection.lrem(intermediate_key(queue), 1, job_id)
                continue
            return job, by_name.get(job.origin, queues[0])
