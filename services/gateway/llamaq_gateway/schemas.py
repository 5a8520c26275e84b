"""HTTP-only request and response bodies; the wire models live in llamaq_protocol."""

from pydantic import BaseModel, Field

from llamaq_protocol import GenerationParams


class GenerateRequest(GenerationParams):
    wait_s: float = Field(default=60, ge=0, le=300, description="how long to hold the request for the result")


class LegacyResponse(BaseModel):
    """The original single-file server's answer, plus the job id."""

    response: str
    status: int = 200
    time: str
    id: str
