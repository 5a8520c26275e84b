"""Interactive latency with and without a 1,000-job batch backlog (issue 15), through the whole stack.

The worker runs `ENGINE=paced` (no model: every sequence gets a token per tick, PACED_TOKENS_PER_S, as a GPU's
batched decoding steps give them), so what is measured is the queue's scheduling, not this CPU's speed. Three
scenarios, each on an idle stack:
  idle      interactive probes alone;
  batch     the same probes just after a 1,000-line Batch API batch was created (its lines wait at batch priority);
  fifo      the same probes just after 1,000 ordinary interactive jobs were queued: what the backlog would cost a
            person if the queue had no priorities.
Probes are open-loop: one `POST /v1/generate` every PROBE_EVERY_S, so each meets the backlog as it is then. Each
scenario waits until the backlog has drained before the next starts.

    .venv/bin/python scripts/bench_priorities.py            # writes section "priorities" of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (  # noqa: E402
    BenchFlag, ForeignLoad, git_revision, machine_line, percentile, small_model, start_stack, update_doc,
    wait_for_quiet,
)

BACKLOG_TOKENS = 16
PROBE_TOKENS = 16


async def probe(client: httpx.AsyncClient, i: int, queue_len) -> dict:
    waiting = await queue_len()
    start = time.perf_counter()
    resp = await client.post("/v1/generate", json={"prompt": f"probe {i}: say something",
                                                   "max_new_tokens": PROBE_TOKENS, "wait_s": 300})
    elapsed = time.perf_counter() - start
    job = resp.json()
    if resp.status_code != 200 or job.get("status") != "succeeded":
        raise RuntimeError(f"probe {i}: {resp.status_code} {resp.text[:200]}")
    return {"latency_s": elapsed, "queued_ahead": waiting}


async def run_probes(url: str, n: int, every_s: float, queue_len) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(probe(client, i, queue_len)))
            await asyncio.sleep(every_s)
        return await asyncio.gather(*tasks)


def backlog_file(n: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": f"batch line {i}"}],
                                        "max_tokens": BACKLOG_TOKENS, "ignore_eos": True}}) + "\n"
                   for i in range(n)).encode()


def scenario(stack, name: str, args) -> dict:
    import redis

    from llamaq_protocol import keys

    store = redis.Redis.from_url(stack.env["REDIS_URL"])
    # The fair queue's depth lists (as long as the jobs waiting in each tier).
    interactive, batch = (keys.fair_tier(keys.DEFAULT_QUEUE_NAME, tier) + ":depth" for tier in ("interactive", "batch"))

    def queued() -> int:
        return store.llen(interactive) + store.llen(batch)

    async def queue_len() -> int:
        return queued()

    http = httpx.Client(base_url=stack.url, timeout=60)
    batch_id = None
    started = time.monotonic()
    if name == "batch":
        file_id = http.post("/v1/files", files={"file": ("backlog.jsonl", backlog_file(args.backlog))},
                            data={"purpose": "batch"}).json()["id"]
        batch_id = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"}).json()["id"]
        while store.llen(batch) < min(args.backlog, 200):  # the driver's first chunk is queued
            time.sleep(0.05)
    elif name == "fifo":
        # Straight to the gateway: nginx's per-address rate limit would refuse a thousand submissions in a second.
        direct = httpx.Client(base_url=f"http://127.0.0.1:{stack.gateway_port}", timeout=60)
        for i in range(args.backlog):
            r = direct.post("/v1/jobs", json={"prompt": f"backlog {i}", "max_new_tokens": BACKLOG_TOKENS,
                                            "ignore_eos": True})
            r.raise_for_status()
        direct.close()
    queued_s = time.monotonic() - started
    with ForeignLoad() as load:
        results = asyncio.run(run_probes(stack.url, args.probes, args.probe_every_s, queue_len))
    # Let the backlog drain before the next scenario (and time it: the batch's own throughput).
    while queued() or store.scard(keys.RUNNING):
        time.sleep(0.2)
    if batch_id:
        while http.get(f"/v1/batches/{batch_id}").json()["status"] != "completed":
            time.sleep(0.2)
    drained_s = time.monotonic() - started
    http.close()
    store.close()
    lat = [r["latency_s"] for r in results]
    return {"scenario": name, "probes": len(lat), "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
            "max_s": max(lat), "queued_ahead_min": min(r["queued_ahead"] for r in results),
            "queued_ahead_max": max(r["queued_ahead"] for r in results), "backlog_queued_s": queued_s,
            "all_done_s": drained_s, "foreign_cpu_pct": round(load.foreign_pct, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--probe-every-s", type=float, default=0.5)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--tokens-per-s", type=float, default=25)
    parser.add_argument("--scenarios", default="idle,batch,fifo")
    parser.add_argument("--wait-quiet-s", type=float, default=300)
    parser.add_argument("--quiet-pct", type=float, default=25)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    quiet = wait_for_quiet(args.wait_quiet_s, args.quiet_pct)
    rows = []
    with BenchFlag():
        stack = start_stack(dict(MODEL_PATH=small_model(), DEVICE="cpu", ENGINE="paced",
                                 PACED_TOKENS_PER_S=str(args.tokens_per_s), MAX_BATCH=str(args.max_batch),
                                 # (one client queues the whole backlog, probes included: it may fill the queue)
                                 MAX_QUEUE=str(args.backlog + 100), MAX_CLIENT_SHARE="1"))
        try:
            for name in args.scenarios.split(","):
                rows.append(scenario(stack, name, args))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            stack.stop()
    table = ["| scenario | probes | p50 (s) | p95 (s) | max (s) | jobs queued at a probe's start (min–max) | "
             "backlog all done after (s) | other CPU load |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['scenario']} | {r['probes']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['max_s']:.3f} | "
                     f"{r['queued_ahead_min']}–{r['queued_ahead_max']} | {r['all_done_s']:.1f} | "
                     f"{r['foreign_cpu_pct']:.0f}% |")
    print("\n".join(table))
    if not args.no_doc:
        cmd = "scripts/bench_priorities.py" + (f" --backlog {args.backlog}" if args.backlog != 1000 else "")
        update_doc("priorities", f"""Command: `.venv/bin/python {cmd}` (code at {git_revision()}). Machine:
{machine_line()}; other processes used {quiet:.0f}% of the CPU just before.

`ENGINE=paced` ({args.tokens_per_s:g} tokens/s per sequence, `MAX_BATCH` {args.max_batch}: a GPU's pace with the
model's cost taken out), the whole stack (nginx, 2 gateway processes, Redis, RQ, the worker). {args.probes} probes,
one `POST /v1/generate` ({PROBE_TOKENS} tokens) every {args.probe_every_s:g} s, open loop. *idle*: the probes alone.
*batch*: just after `POST /v1/batches` with a {args.backlog}-line file ({BACKLOG_TOKENS} tokens a line, the Batch
API's own path: its lines queued at `batch` priority as the driver reaches them). *fifo*: just after {args.backlog}
ordinary interactive jobs ({BACKLOG_TOKENS} tokens) were queued, as a queue without priorities would hold the
same backlog.

{chr(10).join(table)}

A probe is claimed before every queued batch job, so with a batch backlog it waits only for a running sequence
to end (no slot is reserved for interactive work, so a full batch of long batch jobs would make it wait up to
one such job's length); behind the same backlog in one FIFO queue it waits for the backlog itself.""",
                   writer="scripts/bench_priorities.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
