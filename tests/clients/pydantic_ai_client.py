"""pydantic-ai agents through the stack (OpenAIChatModel: chat completions): `python pydantic_ai_client.py BASE_URL
MODEL CASE`, CASE one of
- output: `output_type` a pydantic model, as pydantic-ai sends it by default (an output tool the model must call);
- native: `NativeOutput(City)` (response_format json_schema);
- tool: one function tool, called on the first step (tool_choice naming it), then a text answer.
Prints one JSON line: the validated output and the run's messages in short, or the error."""

import json
import sys
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelResponse, ToolCallPart, ToolReturnPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings


class City(BaseModel):
    name: str
    country: str


PROMPT = 'Paris is the capital of France. Extract the city and its country, as {"name": ..., "country": ...}.'
WEATHER_PROMPT = "What is the weather in Paris?"


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny, 21 C in {city}"


@dataclass
class CallWeatherFirst(AbstractCapability):
    """The first request names the tool (the small model would seldom call it unasked); later ones leave it free."""

    def get_model_settings(self):
        return lambda ctx: ModelSettings(tool_choice=["get_weather"] if ctx.run_step <= 1 else "none")


def summary(messages) -> list:
    out = []
    for message in messages:
        for part in message.parts:
            if isinstance(part, ToolCallPart):
                out.append({"tool_call": part.tool_name, "args": part.args_as_dict()})
            elif isinstance(part, ToolReturnPart):
                out.append({"tool_return": part.tool_name, "content": str(part.content)})
            elif isinstance(message, ModelResponse):
                out.append({"response": type(part).__name__, "content": str(getattr(part, "content", ""))[:200]})
    return out


base_url, model_name, case = sys.argv[1:4]
model = OpenAIChatModel(model_name, provider=OpenAIProvider(base_url=base_url, api_key="unused"))
# One call per turn: with parallel calls allowed, "required" lets the small model repeat its call until max_tokens.
settings = ModelSettings(temperature=0, max_tokens=64, timeout=120, parallel_tool_calls=False)
if case == "output":
    agent, prompt = Agent(model, output_type=City, model_settings=settings, retries=0), PROMPT
elif case == "native":
    agent, prompt = Agent(model, output_type=NativeOutput(City), model_settings=settings, retries=0), PROMPT
else:
    agent = Agent(model, output_type=str, tools=[get_weather], model_settings=settings, retries=0,
                  capabilities=[CallWeatherFirst()])
    prompt = WEATHER_PROMPT
try:
    result = agent.run_sync(prompt)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
    sys.exit(1)
output = result.output.model_dump() if isinstance(result.output, BaseModel) else result.output
print(json.dumps({"type": type(result.output).__name__, "output": output, "messages": summary(result.all_messages())}))
