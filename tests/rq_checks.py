"""What RQ itself says about a job (what `rq info` and RQ's registries show)."""

import time

from rq.job import Job as RQJob
from rq.serializers import JSONSerializer


def wait_for_rq_status(store, job_id: str, wanted: str, timeout_s: float = 5) -> RQJob:
    """RQ's bookkeeping is written right after the job record, so it may trail it by a moment."""
    rq_job = RQJob.fetch(job_id, connection=store, serializer=JSONSerializer)
    deadline = time.monotonic() + timeout_s
    while rq_job.get_status() != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rq_job.get_status() == wanted
    return rq_job
