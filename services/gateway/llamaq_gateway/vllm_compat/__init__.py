"""vLLM's server endpoints beside the OpenAI API (`/version`, `/tokenize`, `/detokenize`), as vLLM 0.32 shapes
them, for the benchmark and evaluation clients written against vLLM; `/health` is with the other probes. The routes
are in routers/vllm_compat.py; here:

- requests.py: the request and response bodies (pydantic), and VLLM_DIALECT (the vLLM release they follow)
- tokens.py: tokenize and detokenize with the served model's tokenizer, as the worker publishes it
"""

from .requests import (
    VLLM_DIALECT,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)

__all__ = [
    "VLLM_DIALECT",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "TokenizeRequest",
    "TokenizeResponse",
    "VersionResponse",
]
