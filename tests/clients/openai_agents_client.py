"""OpenAI's Agents SDK (openai-agents) with one `@function_tool`, through the stack:
`python openai_agents_client.py BASE_URL MODEL API [stream]`, API being

- `chat`: `OpenAIChatCompletionsModel` on /v1/chat/completions;
- `responses`: the SDK's default model, `OpenAIResponsesModel` on /v1/responses, with the SDK's default client and the
  model a plain name, as an application that only points the SDK at another base URL has it (the SDK sends the whole
  conversation as `input` each turn, the tool's function_call and function_call_output items included).

`stream`: `Runner.run_streamed`, the call and the answer read from the streamed deltas or events. The first turn has
tool_choice "required" (the SDK resets it once the tool has run, so the next turn answers). Prints one JSON line:
the final output, the run's items in short and the model class the run used, or the error."""

import asyncio
import json
import sys

from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_default_openai_api,
                    set_default_openai_client, set_tracing_disabled)
from agents.models.multi_provider import MultiProvider
from openai import AsyncOpenAI

set_tracing_disabled(True)


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny, 21 C in {city}"


async def main(base_url: str, model_name: str, api: str, stream: bool) -> dict:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    if api == "responses":
        set_default_openai_client(client, use_for_tracing=False)
        set_default_openai_api("responses")
        model = model_name  # a name: the default provider makes it an OpenAIResponsesModel on the client above
    else:
        model = OpenAIChatCompletionsModel(model=model_name, openai_client=client)
    agent = Agent(
        name="weather", instructions="You answer questions about the weather.", tools=[get_weather], model=model,
        # One call per turn: with parallel calls allowed, "required" lets the small model repeat its call up to
        # max_tokens. A response cut at max_output_tokens is "incomplete", which the SDK raises on, so the answer
        # turn has room to end by itself.
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0,
                                     max_tokens=128),
    )
    if stream:
        result = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=4)
        async for _ in result.stream_events():
            pass
    else:
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    items = []
    for item in result.new_items:
        raw = item.raw_item
        if item.type == "tool_call_item":
            items.append({"tool_call": raw.name, "arguments": raw.arguments})
        elif item.type == "tool_call_output_item":
            items.append({"tool_output": item.output})
        else:
            items.append({"item": item.type})
    model_class = type(model if api == "chat" else MultiProvider().get_model(model_name)).__name__
    return {"final_output": result.final_output, "items": items, "model_class": model_class}


try:
    out = asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:5] == ["stream"]))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
    sys.exit(1)
print(json.dumps(out))
