"""vLLM's `/version`, `/tokenize` and `/detokenize` (the vllm_compat package: their bodies and the tokenizing)."""

from fastapi import APIRouter, Request

from ..deps import JobsDep, OwnerDep
from ..errors import OpenAIRoute, error_responses
from ..vllm_compat import (
    VLLM_DIALECT,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    tokens,
)

# OpenAIRoute: errors carry `param` and OpenAI's type names, as vLLM's own do.
router = APIRouter(tags=["vllm"], route_class=OpenAIRoute)


@router.get("/version", responses=error_responses(422))
async def version(request: Request, owner: OwnerDep) -> VersionResponse:
    """llamaq's version, and the vLLM dialect its vLLM-style endpoints speak."""
    return VersionResponse(version=request.app.version, vllm_api=VLLM_DIALECT)


@router.post("/tokenize", responses=error_responses(400, 404, 413, 422, 503))
async def tokenize(body: TokenizeRequest, jobs: JobsDep, owner: OwnerDep) -> TokenizeResponse:
    """The token ids the model would see: a prompt as plain text, or messages rendered with the chat template."""
    return await tokens.tokenize(body, jobs)


@router.post("/detokenize", responses=error_responses(400, 404, 413, 422, 503))
async def detokenize(body: DetokenizeRequest, jobs: JobsDep, owner: OwnerDep) -> DetokenizeResponse:
    """The text of these token ids, special tokens included (as vLLM decodes them)."""
    return await tokens.detokenize(body, jobs)
