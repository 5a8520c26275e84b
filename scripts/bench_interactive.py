"""Interactive first (issue 23): a person's chat stream sent while a backlog fills the engine, on `vllm serve` without
and with vLLM's priority scheduling and on llamaq, side by side in one run with the same load.

Servers (`--servers`, in this order; each started, measured and stopped before the next, so they never share the
CPU):
  vllm-fifo       `vllm serve` with its default scheduling (first come, first served);
  vllm-priority   `vllm serve --scheduling-policy priority`, the backlog sent with `"priority": 1` (the interactive
                  requests with none, vLLM's 0: served first);
  llamaq          the whole stack through nginx with ENGINE=vllm, the backlog sent as batch-priority jobs
                  (`POST /v1/generate` with `"priority": "batch"`: the OpenAI routes are always interactive), the
                  interactive requests as ordinary OpenAI chat streams.
Both `vllm serve`s are started with benchkit's VllmServe (vLLM's server module called directly: the CPU
build's console script fails); the stack with benchkit's start_stack. All three: the small model in --dtype, vLLM
eager, `--max-num-seqs` = MAX_BATCH, the same max model len, KV cache size and chat template.

The load, the same on each (prompts drawn from a fixed seed): --backlog requests of --backlog-tokens completion
tokens (`ignore_eos`) sent at once, then --interactive chat streams (`/v1/chat/completions`, `stream: true`,
--interactive-tokens tokens, `ignore_eos`) started open loop at --rate per second, the first 1/rate s after the
backlog. Greedy everywhere. Measured per server:
  TTFT             an interactive request's time from sending it to its first content delta (p50, p95, max);
  latency          the same request's time until its stream ends (p50, p95);
  backlog tok/s    the backlog's completion tokens / time from its first send to its last answer;
  failures         requests that failed or came back with another number of completion tokens than asked.
A few unmeasured requests (--warmup, other prompts) go first on each server, so one-off costs are paid before.

    .venv/bin/python scripts/bench_interactive.py                      # the issue's load, all three servers
    .venv/bin/python scripts/bench_interactive.py --servers llamaq --backlog 10 --interactive 4 --no-doc
    .venv/bin/python scripts/bench_interactive.py --env INTERACTIVE_HEADROOM=0 --section interactive-first-h0

Results go to docs/benchmarks.md (section "interactive-first") with the command that produced them, with the ratios
the issue targets: llamaq's TTFT p95 at most 0.5x that of vllm-priority and under 1.5 s, its backlog tokens/s at
least 0.95x of vllm-priority's. `--env NAME=VALUE` (repeatable) sets a variable for llamaq's services.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (  # noqa: E402
    TOOL_TEMPLATE, BenchFlag, ForeignLoad, VllmServe, git_revision, machine_line, percentile, small_model, sse_lines,
    start_stack, update_doc, wait_for_quiet,
)

WRITER = "scripts/bench_interactive.py"
LABELS = {
    "vllm-fifo": "`vllm serve` (FIFO)",
    "vllm-priority": "`vllm serve --scheduling-policy priority` (backlog `priority: 1`)",
    "llamaq": "llamaq, ENGINE=vllm (backlog `priority: batch` jobs)",
}
# Words the prompts are drawn from (a fixed seed): every request has its own prompt, none the prefix cache holds.
WORDS = ("river mountain lantern garden engine harbor violin desert comet library orchard bridge castle meadow "
         "thunder candle market island forest glacier compass spider teacup window pepper rocket ladder saddle "
         "whistle pebble blanket canyon marble feather trumpet cactus puzzle anchor tunnel velvet walnut "
         "statue mirror kettle lizard blizzard harvest galaxy sandal quartz").split()
REQUEST_TIMEOUT_S = 900


def prompts(rng: random.Random, n: int, words: int, kind: str) -> list[str]:
    return [f"{kind} request {i}: write a story that uses these words: " + " ".join(rng.choices(WORDS, k=words))
            for i in range(n)]


class PriorityVllmServe(VllmServe):
    """benchkit's VllmServe with `--scheduling-policy priority` at the end of its command line."""

    def __init__(self, model: str, args):
        super().__init__(model, args, extra_argv=["--scheduling-policy", "priority"])


class Llamaq:
    """The stack (redis, worker, gateway, nginx) with ENGINE=vllm and the same engine settings as `vllm serve`."""

    def __init__(self, model: str, args):
        env = dict(MODEL_PATH=model, DEVICE="cpu", DTYPE=args.dtype, ENGINE="vllm", MAX_BATCH=str(args.max_batch),
                   MAX_MODEL_LEN=str(args.max_model_len), KV_CACHE_CPU_GIB=str(args.kv_cache_gib),
                   ENFORCE_EAGER="1" if args.eager else "0", WEB_CONCURRENCY="2", CHAT_TEMPLATE=str(TOOL_TEMPLATE))
        env.update(args.env)
        self.stack = start_stack(env)
        self.stack.wait_ready(900)
        # How the worker configured vLLM (its own log line), so the table says what llamaq's engine ran with.
        found = re.search(r"vLLM engine ready: (.*?) defaults=", (self.stack.workdir / "worker.log").read_text())
        self.engine = found.group(1) if found else "(not in the worker's log)"

    @property
    def url(self) -> str:
        return self.stack.url

    def stop(self) -> None:
        self.stack.stop()


SERVERS = {"vllm-fifo": VllmServe, "vllm-priority": PriorityVllmServe, "llamaq": Llamaq}


class Load:
    """The requests of one run against one server (`kind`: a key of SERVERS)."""

    def __init__(self, client: httpx.AsyncClient, kind: str, model: str, args):
        self.client, self.kind, self.model, self.args = client, kind, model, args

    async def backlog(self, prompt: str) -> dict:
        """One backlog request, answered whole: {"tokens", "done"} (done: perf_counter at its answer)."""
        messages = [{"role": "user", "content": prompt}]
        n = self.args.backlog_tokens
        if self.kind == "llamaq":
            r = await self.client.post("/v1/generate", json={
                "messages": messages, "max_new_tokens": n, "ignore_eos": True, "temperature": 0,
                "priority": "batch", "wait_s": 300})
            job = r.json()
            while r.status_code == 202 or (r.status_code == 200 and job.get("status") in ("queued", "running")):
                r = await self.client.get(f"/v1/jobs/{job['id']}", params={"wait": 60})
                job = r.json()
            if r.status_code != 200 or job.get("status") != "succeeded":
                raise RuntimeError(f"backlog job: {r.status_code} {r.text[:300]}")
            tokens = job["output"]["usage"]["completion_tokens"]
        else:
            body = {"model": self.model, "messages": messages, "max_tokens": n, "ignore_eos": True, "temperature": 0}
            if self.kind == "vllm-priority":
                body["priority"] = 1
            r = await self.client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"backlog request: {r.status_code} {r.text[:300]}")
            tokens = r.json()["usage"]["completion_tokens"]
        if tokens != n:
            raise RuntimeError(f"backlog request: {tokens} completion tokens, not {n}")
        return {"tokens": tokens, "done": time.perf_counter()}

    async def interactive(self, prompt: str) -> dict:
        """One interactive chat stream: {"ttft_s", "latency_s", "tokens"}."""
        n = self.args.interactive_tokens
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        ttft, tokens = None, None
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"interactive stream: {r.status_code} {(await r.aread())[:300]!r}")
            async for line in sse_lines(r):
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"interactive stream: {json.dumps(chunk)[:300]}")
                if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices") or []):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        latency = time.perf_counter() - start
        if ttft is None or tokens != n:
            raise RuntimeError(f"interactive stream: {tokens} completion tokens, not {n}"
                               + ("" if ttft else ", no content"))
        return {"ttft_s": ttft, "latency_s": latency, "tokens": tokens}


async def served_model(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]


async def measure(url: str, kind: str, args, backlog_prompts, interactive_prompts, warmup_prompts) -> dict:
    model = await served_model(url)
    # No pool limit: a hundred backlog requests held open must not make an interactive one wait for a connection.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        load = Load(client, kind, model, args)
        for i, prompt in enumerate(warmup_prompts):  # unmeasured: one-off costs, on both request paths
            await (load.interactive(prompt) if i % 2 == 0 else load.backlog(prompt))

        async def interactive_at(delay: float, prompt: str):
            await asyncio.sleep(delay)
            return await load.interactive(prompt)

        with ForeignLoad() as foreign:
            first_sent = time.perf_counter()
            backlog = [asyncio.create_task(load.backlog(p)) for p in backlog_prompts]
            interactive = [asyncio.create_task(interactive_at((i + 1) / args.rate, p))
                           for i, p in enumerate(interactive_prompts)]
            backlog_results = await asyncio.gather(*backlog, return_exceptions=True)
            interactive_results = await asyncio.gather(*interactive, return_exceptions=True)
    ok_backlog = [r for r in backlog_results if not isinstance(r, BaseException)]
    ok_interactive = [r for r in interactive_results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in (*backlog_results, *interactive_results) if isinstance(r, BaseException)]
    backlog_s = max((r["done"] for r in ok_backlog), default=first_sent) - first_sent
    ttft = [r["ttft_s"] for r in ok_interactive]
    latency = [r["latency_s"] for r in ok_interactive]
    return {
        "server": kind, "interactive_ok": len(ok_interactive), "interactive": len(interactive_prompts),
        "backlog_ok": len(ok_backlog), "backlog": len(backlog_prompts),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95), "ttft_max_s": max(ttft, default=0),
        "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
        "backlog_tokens": sum(r["tokens"] for r in ok_backlog), "backlog_s": backlog_s,
        "backlog_tok_s": sum(r["tokens"] for r in ok_backlog) / backlog_s if backlog_s > 0 else 0.0,
        "failures": len(errors), "first_error": errors[0][:600] if errors else "",
        "foreign_cpu_pct": round(foreign.foreign_pct, 1),
        # Each interactive request's TTFT in the order they were sent (the n-th went out n+1 / rate s in): where the
        # slow ones fall.
        "ttft_by_request_s": [round(r["ttft_s"], 2) if not isinstance(r, BaseException) else None
                              for r in interactive_results],
    }


HEADER = ("| server | interactive ok | TTFT p50 s | TTFT p95 s | TTFT max s | latency p50 s | latency p95 s | "
          "backlog ok | backlog tok/s | backlog done after s | failures | ready after s | other load |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def row(r: dict) -> str:
    return (f"| {LABELS[r['server']]} | {r['interactive_ok']}/{r['interactive']} | {r['ttft_p50_s']:.2f} | "
            f"{r['ttft_p95_s']:.2f} | {r['ttft_max_s']:.2f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
            f"{r['backlog_ok']}/{r['backlog']} | {r['backlog_tok_s']:.1f} | {r['backlog_s']:.1f} | "
            f"{r['failures']} | {r['startup_s']:.0f} | {r['foreign_cpu_pct']:.0f}% |")


def ratios(results: dict[str, dict]) -> list[str]:
    mine, prio, fifo = results.get("llamaq"), results.get("vllm-priority"), results.get("vllm-fifo")
    lines = []
    if mine and prio and prio["ttft_p95_s"] > 0 and prio["backlog_tok_s"] > 0:
        ttft = mine["ttft_p95_s"] / prio["ttft_p95_s"]
        tput = mine["backlog_tok_s"] / prio["backlog_tok_s"]
        lines += [f"- llamaq TTFT p95 / vllm-priority TTFT p95 = {ttft:.2f}x (target <= 0.5: "
                  f"{'met' if ttft <= 0.5 else 'not met'})",
                  f"- llamaq backlog tok/s / vllm-priority backlog tok/s = {tput:.2f}x (target >= 0.95: "
                  f"{'met' if tput >= 0.95 else 'not met'})"]
    if mine:
        lines.append(f"- llamaq TTFT p95 = {mine['ttft_p95_s']:.2f} s (target < 1.5 s: "
                     f"{'met' if mine['ttft_p95_s'] < 1.5 else 'not met'})")
    if mine and fifo and mine["ttft_p95_s"] > 0:
        lines.append(f"- vllm-fifo TTFT p95 / llamaq TTFT p95 = {fifo['ttft_p95_s'] / mine['ttft_p95_s']:.1f}x")
    return lines


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"a subset of {', '.join(SERVERS)}")
    parser.add_argument("--backlog", type=int, default=100, help="backlog requests, sent at once")
    parser.add_argument("--backlog-tokens", type=int, default=96)
    parser.add_argument("--interactive", type=int, default=30, help="interactive chat streams")
    parser.add_argument("--interactive-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.5, help="interactive streams started per second")
    parser.add_argument("--prompt-words", type=int, default=24, help="random words in each prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests first (alternately each kind)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch", type=int, default=16, help="MAX_BATCH and vLLM's --max-num-seqs")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE / KV_CACHE_CPU_GIB")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without torch.compile (every server alike)")
    parser.add_argument("--env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                        help="a variable for llamaq's services (repeatable), over the script's own")
    parser.add_argument("--wait-quiet-s", type=float, default=900, help="most time to wait for a quiet machine")
    parser.add_argument("--section", default="interactive-first", help="docs/benchmarks.md section to (re)write")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    args.env = dict(args.env)
    labels = args.servers.split(",")
    unknown = [label for label in labels if label not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}; known: {', '.join(SERVERS)}")
    model = small_model()
    rng = random.Random(args.seed)
    backlog_prompts = prompts(rng, args.backlog, args.prompt_words, "backlog")
    interactive_prompts = prompts(rng, args.interactive, args.prompt_words, "interactive")
    warmup_prompts = prompts(rng, args.warmup, args.prompt_words, "warmup")
    started = datetime.now(timezone.utc)
    results, rows = {}, []
    with BenchFlag():  # others hold off while this measures; then wait for what already runs to end
        quiet = wait_for_quiet(args.wait_quiet_s, 15)
        for label in labels:
            began = time.monotonic()
            server = SERVERS[label](model, args)
            startup_s = time.monotonic() - began
            try:
                result = asyncio.run(measure(server.url, label, args, backlog_prompts, interactive_prompts,
                                             warmup_prompts))
            finally:
                server.stop()
            result["startup_s"] = startup_s
            result["engine"] = getattr(server, "engine", "")
            results[label] = result
            rows.append(row(result))
            print(json.dumps(result), file=sys.stderr, flush=True)
            print(rows[-1], flush=True)
    failures = [f"- {LABELS[r['server']]}: {r['failures']} failed; the first: {r['first_error']!r}"
                for r in results.values() if r["failures"]]
    llamaq_env = " ".join(f"{k}={v}" for k, v in args.env.items())
    text = "\n".join([
        f"Command: `{shlex.join(['.venv/bin/python', 'scripts/bench_interactive.py', *sys.argv[1:]])}`",
        f"(started {started:%Y-%m-%d %H:%M:%S} UTC; code at {git_revision()}).",
        "",
        f"Machine: {machine_line()}. Model: SmolLM2-135M-Instruct in {args.dtype}, vLLM "
        f"{'eager' if args.eager else 'compiled'}, max_num_seqs = MAX_BATCH = {args.max_batch}, max_model_len "
        f"{args.max_model_len}, KV cache {args.kv_cache_gib} GiB, the same chat template; llamaq with its "
        f"documented defaults otherwise{f' and {llamaq_env}' if llamaq_env else ''}. Each server started, measured "
        "and stopped before the next."
        + (f" llamaq's worker logged its engine as: `{results['llamaq']['engine']}`." if "llamaq" in results else ""),
        "",
        f"Load: {args.backlog} backlog requests of {args.backlog_tokens} completion tokens (`ignore_eos`) sent at "
        f"once, then {args.interactive} interactive chat streams (`/v1/chat/completions`, `stream: true`, "
        f"{args.interactive_tokens} tokens, `ignore_eos`) started {1 / args.rate:g} s apart, the first "
        f"{1 / args.rate:g} s after the backlog; greedy; prompts of {args.prompt_words} random words (seed "
        f"{args.seed}), each its own; {args.warmup} unmeasured requests first on each server. TTFT: sending an "
        "interactive request until its first content delta; latency: until its stream ends; backlog tok/s: the "
        "backlog's completion tokens / its first send until its last answer. The backlog on llamaq: "
        "`POST /v1/generate` with `\"priority\": \"batch\"`; on vllm-priority: `\"priority\": 1`.",
        "",
        f"Before the runs other processes used {quiet:.0f}% of the CPU; the last column is that share during each "
        "run.",
        "",
        HEADER, *rows, "", *ratios(results),
        *(["", "Failed requests:", *failures] if failures else []),
    ])
    print(text)
    if not args.no_doc:
        update_doc(args.section, text, writer=WRITER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
