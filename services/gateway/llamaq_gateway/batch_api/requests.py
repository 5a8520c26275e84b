"""The request body of `POST /v1/batches` (the files' upload is a multipart form, read in routers/batch_api.py)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidParameter


class BatchRequest(BaseModel):
    """`POST /v1/batches`."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    # OpenAI's bounds: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, Any] | None = Field(default=None, max_length=16)

    def checked_metadata(self) -> dict[str, str] | None:
        if self.metadata is None:
            return None
        for key, value in self.metadata.items():
            if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
                raise InvalidParameter("metadata: at most 16 string values, keys up to 64 and values up to 512 "
                                       "characters", param="metadata")
        return self.metadata
