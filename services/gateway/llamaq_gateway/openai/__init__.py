"""The OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) translated to and from
llamaq jobs: same queue, same parameters, same limits. The routes are in routers/openai.py; here, by concern:

- requests.py: the request bodies (pydantic), and Kind (chat or text completion)
- params.py: a request as the job's GenerationParams, with the refusals (400) of what llamaq does not offer
- tools.py: tools, tool_choice and the tool turns of a conversation, on the way in
- structured.py: response_format and vLLM's structured_outputs, as the job's constraint
- logprobs.py: log probabilities in OpenAI's shapes
- render.py: the answer of a finished job (completion and model objects, usage) and Rendering
- streaming.py: `stream: true`, a job's events as OpenAI's chunks
- respond.py: one request end to end (prepare, then respond), shared with the Batch API
"""

from .params import OPENAI_PARAM_NAMES, chat_messages, check_model, template_messages, to_params
from .render import Rendering, completion, model_object, models_list
from .requests import CHAT, TEXT, ChatCompletionRequest, ChatMessageIn, CompletionRequest, Kind
from .respond import prepare, respond
from .streaming import DONE, ChunkBuilder, stream_completion

__all__ = [
    "CHAT",
    "DONE",
    "OPENAI_PARAM_NAMES",
    "TEXT",
    "ChatCompletionRequest",
    "ChatMessageIn",
    "ChunkBuilder",
    "CompletionRequest",
    "Kind",
    "Rendering",
    "chat_messages",
    "check_model",
    "completion",
    "model_object",
    "models_list",
    "prepare",
    "respond",
    "stream_completion",
    "template_messages",
    "to_params",
]
