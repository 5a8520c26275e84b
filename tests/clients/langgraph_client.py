"""langgraph's prebuilt ReAct agent (`create_react_agent`) with one tool, through the stack: `python
langgraph_client.py BASE_URL MODEL [SECOND_CHOICE]`. The model is chosen per step: the first step binds the tool
with tool_choice "any" (sent as "required": the small model would seldom call it unasked), later steps with
SECOND_CHOICE ("auto" by default: the parser reads the answer; "none"), so the run goes model -> tool -> model and
ends. Prints one JSON line: the run's messages in short, or the error."""

import json
import sys
import warnings

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

warnings.filterwarnings("ignore", category=DeprecationWarning)
from langgraph.prebuilt import create_react_agent  # noqa: E402  (deprecated for langchain's create_agent)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny, 21 C in {city}"


base_url, model = sys.argv[1:3]
second_choice = sys.argv[3] if len(sys.argv) > 3 else "auto"
llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=64, max_retries=0,
                 timeout=120)


def pick_model(state, runtime):
    called = any(isinstance(m, ToolMessage) for m in state["messages"])
    # One call per turn: with parallel calls allowed, "required" lets the small model repeat its call until max_tokens.
    return llm.bind_tools([get_weather], tool_choice=second_choice if called else "any", parallel_tool_calls=False)


agent = create_react_agent(pick_model, [get_weather])
try:
    state = agent.invoke({"messages": [("user", "What is the weather in Paris?")]}, {"recursion_limit": 6})
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
    sys.exit(1)
messages = []
for m in state["messages"]:
    entry = {"type": m.type, "content": m.content if isinstance(m.content, str) else json.dumps(m.content)}
    if isinstance(m, AIMessage):
        entry["tool_calls"] = [{"name": c["name"], "args": c["args"]} for c in m.tool_calls]
    if isinstance(m, ToolMessage):
        entry["name"] = m.name
    messages.append(entry)
print(json.dumps({"messages": messages}))
