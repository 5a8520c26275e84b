"""Load generation: the fixed prompts, an SSE reader, and bench.py's closed-loop clients (one request to llamaq or to
the original server, and N clients sending M requests between them), with what a run measured.

One run: N concurrent clients send M requests in total (each client sends its next request as soon as its previous
one is answered), prompts cycled from PROMPTS, a fixed token cap, greedy decoding on both sides.
llamaq: `POST /v1/jobs`, then `GET /v1/jobs/{id}/events` (SSE). TTFT = submit until the first `token` event;
latency = submit until the `done` event; completion tokens = the job's `usage.completion_tokens`.
original: `POST /` with `{"prompt", "max_new_tokens"}`; it does not stream, so its TTFT is its full latency;
completion tokens = the `completion_tokens` field that scripts/baseline_server.py adds to the original answer
(the generated ids, EOS included, counted as llamaq counts them; nothing is re-tokenized).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from benchkit.machine import ForeignLoad
from benchkit.stats import percentile

# The fixed prompts the closed loop cycles through (scripts/bench.py; scripts/bench_hf_cb.py batches them).
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "What is 17 times 23? Show your working.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "List five fruits that are red.",
    "How does a bicycle stay upright?",
]


@dataclass
class Result:
    ok: bool
    latency_s: float = 0.0
    ttft_s: float | None = None
    completion_tokens: int = 0
    error: str = ""


@dataclass
class RunStats:
    target: str
    clients: int
    requests: int
    max_new_tokens: int
    wall_s: float
    errors: int
    completion_tokens: int
    tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_is_latency: bool
    first_error: str = ""
    # share of the machine's CPU used during the run by processes not started by this benchmark
    foreign_cpu_pct: float = 0.0
    extra: dict = field(default_factory=dict)


async def sse_lines(response: httpx.Response):
    """The lines of a streamed response, without their line ends."""
    # Split at line ends only: aiter_lines (str.splitlines) also splits at U+2028 and its kin, which the JSON of a
    # token's text may hold unescaped (tests/helpers.py reads the stream the same way).
    pending = ""
    async for text in response.aiter_text():
        *complete, pending = (pending + text).split("\n")
        for line in complete:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


async def sse_events(response: httpx.Response):
    """(event, data) of each SSE event of a streamed response; comments skipped."""
    event, data = "message", []
    async for line in sse_lines(response):
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


async def one_llamaq(client: httpx.AsyncClient, prompt: str, max_new_tokens: int) -> Result:
    """One llamaq request: `POST /v1/jobs`, then its events until `done`."""
    start = time.perf_counter()
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}
    resp = await client.post("/v1/jobs", json=body)
    if resp.status_code != 202:
        return Result(False, error=f"submit {resp.status_code}: {resp.text[:200]}")
    job_id = resp.json()["id"]
    ttft = None
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        if stream.status_code != 200:
            return Result(False, error=f"events {stream.status_code}")
        async for event, data in sse_events(stream):
            if event == "token" and ttft is None:
                ttft = time.perf_counter() - start
            elif event == "done":
                latency = time.perf_counter() - start
                job = json.loads(data)
                if job.get("status") != "succeeded":
                    return Result(False, latency, ttft, error=f"job {job.get('status')}: {job.get('error')}")
                tokens = job["output"]["usage"]["completion_tokens"]
                return Result(True, latency, ttft if ttft is not None else latency, tokens)
    return Result(False, time.perf_counter() - start, ttft, error="event stream ended without done")


async def one_original(client: httpx.AsyncClient, prompt: str, max_new_tokens: int) -> Result:
    """One request to the original server (`POST /`), answered whole."""
    start = time.perf_counter()
    resp = await client.post("/", json={"prompt": prompt, "max_new_tokens": max_new_tokens})
    latency = time.perf_counter() - start
    if resp.status_code != 200:
        return Result(False, latency, error=f"{resp.status_code}: {resp.text[:200]}")
    answer = resp.json()
    if "completion_tokens" not in answer:
        return Result(False, latency, error="no completion_tokens field: is this scripts/baseline_server.py?")
    return Result(True, latency, latency, int(answer["completion_tokens"]))


async def run_load(target: str, url: str, clients: int, requests: int, max_new_tokens: int,
                   warmup: int = 1, timeout_s: float = 900) -> RunStats:
    """`clients` closed-loop clients send `requests` requests between them (after `warmup` untimed ones) to
    `target` ("llamaq" or "original") at `url`; what the run measured, with the other processes' share of the CPU."""
    one = one_llamaq if target == "llamaq" else one_original
    limits = httpx.Limits(max_connections=clients * 2 + 4, max_keepalive_connections=clients * 2 + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        for i in range(warmup):
            warm = await one(client, PROMPTS[i % len(PROMPTS)], max_new_tokens)
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        next_index = 0
        results: list[Result] = []

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                try:
                    results.append(await one(client, PROMPTS[i % len(PROMPTS)], max_new_tokens))
                except httpx.HTTPError as exc:
                    results.append(Result(False, error=f"{type(exc).__name__}: {exc}"))

        with ForeignLoad() as load:
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    bad = [r for r in results if not r.ok]
    tokens = sum(r.completion_tokens for r in good)
    latencies = [r.latency_s for r in good]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    return RunStats(
        target=target, clients=clients, requests=requests, max_new_tokens=max_new_tokens, wall_s=wall,
        errors=len(bad), completion_tokens=tokens, tokens_per_s=tokens / wall, requests_per_s=len(good) / wall,
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50), ttft_p95_s=percentile(ttfts, 95),
        ttft_is_latency=target == "original", first_error=bad[0].error if bad else "",
        foreign_cpu_pct=round(load.foreign_pct, 1),
    )
