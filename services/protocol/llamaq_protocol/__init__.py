"""Models and Redis conventions shared by the llamaq gateway and worker. Depends on pydantic only."""

from .models import (
    DEFAULT_SYSTEM_PROMPT,
    ChatMessage,
    ErrorBody,
    ErrorDetail,
    FinishReason,
    GenerationParams,
    Job,
    JobError,
    JobOutput,
    JobPayload,
    JobStatus,
    ModelCard,
    Usage,
    WorkerInfo,
    utc_now,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ChatMessage",
    "ErrorBody",
    "ErrorDetail",
    "FinishReason",
    "GenerationParams",
    "Job",
    "JobError",
    "JobOutput",
    "JobPayload",
    "JobStatus",
    "ModelCard",
    "Usage",
    "WorkerInfo",
    "utc_now",
]
