"""OpenAI's Agents SDK (openai-agents) on chat completions (`OpenAIChatCompletionsModel`, not the Responses API)
with one `@function_tool`, through the stack: `python openai_agents_client.py BASE_URL MODEL [stream]` (`stream`:
`Runner.run_streamed`, the tool call read from streamed deltas). The first turn has tool_choice "required" (the SDK
resets it to auto once the tool has run, so the next turn answers). Prints one JSON line: the final output and the
run's items in short, or the error."""

import asyncio
import json
import sys

from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                    set_tracing_disabled)
from openai import AsyncOpenAI

set_tracing_disabled(True)


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny, 21 C in {city}"


async def main(base_url: str, model_name: str, stream: bool) -> dict:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    agent = Agent(
        name="weather", instructions="You answer questions about the weather.", tools=[get_weather],
        model=OpenAIChatCompletionsModel(model=model_name, openai_client=client),
        # One call per turn: with parallel calls allowed, "required" lets the small model repeat its call up to
        # max_tokens.
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64),
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
    return {"final_output": result.final_output, "items": items}


try:
    out = asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:4] == ["stream"]))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
    sys.exit(1)
print(json.dumps(out))
