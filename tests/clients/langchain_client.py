"""langchain-openai's ChatOpenAI through the stack: `python langchain_client.py BASE_URL MODEL CASE`, CASE one of
- bind_tools: one tool bound with tool_choice "any" (sent as "required") and parallel_tool_calls false (else the
  small model repeats its call until max_tokens): the message's parsed `tool_calls`;
- json_schema, function_calling, json_mode: `with_structured_output(City, method=CASE, include_raw=True)`.
Prints one JSON line of what langchain parsed, or the error."""

import json
import sys

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel


class City(BaseModel):
    """A city and the country it is in."""

    name: str
    country: str


PROMPT = 'Paris is the capital of France. Extract the city and its country, as {"name": ..., "country": ...}.'


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny, 21 C in {city}"


base_url, model, case = sys.argv[1:4]
llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=64, max_retries=0,
                 timeout=120)
try:
    if case == "bind_tools":
        bound = llm.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False)
        message = bound.invoke("What is the weather in Paris?")
        out = {"tool_calls": [{"name": c["name"], "args": c["args"], "id": c["id"]} for c in message.tool_calls],
               "invalid_tool_calls": message.invalid_tool_calls,
               "finish_reason": message.response_metadata.get("finish_reason")}
    else:
        result = llm.with_structured_output(City, method=case, include_raw=True).invoke(PROMPT)
        parsed = result["parsed"]
        out = {"type": type(parsed).__name__, "parsed": parsed.model_dump() if parsed is not None else None,
               "parsing_error": repr(result["parsing_error"]) if result["parsing_error"] else None,
               "raw_content": result["raw"].content, "raw_tool_calls": result["raw"].tool_calls}
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
    sys.exit(1)
print(json.dumps(out))
