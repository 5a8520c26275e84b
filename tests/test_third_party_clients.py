"""Third-party clients written against vLLM's OpenAI-compatible server, run unchanged against the real stack:
guidellm (load), lm-eval's local-chat-completions (evaluation) and langchain-openai's ChatOpenAI (a framework).

They live in their own virtualenv (`.venv-clients`, made by `make tools`: guidellm and lm-eval pull torch and
a newer transformers than the test environment's pins), and run as that venv's executables, entirely offline:
every tokenizer is the small model's folder, never a hub name, and the lm-eval task is a local JSONL file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENTS_BIN = ROOT / ".venv-clients" / "bin"
TOOL_TIMEOUT_S = 420
# Tiers (the root conftest.py): third-party client suites, minutes each.
pytestmark = pytest.mark.slow

GUIDELLM_REQUESTS = 8
GUIDELLM_STREAMS = 4
GUIDELLM_PROMPT_TOKENS = 32
GUIDELLM_OUTPUT_TOKENS = 16

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Egypt", "Cairo")]
# A generate_until task on a local JSONL file, scored by exact match on the city the answer names ("The capital
# of France is Paris." -> "Paris"): the small model answers all five right when greedy.
LM_EVAL_TASK = """\
task: llamaq_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "What is the capital of {{{{country}}}}? Answer with the city name only."
doc_to_target: "{{{{capital}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  temperature: 0
  do_sample: false
filter_list:
  - name: city
    filter:
      - function: regex
        regex_pattern: "is ([A-Z][A-Za-z ]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

LANGCHAIN_SCRIPT = """\
import json, sys
from langchain_openai import ChatOpenAI

llm = ChatOpenAI(base_url=sys.argv[1], api_key="unused", model=sys.argv[2], temperature=0, max_tokens=16,
                 stream_usage=True, max_retries=0, timeout=120)
question = "What is the capital of France?"
answer = llm.invoke(question)
chunks = list(llm.stream(question))
streamed = chunks[0]
for chunk in chunks[1:]:
    streamed = streamed + chunk
print(json.dumps({
    "invoke": answer.content, "invoke_usage": answer.usage_metadata,
    "stream": streamed.content, "stream_usage": streamed.usage_metadata, "chunks": len(chunks),
    "finish_reason": streamed.response_metadata.get("finish_reason"),
}))
"""


def client_tool(name: str) -> str:
    path = CLIENTS_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make tools` (it makes .venv-clients)", pytrace=False)
    return str(path)


@pytest.fixture
def offline_env(tmp_path) -> dict[str, str]:
    """Nothing may reach a hub: offline flags, and an empty cache of the test's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", NO_COLOR="1",
        # One guidellm worker process runs all its streams (asyncio): not four processes importing torch on 2 cores.
        GUIDELLM__MAX_WORKER_PROCESSES="1",
        # guidellm's and langchain's telemetry and tracing stay off.
        LANGCHAIN_TRACING_V2="false", DO_NOT_TRACK="1",
    )
    return env


@pytest.fixture(scope="module")
def served_name(stack) -> str:
    return httpx.get(f"{stack.url}/v1/models", timeout=30).json()["data"][0]["id"]


def run_tool(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 0, (
        f"{argv[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


def test_vllm_endpoints_through_nginx(stack, served_name):
    """What these clients ask besides completions: /health, /version, /v1/models, /tokenize, /detokenize; the
    token count of /tokenize is the prompt_tokens a completion of the same messages reports."""
    with httpx.Client(base_url=stack.url, timeout=120) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.content == b""
        assert http.get("/version").json()["version"]
        (model,) = http.get("/v1/models").json()["data"]
        assert model["root"] == served_name and model["parent"] is None and model["max_model_len"] > 0
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        tokenized = http.post("/tokenize", json={"model": served_name, "messages": messages}).json()
        assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == model["max_model_len"]
        completion = http.post("/v1/chat/completions",
                               json={"messages": messages, "max_tokens": 4, "temperature": 0}).json()
        assert completion["usage"]["prompt_tokens"] == tokenized["count"]
        text = http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
        assert "What is the capital of France?" in text
        assert http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"] == \
            tokenized["tokens"]


def test_guidellm_benchmark_completes_every_request(stack, served_name, offline_env, tmp_path):
    """A short concurrent run: every request succeeds with exactly the output tokens asked for (guidellm sends
    `ignore_eos` and `stream_options.continuous_usage_stats`, and counts from the server's usage)."""
    report = tmp_path / "guidellm.json"
    run_tool([
        client_tool("guidellm"), "run",
        "--backend", f"kind=openai_http,target={stack.url},model={served_name}",
        "--profile", f"kind=concurrent,streams={GUIDELLM_STREAMS}",
        "--constraint", f"kind=max_requests,count={GUIDELLM_REQUESTS}",
        "--data", f"kind=synthetic_text,prompt_tokens={GUIDELLM_PROMPT_TOKENS},"
                  f"output_tokens={GUIDELLM_OUTPUT_TOKENS}",
        "--tokenizer", f"kind=huggingface_auto,model={os.environ['LLAMAQ_TEST_MODEL']}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ], offline_env, tmp_path)
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": GUIDELLM_REQUESTS, "errored": 0, "incomplete": 0, "total": GUIDELLM_REQUESTS}
    requests = benchmark["requests"]["successful"]
    print("guidellm:", totals, [(r["prompt_tokens"], r["output_tokens"]) for r in requests])
    assert len(requests) == GUIDELLM_REQUESTS
    for request in requests:
        assert request["output_tokens"] == GUIDELLM_OUTPUT_TOKENS, request["output"]
        assert request["prompt_tokens"] >= GUIDELLM_PROMPT_TOKENS and request["output"]
        assert request["response_id"].startswith("chatcmpl-")
    assert benchmark["metrics"]["request_concurrency"]["successful"]["max"] == GUIDELLM_STREAMS


def test_lm_eval_local_chat_completions_scores_a_local_task(stack, served_name, offline_env, tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"country": c, "capital": k}) + "\n" for c, k in CAPITALS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "llamaq_capitals.yaml").write_text(LM_EVAL_TASK.format(data=data))
    out = tmp_path / "results"
    model_args = ",".join([
        f"base_url={stack.url}/v1/chat/completions", f"model={served_name}", "num_concurrent=2", "max_retries=1",
        "tokenizer_backend=huggingface", f"tokenizer={os.environ['LLAMAQ_TEST_MODEL']}",
    ])
    run_tool([
        client_tool("lm-eval"), "run", "--model", "local-chat-completions", "--model_args", model_args,
        "--tasks", "llamaq_capitals", "--include_path", str(tasks), "--apply_chat_template",
        "--output_path", str(out), "--log_samples",
    ], offline_env, tmp_path)
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]["llamaq_capitals"]
    print("lm-eval:", results)
    assert results["sample_len"] == len(CAPITALS)
    # Greedy float32: the small model names every capital (0.6 leaves room for a changed chat template).
    assert results["exact_match,city"] >= 0.6, results
    (samples_file,) = out.rglob("samples_llamaq_capitals_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert all(sample["resps"][0][0] for sample in samples), samples


def test_langchain_chat_openai_invoke_and_stream(stack, served_name, offline_env, tmp_path):
    result = run_tool([client_tool("python"), "-c", LANGCHAIN_SCRIPT, f"{stack.url}/v1", served_name],
                      offline_env, tmp_path)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    print("langchain:", answer)
    assert "Paris" in answer["invoke"]
    assert answer["stream"] == answer["invoke"] and answer["chunks"] > 2
    for usage in (answer["invoke_usage"], answer["stream_usage"]):
        assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 16
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert answer["finish_reason"] in ("stop", "length")
