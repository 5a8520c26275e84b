"""The only module of the gateway that knows RQ 2.12's internals (rq==2.12.0, pinned exactly in pyproject.toml) and
redis-py's: an RQ or redis-py upgrade checks what is listed here against the new release and changes this file.

Outside it the gateway uses RQ's public API only: `Queue` (name, key, started_job_registry), `Job` (fetch, key_for,
cancel, set_status), `FailedJobRegistry(...).add`, RQ's exceptions and JSONSerializer.

What this module relies on, none of it documented API:
- `Queue.intermediate_queue_key`: the list a popped job id waits on until its worker claims it (the fair queue's pop
  puts it there, a record's `fq_hold` names it, the sweeper rescues ids stranded on it).
- `Queue.enqueue_call(..., pipeline=)` writing every command of an enqueue into the pipeline it is given, and
  redis-py's `Pipeline.command_stack` (the commands a pipeline holds, each `(args, options)`), read without
  executing them.

The worker has an adapter of its own (llamaq_worker.rq_adapter), not this one: the gateway's image has no
llamaq_worker (nor torch), and llamaq_protocol, which both import, stays pydantic-only (no rq, no redis).
"""

from __future__ import annotations

import redis
from rq import Queue


def intermediate_key(queue: Queue) -> str:
    """The list a popped job id waits on until its claim."""
    return queue.intermediate_queue_key


def enqueue_commands(connection: redis.Redis, queue: Queue, **enqueue) -> list[tuple]:
    """The commands of RQ's `queue.enqueue_call(**enqueue)` (the job's hash, the queue's registration, the push), as
    RQ itself writes them into a pipeline that is never executed."""
    collector = connection.pipeline(transaction=True)
    collector.multi()
    queue.enqueue_call(**enqueue, pipeline=collector)
    commands = [args for args, _options in collector.command_stack]
    collector.reset()
    return commands
