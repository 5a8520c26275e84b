"""Agent frameworks and structured-output libraries, run unchanged against the real stack's /v1/chat/completions:
tool calling (`tools`, `tool_choice` required / named / auto, tool turns) and structured outputs (`response_format`
json_object / json_schema), as each library sends and parses them; and both OpenAI Agents SDKs on their default
model, which speaks the Responses API (/v1/responses: input items, function_call / function_call_output).

The stack is one of this module's own, started as production serves Llama 3.1: a chat template that renders
`tools` (tests/clients/chatml_tools.jinja: SmolLM2's ChatML with the tools written as vLLM's Llama 3.1 JSON
template writes them) and the `llama3_json` tool parser. The small model is weak, so each case asks on the first
step for what a grammar guarantees (tool_choice "required" or named, or a json_schema) at temperature 0, and the
assertions are on the shape of what the library parsed: a call of the right function whose arguments fit its
schema, a pydantic / zod object that validated, an agent run that called its tool and then answered.

Each client is a script under tests/clients/ run in its own interpreter (printing one JSON line): the Python
ones in `.venv-clients-agents` (openai 3.x, openai-agents, pydantic-ai, langchain-openai, langgraph) or
`.venv-clients-instructor` (instructor holds openai at 3.3), the Node ones with tests/clients/node/node_modules;
`make tools` makes all three. Nothing reaches a hub or any other network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest


ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ROOT / "tests" / "clients"
NODE_DIR = CLIENTS / "node"
AGENTS_VENV = ROOT / ".venv-clients-agents"
INSTRUCTOR_VENV = ROOT / ".venv-clients-instructor"
CLIENT_TIMEOUT_S = 120
# Tiers (the root conftest.py): a stack of its own, then a client process per case.
pytestmark = pytest.mark.slow

WEATHER_PREFIX = "sunny, 21 C in "  # what every client's get_weather tool returns, before the city


@pytest.fixture(scope="module")
def agent_stack(tool_stack):
    return tool_stack


@pytest.fixture(scope="module")
def base_url(agent_stack) -> str:
    return f"{agent_stack.url}/v1"


@pytest.fixture(scope="module")
def model() -> str:
    return Path(os.environ["LLAMAQ_TEST_MODEL"]).name


@pytest.fixture(scope="module")
def client_env(tmp_path_factory) -> dict[str, str]:
    """Offline, no tracing or telemetry, nothing of the test venv's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path_factory.mktemp("hf")), NO_COLOR="1",
        LANGCHAIN_TRACING_V2="false", LANGSMITH_TRACING="false", OPENAI_AGENTS_DISABLE_TRACING="1",
        DO_NOT_TRACK="1", NODE_NO_WARNINGS="1",
        # No proxy between the clients and the loopback stack.
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
    )
    return env


def python_of(venv: Path) -> str:
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists() or not python.exists():
        pytest.fail(f"{venv} is missing: run `make tools` (it makes {venv.name})", pytrace=False)
    return str(python)


def node() -> str:
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("node is not installed: the Node clients need Node.js 20 or newer", pytrace=False)
    if not (NODE_DIR / "node_modules" / ".installed").exists():
        pytest.fail(f"{NODE_DIR / 'node_modules'} is missing: run `make tools` (it runs npm ci there)", pytrace=False)
    return binary


def run_client(argv: list[str], env: dict[str, str], cwd: Path = CLIENTS) -> dict:
    """The client script's one JSON line; a failed run fails the test with what the script printed."""
    try:
        result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv[1]} {argv[4:]} ran past {CLIENT_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}", pytrace=False)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, (
        f"{Path(argv[1]).name} {argv[4:]} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-4000:]}"
    )
    out = json.loads(lines[-1])
    print(Path(argv[1]).name, argv[4:], "->", json.dumps(out)[:2000])
    return out


def assert_city(city: dict) -> None:
    """A City(name: str, country: str) that validated: exactly its two fields, both text."""
    assert set(city) == {"name", "country"}, city
    assert all(isinstance(city[key], str) and city[key].strip() for key in ("name", "country")), city


def assert_weather_arguments(arguments) -> None:
    """get_weather's arguments as its schema has them: an object with one string, `city`."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    assert isinstance(arguments, dict) and set(arguments) == {"city"}, arguments
    assert isinstance(arguments["city"], str) and arguments["city"].strip(), arguments


def test_stack_serves_the_model_by_its_folder_name(agent_stack, model):
    """The name every client sends is the model's, and a plain chat (no tools) answers through the template."""
    models = httpx.get(f"{agent_stack.url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [model]
    reply = httpx.post(f"{agent_stack.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0,
    })
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]


# --- 1. instructor ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["json", "json_schema", "tools"])
def test_instructor_extracts_a_pydantic_model(base_url, model, client_env, mode):
    """Mode.JSON (response_format json_object, the schema in the system prompt), Mode.JSON_SCHEMA and Mode.TOOLS
    (one tool, tool_choice naming it): a City that validated, with no retry (max_retries=0)."""
    out = run_client([python_of(INSTRUCTOR_VENV), str(CLIENTS / "instructor_client.py"), base_url, model, mode],
                     client_env)
    assert out["type"] == "City", out
    assert_city(out["city"])


# --- 2. pydantic-ai ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["output", "native"])
def test_pydantic_ai_agent_structured_output(base_url, model, client_env, case):
    """`output_type=City`: by default an output tool (`final_result`, tool_choice "required", `strict` schema);
    with NativeOutput a strict response_format json_schema. No retries: the first answer validated."""
    out = run_client([python_of(AGENTS_VENV), str(CLIENTS / "pydantic_ai_client.py"), base_url, model, case],
                     client_env)
    assert out["type"] == "City", out
    assert_city(out["output"])
    if case == "output":
        assert out["messages"][0]["tool_call"] == "final_result", out
        assert_city(out["messages"][0]["args"])
    else:
        assert out["messages"] == [{"response": "TextPart", "content": out["messages"][0]["content"]}], out
        assert json.loads(out["messages"][0]["content"]) == out["output"]


def test_pydantic_ai_agent_calls_its_tool_then_answers(base_url, model, client_env):
    """One function tool, named on the first step: the call, its result sent back as a tool turn, then a text
    answer (tool_choice "none" on that step)."""
    out = run_client([python_of(AGENTS_VENV), str(CLIENTS / "pydantic_ai_client.py"), base_url, model, "tool"],
                     client_env)
    call, returned, *answer = out["messages"]
    assert call["tool_call"] == "get_weather", out
    assert_weather_arguments(call["args"])
    assert returned == {"tool_return": "get_weather", "content": WEATHER_PREFIX + call["args"]["city"]}, out
    assert answer and answer[-1]["response"] == "TextPart", out
    assert isinstance(out["output"], str) and out["output"].strip(), out


# --- 3. langchain-openai ----------------------------------------------------------------------------------------

def test_langchain_bind_tools_gives_tool_calls(base_url, model, client_env):
    """`bind_tools([get_weather], tool_choice="any")` (sent as "required"): parsed `tool_calls`, none invalid."""
    out = run_client([python_of(AGENTS_VENV), str(CLIENTS / "langchain_client.py"), base_url, model, "bind_tools"],
                     client_env)
    assert out["tool_calls"] and out["invalid_tool_calls"] == [], out
    for call in out["tool_calls"]:
        assert call["name"] == "get_weather" and call["id"], out
        assert_weather_arguments(call["args"])
    assert out["finish_reason"] == "tool_calls", out


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(base_url, model, client_env, method):
    """`with_structured_output(City, method=...)`: json_schema (a strict response_format), function_calling (one
    tool, tool_choice naming it, parallel_tool_calls false), json_mode (response_format json_object)."""
    out = run_client([python_of(AGENTS_VENV), str(CLIENTS / "langchain_client.py"), base_url, model, method],
                     client_env)
    assert out["parsing_error"] is None and out["type"] == "City", out
    assert_city(out["parsed"])
    if method == "function_calling":
        assert [call["name"] for call in out["raw_tool_calls"]] == ["City"], out
    else:
        assert out["raw_tool_calls"] == [] and json.loads(out["raw_content"]) == out["parsed"], out


# --- 4. langgraph -----------------------------------------------------------------------------------------------

def test_langgraph_react_agent_runs_to_completion(base_url, model, client_env):
    """The prebuilt ReAct agent: model (tool required) -> tool -> model (tool_choice auto, the parser reads the
    answer) -> end, within a recursion limit of 6."""
    out = run_client([python_of(AGENTS_VENV), str(CLIENTS / "langgraph_client.py"), base_url, model], client_env)
    human, first, tool_turn, *rest = out["messages"]
    assert human["type"] == "human" and first["type"] == "ai", out
    assert [call["name"] for call in first["tool_calls"]] == ["get_weather"], out
    assert_weather_arguments(first["tool_calls"][0]["args"])
    assert tool_turn == {"type": "tool", "name": "get_weather",
                         "content": WEATHER_PREFIX + first["tool_calls"][0]["args"]["city"]}, out
    assert rest and rest[-1]["type"] == "ai" and rest[-1]["tool_calls"] == [], out
    assert rest[-1]["content"].strip(), out


# --- 5. openai-agents (Python) ----------------------------------------------------------------------------------

# Each SDK on chat completions (its OpenAIChatCompletionsModel) and on its default model, OpenAIResponsesModel (the
# Responses API: the default client pointed at the stack, the model a plain name).
AGENT_APIS = {"chat": "OpenAIChatCompletionsModel", "responses": "OpenAIResponsesModel"}


@pytest.mark.parametrize("stream", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("api", list(AGENT_APIS))
def test_openai_agents_with_a_function_tool(base_url, model, client_env, api, stream):
    """One `@function_tool`: tool_choice "required" first (strict schema), the SDK resets it after the call (on the
    Responses API it sends the tool's function_call and function_call_output back as input items), and the run ends
    with a text answer; streamed, the call and the answer come as deltas or Responses events."""
    argv = [python_of(AGENTS_VENV), str(CLIENTS / "openai_agents_client.py"), base_url, model, api]
    out = run_client(argv + (["stream"] if stream else []), client_env)
    assert out["model_class"] == AGENT_APIS[api], out
    assert_agent_run(out)


def assert_agent_run(out: dict) -> None:
    """An OpenAI Agents SDK run (Python or JS): the tool called with valid arguments, its output, a final answer."""
    call, output, *rest = out["items"]
    assert call["tool_call"] == "get_weather", out
    assert_weather_arguments(call["arguments"])
    assert output == {"tool_output": WEATHER_PREFIX + json.loads(call["arguments"])["city"]}, out
    assert rest and rest[-1] == {"item": "message_output_item"}, out
    assert isinstance(out["final_output"], str) and out["final_output"].strip(), out


# --- 6. Node: Vercel AI SDK and @openai/agents ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["object", "output"])
def test_ai_sdk_structured_object(base_url, model, client_env, case):
    """`generateObject` with a zod schema (and its successor, generateText with Output.object) through
    @ai-sdk/openai-compatible with structured outputs on: a strict response_format json_schema."""
    out = run_client([node(), str(NODE_DIR / "ai_sdk.mjs"), base_url, model, case], client_env, cwd=NODE_DIR)
    assert_city(out["object"])
    assert out["finishReason"] == "stop", out


@pytest.mark.parametrize("case", ["tool", "stream-tool"])
def test_ai_sdk_generate_text_with_a_tool(base_url, model, client_env, case):
    """generateText / streamText with one tool, toolChoice "required" on the first step: a valid call, executed,
    then (toolChoice auto) a text answer."""
    out = run_client([node(), str(NODE_DIR / "ai_sdk.mjs"), base_url, model, case], client_env, cwd=NODE_DIR)
    first, *rest = out["steps"]
    assert [call["toolName"] for call in first["toolCalls"]] == ["get_weather"], out
    assert first["toolCalls"][0]["invalid"] is False, out
    assert_weather_arguments(first["toolCalls"][0]["input"])
    assert first["toolResults"] == [{"toolName": "get_weather",
                                     "output": WEATHER_PREFIX + first["toolCalls"][0]["input"]["city"]}], out
    assert first["finishReason"] == "tool-calls", out
    assert len(rest) == 1 and rest[0]["toolCalls"] == [] and rest[0]["text"].strip(), out


@pytest.mark.parametrize("stream", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("api", list(AGENT_APIS))
def test_node_openai_agents_with_a_tool(base_url, model, client_env, api, stream):
    """@openai/agents (JavaScript), the same run on either API: toolChoice "required" first, then an answer."""
    argv = [node(), str(NODE_DIR / "openai_agents.mjs"), base_url, model, api]
    out = run_client(argv + (["stream"] if stream else []), client_env, cwd=NODE_DIR)
    assert out["model_class"] == AGENT_APIS[api], out
    assert_agent_run(out)
