"""What RQ itself says about a job (what `rq info` and RQ's registries show)."""

from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from helpers import wait_until


def wait_for_rq_status(store, job_id: str, wanted: str, timeout_s: float = 5) -> RQJob:
    """RQ's bookkeeping is written right after the job record, so it may trail it by a moment."""
    rq_job = RQJob.fetch(job_id, connection=store, serializer=JSONSerializer)
    wait_until(lambda status: status == wanted, timeout_s, f"RQ to mark job {job_id} {wanted}",
               observe=rq_job.get_status)
    return rq_job
