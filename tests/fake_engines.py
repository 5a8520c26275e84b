"""A model-free engine for tests that run a real DecodingWorker against a real Redis (no model, no tokenizer), and jobs
queued on RQ's own list for a worker run with RQ's plain queue class (how jobs were queued before the fair queue)."""

from __future__ import annotations

import uuid

import redis
from rq import Queue

from llamaq_protocol import GenerationParams, JobPayload, keys, utc_now
from llamaq_protocol.records import new_record
from llamaq_worker.engines.base import PRIORITY_INTERACTIVE, SamplingParams, SequenceSlots


class FakeSeq:
    def __init__(self, seq_id: str) -> None:
        self.seq_id = seq_id
        self.canceled = False


class FakeEngine(SequenceSlots):
    """Every prompt is three tokens; subclasses say what `step` makes of the sequences added."""

    model_name = "fake"
    context_length = 2048
    defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    tokenizer = None

    def __init__(self) -> None:
        super().__init__(max_batch=4)
        self.seen: list[str] = []

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return [1, 2, 3]

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
            priority: int = PRIORITY_INTERACTIVE) -> None:
        self.seen.append(seq_id)
        self._enqueue(seq_id, lambda: FakeSeq(seq_id), priority)

    def device_memory(self) -> tuple[int, int]:
        return 0, 0


def queue_on_rq_list(r: redis.Redis, queue: Queue) -> str:
    """A job's record, its first event and RQ's enqueue onto the queue's own list; its id."""
    job_id = uuid.uuid4().hex
    r.hset(keys.job(job_id), mapping=new_record(utc_now(), None, "public"))
    r.xadd(keys.events(job_id), {"event": "status", "data": '{"status":"queued"}'})
    payload = JobPayload(job_id=job_id, params=GenerationParams(prompt="hi", max_new_tokens=8))
    queue.enqueue_call(func=keys.GENERATE_FUNC, args=(payload.model_dump(mode="json"),), job_id=job_id,
                       timeout=600, result_ttl=60, failure_ttl=60)
    return job_id
