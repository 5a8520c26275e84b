"""The function path the gateway enqueues (`llamaq_protocol.keys.GENERATE_FUNC`).

The llamaq batch worker never calls it: it recognises the path and hands the job to the engine, so many
jobs share one forward pass. A plain `rq worker` that picks such a job up fails it with this message.
"""


def generate(payload: dict) -> dict:
    """The function RQ enqueues for every llamaq job and no one runs: the batch worker takes its jobs by this path
    (`GENERATE_FUNC`) without calling it. Only a plain `rq worker` would, and then the job fails with this error."""
    raise RuntimeError("llamaq jobs run on the llamaq batch worker (`python -m llamaq_worker`), not a plain rq worker")
