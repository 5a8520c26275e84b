"""Claiming from the priority queues in order (interactive before batch) without giving up RQ's safety net.

rq 2.x moves a popped id onto the queue's intermediate list (LMOVE) only when a worker serves one queue; over
several it pops with plain LPOP/BLPOP, so a worker killed between the pop and the claim would lose the job. Here
every pop is an LMOVE onto that queue's intermediate list, whichever queue it comes from (the gateway's sweep
rescues ids stranded there), tried in the workers' queue order. Redis has no blocking move over several lists:
an idle worker blocks on the first (interactive) queue for at most BATCH_POLL_S at a time and looks at the others
in between, so an interactive job still wakes it at once and a batch job waits at most that long for an idle one.
"""

from __future__ import annotations

import time

from rq import Queue
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.utils import as_text

# Longest an idle worker blocks on the interactive queue before it looks at the batch queue again.
BATCH_POLL_S = 0.5


class PriorityQueue(Queue):
    @classmethod
    def dequeue_any(cls, queues, timeout, connection, job_class=None, serializer=None, death_penalty_class=None):
        """The job at the front of the first non-empty queue, and its queue (RQ's contract: None when all are
        empty and `timeout` is None, DequeueTimeout when `timeout` seconds pass)."""
        queues = list(queues)
        job_cls = job_class or cls.job_class
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            popped = _move_first(connection, queues)
            if popped is None:
                if deadline is None:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DequeueTimeout(timeout, [q.key for q in queues])
                first = queues[0]
                wait = remaining if len(queues) == 1 else min(remaining, BATCH_POLL_S)
                job_id = connection.blmove(first.key, first.intermediate_queue_key, wait)
                if job_id is None:
                    continue
                popped = (first, as_text(job_id))
            queue, job_id = popped
            try:
                return job_cls.fetch(job_id, connection=connection, serializer=serializer), queue
            except NoSuchJobError:
                connection.lrem(queue.intermediate_queue_key, 1, job_id)  # expired meanwhile: nothing to run


def _move_first(connection, queues: list[Queue]) -> tuple[Queue, str] | None:
    for queue in queues:
        job_id = connection.lmove(queue.key, queue.intermediate_queue_key)
        if job_id is not None:
            return queue, as_text(job_id)
    return None
