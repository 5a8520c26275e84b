"""`vllm serve` against llamaq with ENGINE=vllm and with ENGINE=transformers, side by side in one run, through the
same third-party load client: vLLM's own `vllm bench serve` (its benchmark code, `vllm.benchmarks.serve`, called
directly because the `vllm` console script of the CPU build fails on package metadata).

Each server is started, measured at every concurrency with the same prompts (vLLM's random dataset, a fixed seed,
the model's own tokenizer folder: offline), and stopped before the next starts, so they never share the 2 cores.
llamaq is measured through nginx on `/v1/chat/completions` (streamed), as any OpenAI client would use it.

    .venv/bin/python scripts/bench_engines.py                     # all servers, concurrency 1, 16, 64
    .venv/bin/python scripts/bench_engines.py --servers llamaq-vllm --concurrency 16 --no-doc
    # what constrained decoding costs: the same prompts plain, held to a JSON schema, and with a forced tool call
    .venv/bin/python scripts/bench_engines.py --servers vllm-serve,llamaq-vllm --concurrency 16 \
        --variants plain,json_schema,tools --section constrained

Results go to docs/benchmarks.md (section "engines") with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (  # noqa: E402
    ROOT, SERVED_NAME, TOOL_TEMPLATE, BenchFlag, ForeignLoad, VllmServe, git_revision, machine_line, small_model,
    start_stack, update_doc, wait_for_quiet,
)

# Its sections have carried this writer's name since it was split out of bench.py: a rerun finds its section by it.
WRITER = "scripts/bench.py"
# Prompts per run at each concurrency: enough for several rounds of the closed loop.
PROMPTS = {1: 8, 16: 48, 64: 128}


# What each request adds to vLLM's random prompt (`vllm bench serve --extra-body`): nothing, a JSON schema its answer
# must follow, or a function it must call (tool_choice "required": a grammar, then the call parsed out).
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"},
                                                  "sources": {"type": "array", "items": {"type": "string"}}},
                 "required": ["answer", "confidence", "sources"]}
LOOKUP_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the documentation",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                   "required": ["query", "limit"]}}}
VARIANTS = {
    "plain": {},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}},
    "tools": {"tools": [LOOKUP_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
}


def prompts_for(concurrency: int) -> int:
    return PROMPTS.get(concurrency, max(16, 2 * concurrency))


class Llamaq:
    def __init__(self, model: str, args, engine: str, dtype: str):
        env = dict(MODEL_PATH=model, DEVICE="cpu", DTYPE=dtype, ENGINE=engine, MAX_BATCH=str(args.max_batch),
                   MAX_MODEL_LEN=str(args.max_model_len), KV_CACHE_CPU_GIB=str(args.kv_cache_gib),
                   ENFORCE_EAGER="1" if args.eager else "0", WEB_CONCURRENCY="2", CHAT_TEMPLATE=str(TOOL_TEMPLATE))
        self.stack = start_stack(env)
        self.stack.wait_ready(900)

    @property
    def url(self) -> str:
        return self.stack.url

    def stop(self) -> None:
        self.stack.stop()


SERVERS = {
    "vllm-serve": lambda model, args: VllmServe(model, args),
    "llamaq-vllm": lambda model, args: Llamaq(model, args, "vllm", args.dtype),
    "llamaq-transformers": lambda model, args: Llamaq(model, args, "transformers", args.dtype),
    "llamaq-transformers-bf16": lambda model, args: Llamaq(model, args, "transformers", "bfloat16"),
}


def run_client(
    url: str, model: str, concurrency: int, args, out_dir: Path, label: str, variant: str = "plain",
    prompts: int | None = None,
) -> dict:
    """One `vllm bench serve` run (`prompts`: how many, else prompts_for(concurrency)); returns its result JSON."""
    name = f"{label}-{variant}-c{concurrency}{'-warmup' if prompts else ''}.json"
    argv = [sys.executable, "-c", "import sys, argparse\n"
            "from vllm.benchmarks.serve import add_cli_args, main\n"
            "parser = argparse.ArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))",
            "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions",
            "--model", SERVED_NAME, "--tokenizer", model, "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(prompts or prompts_for(concurrency)), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--seed", "0", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            # --save-detailed: each request's error is kept, so a failed one says why.
            "--save-result", "--save-detailed", "--result-dir", str(out_dir), "--result-filename", name]
    if VARIANTS[variant]:
        argv += ["--extra-body", json.dumps(VARIANTS[variant])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with ForeignLoad() as load:
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(
            f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads((out_dir / name).read_text())
    result["foreign_cpu_pct"] = load.foreign_pct
    result["failures"] = [error for error in result.get("errors", []) if error]
    return result


def row(label: str, concurrency: int, r: dict) -> str:
    return (f"| {label} | {concurrency} | {r['completed']}/{r['num_prompts']} | {r['total_output_tokens']} | "
            f"{r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | "
            f"{r['median_tpot_ms']:.0f} | {r['median_e2el_ms'] / 1000:.2f} | {r['foreign_cpu_pct']:.0f}% |")


HEADER = ("| server | concurrency | completed | output tokens | output tok/s | TTFT p50 ms | TTFT p99 ms | "
          "TPOT p50 ms | latency p50 s | other load |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="vllm-serve,llamaq-vllm,llamaq-transformers")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without torch.compile (both vLLM servers alike)")
    parser.add_argument("--wait-quiet-s", type=float, default=900, help="most time to wait for a quiet machine")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one unmeasured round per server first, of the first concurrency's prompts (one-off "
                             "costs paid, and the prompts in the prefix cache for every measured run alike)")
    parser.add_argument("--variants", default="plain", help=f"request bodies to run, of {', '.join(VARIANTS)}")
    parser.add_argument("--section", default="engines", help="docs/benchmarks.md section to (re)write")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    model = small_model()
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = args.variants.split(",")
    out_dir = Path(tempfile.mkdtemp(prefix="llamaq-bench-engines-"))
    started = datetime.now(timezone.utc)
    rows, results, failures = [], {}, []
    with BenchFlag():  # others hold off while this measures; then wait for what already runs to end
        quiet = wait_for_quiet(args.wait_quiet_s, 15)
        for label in args.servers.split(","):
            began = time.monotonic()
            server = SERVERS[label](model, args)
            startup_s = time.monotonic() - began
            try:
                if args.warmup:  # the same prompts: every measured run then finds them in the prefix cache alike
                    for variant in variants:  # (each variant's own: tools change the prompt's system turn)
                        run_client(server.url, model, levels[0], args, out_dir, label, variant,
                                   prompts=prompts_for(levels[0]))
                for concurrency in levels:
                    for variant in variants:
                        named = label if variant == "plain" else f"{label} {variant}"
                        result = run_client(server.url, model, concurrency, args, out_dir, label, variant)
                        results[(named, concurrency)] = result
                        rows.append(row(named, concurrency, result))
                        print(rows[-1], flush=True)
                        if result["failures"]:
                            failures.append(f"- {named} at concurrency {concurrency}: {len(result['failures'])} "
                                            f"failed; the client said: {result['failures'][0].strip()[-600:]!r}")
                            print(failures[-1], flush=True)
            finally:
                server.stop()
            print(f"{label}: ready in {startup_s:.0f} s", file=sys.stderr)
            rows.append(f"| {label}: ready in {startup_s:.0f} s | | | | | | | | | |")
    ratios = []
    for concurrency in levels:
        base = results.get(("vllm-serve", concurrency))
        for label in ("llamaq-vllm", "llamaq-transformers"):
            mine = results.get((label, concurrency))
            if base and mine:
                ratios.append(f"- concurrency {concurrency}: {label} / vllm serve output tok/s = "
                              f"{mine['output_throughput'] / base['output_throughput']:.2f}×, TTFT p50 "
                              f"{mine['median_ttft_ms'] - base['median_ttft_ms']:+.0f} ms")
    for concurrency in levels:
        for label in args.servers.split(","):
            plain = results.get((label, concurrency))
            for variant in variants:
                constrained = results.get((f"{label} {variant}", concurrency))
                if plain and constrained:
                    ratios.append(f"- concurrency {concurrency}: {label}, {variant} / plain output tok/s = "
                                  f"{constrained['output_throughput'] / plain['output_throughput']:.2f}×")
    for concurrency in levels:
        fp32, bf16 = results.get(("llamaq-transformers", concurrency)), results.get(("llamaq-transformers-bf16",
                                                                                     concurrency))
        if fp32 and bf16:
            ratios.append(f"- concurrency {concurrency}: transformers engine, bfloat16 / {args.dtype} output tok/s = "
                          f"{bf16['output_throughput'] / fp32['output_throughput']:.2f}×")
    text = "\n".join([
        f"Command: `{shlex.join(['.venv/bin/python', 'scripts/bench_engines.py', *sys.argv[1:]])}`",
        f"(started {started:%Y-%m-%d %H:%M:%S} UTC; code at {git_revision()}).",
        "",
        f"Machine: {machine_line()}. Model: SmolLM2-135M-Instruct in {args.dtype}, vLLM "
        f"{'eager' if args.eager else 'compiled'}, max_num_seqs/MAX_BATCH {args.max_batch}, max_model_len "
        f"{args.max_model_len}, KV cache {args.kv_cache_gib} GiB. Client: `vllm bench serve --backend openai-chat "
        f"--dataset-name random --random-input-len {args.input_len} --random-output-len {args.output_len} "
        "--temperature 0 --seed 0`, closed loop at each concurrency (prompts: "
        + ", ".join(f"{prompts_for(c)} at {c}" for c in levels) + "); greedy, so every server generates the same "
        "text for the same prompt and stops at the model's end of sequence."
        + (" Variants (`--extra-body`): "
           + "; ".join(f"{v}: `{json.dumps(VARIANTS[v])}`" for v in variants if VARIANTS[v]) + "."
           if any(VARIANTS[v] for v in variants) else ""),
        "",
        f"Before the runs other processes used {quiet:.0f}% of the CPU; the last column is that share during each run."
        + (" Each server first served one unmeasured round of the first concurrency's prompts in every variant, so"
           " every measured run finds its prompts in the prefix cache alike." if args.warmup else ""),
        "",
        HEADER, *rows, "", *ratios,
        *(["", "Requests the client counted failed:", *failures] if failures else []),
    ])
    print(text)
    if not args.no_doc:
        update_doc(args.section, text, writer=WRITER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
