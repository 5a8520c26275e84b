"""What one GPU host's gateway sees, with the model's cost taken out: many open streams, and the token relay.

It starts the whole local stack (scripts/devstack.py: redis-server, gunicorn with 2 gateway processes, nginx
with the real config) with the worker on `ENGINE=paced` (no model: each sequence gets `max_new_tokens` tokens at
`PACED_TOKENS_PER_S`), then drives it from a load generator on raw asyncio sockets (scripts/sse_load.py) split
over several processes, each connecting from its own loopback addresses (nginx limits each address to 100
requests/s). Three modes:

    bench_streams.py streams --streams 10000 --jobs 250 --tokens 40 --tokens-per-s 1
        N clients open `GET /v1/jobs/{id}/events` (a share of them `GET /v1/jobs/{id}?wait=60` instead) on J
        running jobs and hold them to the jobs' end. Checked: every stream got every event (each job's event ids
        are the same on all its streams, `tokens` token events, then `done`), no errors; a plain
        `GET /v1/jobs/{id}` every 100 ms meanwhile (its latency); the gateway's Redis connections (CLIENT LIST,
        by name); the gateway processes' memory before and with every stream open (per idle stream).
    bench_streams.py relay --sequences 256 --tokens-per-s 25 --tokens 250
        one stream per sequence, `MAX_BATCH` = sequences: tokens/s reaching the clients, the delay from the
        worker's write (the Redis entry id is the Redis server's clock when it was written) to the client's read,
        and every process's CPU (per cent of one core, and per token relayed).
    bench_streams.py publish --sequences 256 --per-step 256,32,4,1
        the worker's `Publisher` alone on a redis-server of its own, a new token for `per-step` of the running
        jobs each step: tokens/s, and CPU per token of the worker's side and of Redis.

Prints a JSON summary and a markdown block; the load generator's own CPU is part of it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (  # noqa: E402
    BenchFlag, ForeignLoad, cpu_model, histogram_percentile, small_model, start_stack,
)
from devstack import Stack  # noqa: E402
from nginx_local import free_port  # noqa: E402
from sse_load import http_get, sse_get  # noqa: E402

NOFILE = 65536


def raise_nofile(limit: int = NOFILE) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(hard, limit)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---- processes: CPU and memory from /proc ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _cpu_jiffies(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def stack_processes(stack: Stack) -> dict[str, list[int]]:
    """role -> pids: the gateway's worker processes (not the gunicorn master), nginx's workers, redis, worker."""
    procs = {"redis": [stack.procs["redis"].pid], "worker": [stack.procs["worker"].pid]}
    procs["gateway"] = _children(stack.procs["gateway"].pid)
    procs["nginx"] = _children(stack.procs["nginx"].pid)
    return procs


class CpuMeter:
    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups

    def __enter__(self):
        self.started = time.monotonic()
        self.before = {role: sum(_cpu_jiffies(p) for p in pids) for role, pids in self.groups.items()}
        return self

    def __exit__(self, *exc):
        span = time.monotonic() - self.started
        tick = os.sysconf("SC_CLK_TCK")
        # Share of one core, per role, over the span.
        self.pct = {role: round(100 * (sum(_cpu_jiffies(p) for p in pids) - self.before[role]) / tick / span, 1)
                    for role, pids in self.groups.items()}


# ---- the load generator (in its own processes) -----------------------------------------------------------------


def _load_process(port: int, plan: list[tuple[str, str, str]], rate: float, tokens: int, out) -> None:
    """Open every (kind, path, source) of `plan` at `rate` per second, hold each to its end, report a summary."""
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cpu0 = time.process_time()
    started = time.monotonic()

    async def run():
        tasks = []
        for i, (kind, path, source) in enumerate(plan):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if kind == "sse":
                tasks.append(asyncio.create_task(sse_get("127.0.0.1", port, path, source=source, timeout_s=900)))
            else:
                tasks.append(asyncio.create_task(http_get("127.0.0.1", port, path, source=source, timeout_s=900)))
        opened_s = time.monotonic() - started
        return await asyncio.gather(*tasks), opened_s

    results, opened_s = asyncio.run(run())
    summary = {"streams": 0, "waits": 0, "errors": [], "incomplete": 0, "events": 0, "token_events": 0, "tokens": 0,
               "waits_terminal": 0,
               "ids_by_job": {}, "delays": Counter(), "statuses": Counter(), "opened_s": opened_s,
               "first_token_s": [], "last_close": 0.0}
    for (kind, path, _), result in zip(plan, results):
        summary["statuses"][str(result.status)] += 1
        if result.error or result.status != 200:
            summary["errors"].append(result.error or f"{result.status} {result.body[:120]!r}")
            continue
        if kind != "sse":
            # A wait answers the job when it ends, or as it is once the wait runs out: either is a job object.
            summary["waits"] += 1
            if b'"status":' not in result.body:
                summary["incomplete"] += 1
            summary["waits_terminal"] += b'"succeeded"' in result.body
            continue
        summary["streams"] += 1
        job_id = path.split("/")[3]
        ids = [event_id for event_id, _, _ in result.events]
        # Several tokens of one step may come as one event when the engine falls behind: count the job's tokens.
        done = json.loads(result.events[-1][2]) if result.events and result.events[-1][1] == "done" else {}
        completion = ((done.get("output") or {}).get("usage") or {}).get("completion_tokens", 0)
        if done.get("status") != "succeeded" or completion != tokens:
            summary["incomplete"] += 1
        summary["events"] += len(result.events)
        summary["token_events"] += result.count("token")
        summary["tokens"] += completion
        digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()
        summary["ids_by_job"].setdefault(job_id, set()).add(digest)
        summary["delays"].update(result.delays_ms)
    summary["ids_by_job"] = {job: sorted(d) for job, d in summary["ids_by_job"].items()}
    summary["cpu_s"] = time.process_time() - cpu0
    summary["wall_s"] = time.monotonic() - started
    summary["errors"] = summary["errors"][:20] + ([f"... {len(summary['errors'])} in all"] if summary["errors"] else [])
    out.send(summary)
    out.close()


def run_load(port: int, plan: list[tuple[str, str, str]], processes: int, rate: float, tokens: int) -> dict:
    """Split `plan` over `processes` load generators (rate shared) and merge what they report."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for p in range(processes):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_load_process, args=(port, plan[p::processes], rate / processes, tokens, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    summaries = [pipe.recv() for pipe in pipes]
    for proc in procs:
        proc.join()
    merged = {"streams": 0, "waits": 0, "errors": [], "incomplete": 0, "events": 0, "token_events": 0, "tokens": 0,
              "waits_terminal": 0,
              "delays": Counter(), "statuses": Counter(), "cpu_s": 0.0, "wall_s": 0.0, "opened_s": 0.0}
    ids_by_job: dict[str, set] = {}
    for s in summaries:
        for key in ("streams", "waits", "waits_terminal", "incomplete", "events", "token_events", "tokens", "cpu_s"):
            merged[key] += s[key]
        merged["errors"] += s["errors"]
        merged["delays"].update(s["delays"])
        merged["statuses"].update(s["statuses"])
        merged["wall_s"] = max(merged["wall_s"], s["wall_s"])
        merged["opened_s"] = max(merged["opened_s"], s["opened_s"])
        for job, digests in s["ids_by_job"].items():
            ids_by_job.setdefault(job, set()).update(digests)
    merged["jobs_with_differing_streams"] = sum(len(d) > 1 for d in ids_by_job.values())
    return merged


# ---- the stack -------------------------------------------------------------------------------------------------


def paced_stack(max_batch: int, tokens_per_s: float, extra: dict[str, str]) -> Stack:
    """The stack with `ENGINE=paced` (no model: each sequence gets its tokens at `tokens_per_s`), `extra` over it."""
    return start_stack({
        "MODEL_PATH": small_model(), "ENGINE": "paced", "PACED_TOKENS_PER_S": str(tokens_per_s),
        "MAX_BATCH": str(max_batch), "DEVICE": "cpu", "DTYPE": "float32", "WEB_CONCURRENCY": "2",
        "LOG_LEVEL": "WARNING", "MAX_QUEUE": "20000", "RESULT_TTL_S": "600", **extra,
    })


def gateway_redis_clients(store: redis.Redis) -> dict[str, int]:
    counts: Counter = Counter()
    for client in store.client_list():
        name = client.get("name") or ""
        if name.startswith("llamaq-gateway"):
            counts[name] += 1
    return dict(counts)


def submit(url: str, jobs: int, tokens: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=60) as client:
        return [client.post("/v1/jobs", json={"prompt": f"bench job {i}: go", "max_new_tokens": tokens}).json()["id"]
                for i in range(jobs)]


def sources(count: int) -> list[str]:
    return [f"127.0.{1 + i // 250}.{2 + i % 250}" for i in range(count)]


# ---- modes -----------------------------------------------------------------------------------------------------


def mode_streams(args) -> dict:
    extra = {"MAX_STREAMS_PER_CLIENT": str(args.max_streams_per_client)} if args.max_streams_per_client else {}
    stack = paced_stack(max(args.jobs, 8), args.tokens_per_s, extra)
    try:
        store = redis.Redis.from_url(stack.env["REDIS_URL"])
        groups = stack_processes(stack)
        rss_before = sum(_rss_kb(p) for p in groups["gateway"])
        clients_idle = gateway_redis_clients(store)
        jobs = submit(stack.url, args.jobs, args.tokens)
        addrs = sources(args.sources)
        waits = int(args.streams * args.wait_share)
        plan = []
        for i in range(args.streams):
            job = jobs[i % len(jobs)]
            kind = "wait" if i < waits else "sse"
            path = f"/v1/jobs/{job}?wait=60" if kind == "wait" else f"/v1/jobs/{job}/events"
            plan.append((kind, path, addrs[i % len(addrs)]))
        plan.sort(key=lambda item: hash(item[1]) % 7)  # mix waits and streams over the opening
        lookups: list[float] = []
        lookup_errors: list[str] = []
        peak = {"clients": {}, "rss_kb": 0, "open_at": None}

        async def probe(done: asyncio.Event):
            async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
                while not done.is_set():
                    t = time.perf_counter()
                    try:
                        reply = await client.get(f"/v1/jobs/{jobs[0]}")
                    except httpx.HTTPError as exc:
                        lookup_errors.append(repr(exc))
                    else:
                        if reply.status_code == 200:
                            lookups.append(time.perf_counter() - t)
                        else:
                            lookup_errors.append(str(reply.status_code))
                    clients = await asyncio.to_thread(gateway_redis_clients, store)
                    if sum(clients.values()) > sum(peak["clients"].values()):
                        peak["clients"] = clients
                    rss = sum(_rss_kb(p) for p in groups["gateway"])
                    peak["rss_kb"] = max(peak["rss_kb"], rss)
                    await asyncio.sleep(0.1)

        async def drive():
            done = asyncio.Event()
            prober = asyncio.create_task(probe(done))
            merged = await asyncio.to_thread(run_load, stack.nginx.port, plan, args.processes, args.rate, args.tokens)
            done.set()
            await prober
            return merged

        with ForeignLoad() as foreign, CpuMeter(groups) as cpu:
            merged = asyncio.run(drive())
        lookups_ms = sorted(x * 1000 for x in lookups)
        result = {
            "mode": "streams", "streams": args.streams, "waits": waits, "jobs": args.jobs, "tokens": args.tokens,
            "tokens_per_s_per_seq": args.tokens_per_s, "load_processes": args.processes, "sources": args.sources,
            "open_rate_per_s": args.rate,
            "ok_streams": merged["streams"], "ok_waits": merged["waits"],
            "waits_answered_terminal": merged["waits_terminal"], "errors": len(merged["errors"]),
            "first_errors": merged["errors"][:5], "incomplete": merged["incomplete"],
            "jobs_with_differing_streams": merged["jobs_with_differing_streams"],
            "statuses": dict(merged["statuses"]), "token_events": merged["token_events"],
            "tokens_received": merged["tokens"],
            "lookup_p50_ms": round(statistics.median(lookups_ms), 2) if lookups_ms else None,
            "lookup_p99_ms": round(lookups_ms[int(0.99 * (len(lookups_ms) - 1))], 2) if lookups_ms else None,
            "lookups": len(lookups_ms), "lookup_errors": len(lookup_errors),
            "gateway_redis_clients_idle": clients_idle, "gateway_redis_clients_peak": peak["clients"],
            "gateway_rss_kb_before": rss_before, "gateway_rss_kb_peak": peak["rss_kb"],
            "rss_per_stream_kb": round((peak["rss_kb"] - rss_before) / args.streams, 1),
            "delay_p50_ms": histogram_percentile(merged["delays"], 0.5),
            "delay_p99_ms": histogram_percentile(merged["delays"], 0.99),
            "cpu_pct_of_one_core": {**cpu.pct, "load generator": round(100 * merged["cpu_s"] / merged["wall_s"], 1)},
            "load_wall_s": round(merged["wall_s"], 1), "opened_in_s": round(merged["opened_s"], 1),
            "foreign_cpu_pct": round(foreign.foreign_pct, 1),
        }
        return result
    finally:
        stack.stop()


def mode_relay(args) -> dict:
    stack = paced_stack(args.sequences, args.tokens_per_s, {})
    try:
        groups = stack_processes(stack)
        jobs = submit(stack.url, args.sequences, args.tokens)
        plan = [("sse", f"/v1/jobs/{job}/events", addr) for job, addr in zip(jobs, sources(len(jobs)))]
        with ForeignLoad() as foreign, CpuMeter(groups) as cpu:
            started = time.monotonic()
            merged = run_load(stack.nginx.port, plan, args.processes, 2000, args.tokens)
            wall = time.monotonic() - started
        result = {
            "mode": "relay", "sequences": args.sequences, "tokens": args.tokens,
            "tokens_per_s_per_seq": args.tokens_per_s, "offered_tokens_per_s": args.sequences * args.tokens_per_s,
            "load_processes": args.processes, "errors": len(merged["errors"]), "first_errors": merged["errors"][:5],
            "incomplete": merged["incomplete"], "token_events": merged["token_events"],
            "tokens_relayed": merged["tokens"], "relayed_tokens_per_s": round(merged["tokens"] / wall, 1),
            "ideal_s": round(args.tokens / args.tokens_per_s, 1), "wall_s": round(wall, 1),
            "delay_p50_ms": histogram_percentile(merged["delays"], 0.5),
            "delay_p99_ms": histogram_percentile(merged["delays"], 0.99),
            "cpu_pct_of_one_core": {**cpu.pct, "load generator": round(100 * merged["cpu_s"] / merged["wall_s"], 1)},
            # Each process's CPU per token relayed: what a host needs per core for a token rate, whatever the load.
            "cpu_us_per_token": {role: round(pct / 100 * wall * 1e6 / max(merged["tokens"], 1), 1)
                                 for role, pct in cpu.pct.items()}
                                | {"load generator": round(merged["cpu_s"] * 1e6 / max(merged["tokens"], 1), 1)},
            "foreign_cpu_pct": round(foreign.foreign_pct, 1),
        }
        return result
    finally:
        stack.stop()


def mode_publish(args) -> dict:
    """The worker's publishing path without the worker: `llamaq_worker.publishing.Publisher` itself, fed a new token
    for `per_step` of `--sequences` running jobs each step (all of them: a GPU's batched step; a few: a loop that
    steps for every token that comes due), on a redis-server of its own. Tokens/s, and CPU per token of this process
    (the worker's side: the Publisher, and building the step's outputs) and of Redis."""
    from llamaq_protocol import keys
    from llamaq_worker.engines.base import StepOutput
    from llamaq_worker.metrics import WorkerMetrics
    from llamaq_worker.publishing import Publisher, RedisRetry
    from llamaq_worker.settings import WorkerSettings
    from llamaq_worker.slots import Slot

    stack = Stack(dict(os.environ), free_port(), Path(tempfile.mkdtemp(prefix="llamaq-bench-publish-")))
    stack.start_redis()
    try:
        client = redis.Redis.from_url(stack.env["REDIS_URL"])
        rows = []
        for per_step in args.per_step:
            client.flushall()
            slots: dict[str, Slot] = {}
            for i in range(args.sequences):
                job = f"pub{i:04d}"
                client.hset(keys.job(job), mapping={"status": "running", "worker": "bench"})
                slots[job] = Slot(rq_job=None, queue=None, rq_execution=None, request_id=None, prompt_tokens=10,
                                  max_new_tokens=1_000_000, deadline=float("inf"))
            publisher = Publisher(client, "bench", slots, settings=WorkerSettings(),
                                  metrics=WorkerMetrics(lambda: (0, 0)), until_redis=RedisRetry(30, lambda: 0),
                                  stop_generating=lambda job_id, slot: None)
            jobs = list(slots)
            info0 = client.info("cpu")
            cpu0, t0 = time.process_time(), time.perf_counter()
            steps = tokens = 0
            while time.perf_counter() - t0 < args.seconds:
                for start in range(0, len(jobs), per_step):
                    publisher.publish([StepOutput(job, " tok", slots[job].completion_tokens + 1, None)
                                       for job in jobs[start:start + per_step]])
                    steps += 1
                    tokens += min(per_step, len(jobs) - start)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            info1 = client.info("cpu")
            redis_cpu = ((info1["used_cpu_user"] + info1["used_cpu_sys"])
                         - (info0["used_cpu_user"] + info0["used_cpu_sys"]))
            lost = sum(slot.lost for slot in slots.values())
            rows.append({"sequences_per_step": per_step, "steps_per_s": round(steps / wall, 1),
                         "tokens_per_s": round(tokens / wall, 1),
                         "client_cpu_us_per_token": round(1e6 * cpu / tokens, 1),
                         "redis_cpu_us_per_token": round(1e6 * redis_cpu / tokens, 1),
                         "client_cpu_pct": round(100 * cpu / wall, 1),
                         "redis_cpu_pct": round(100 * redis_cpu / wall, 1),
                         "lost": lost})
        errors = sum(row["lost"] for row in rows)
        return {"mode": "publish", "sequences": args.sequences, "rows": rows, "errors": errors, "incomplete": 0}
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    streams = sub.add_parser("streams")
    streams.add_argument("--streams", type=int, default=10_000)
    streams.add_argument("--jobs", type=int, default=250)
    streams.add_argument("--tokens", type=int, default=40)
    streams.add_argument("--tokens-per-s", type=float, default=1.0)
    streams.add_argument("--wait-share", type=float, default=0.2, help="share of clients doing ?wait= instead")
    streams.add_argument("--rate", type=float, default=1000, help="opens per second, all load processes together")
    streams.add_argument("--processes", type=int, default=2)
    streams.add_argument("--sources", type=int, default=100, help="loopback addresses the clients come from")
    streams.add_argument("--max-streams-per-client", type=int, default=0)
    relay = sub.add_parser("relay")
    relay.add_argument("--sequences", type=int, default=256)
    relay.add_argument("--tokens", type=int, default=250)
    relay.add_argument("--tokens-per-s", type=float, default=25.0)
    relay.add_argument("--processes", type=int, default=2)
    publish = sub.add_parser("publish")
    publish.add_argument("--sequences", type=int, default=256)
    publish.add_argument("--per-step", type=lambda v: [int(x) for x in v.split(",")], default=[256, 32, 4, 1])
    publish.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"open files limit: {raise_nofile()}; {os.cpu_count()} cores ({cpu_model()})", file=sys.stderr)
    with BenchFlag():
        result = {"streams": mode_streams, "relay": mode_relay, "publish": mode_publish}[args.mode](args)
    print(json.dumps(result))
    return 0 if not result["errors"] and not result["incomplete"] else 1


if __name__ == "__main__":
    sys.exit(main())
