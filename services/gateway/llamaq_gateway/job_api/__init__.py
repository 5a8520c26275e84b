"""llamaq's own job API: `/v1/jobs` (submit, list, poll, cancel, `/events`), `/v1/generate` and the original
`POST /`. The routes are in routers/jobs.py, routers/events.py, routers/generate.py and routers/legacy.py; here:

- requests.py: the request and response bodies (pydantic), the job id path parameter, and the webhook fields that
  the Responses API takes too
"""

from .requests import GenerateRequest, JobId, JobRequest, LegacyResponse, WebhookFields

__all__ = ["GenerateRequest", "JobId", "JobRequest", "LegacyResponse", "WebhookFields"]
