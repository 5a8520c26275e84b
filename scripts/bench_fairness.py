"""Fair share between API keys (issue "fair share"): one key's flood against another key's few jobs, through the
whole stack, with llamaq's fair queue and with the FIFO queue it replaced; and what one claim costs.

Scheduling (the default part). A stack with two keys (`API_KEYS=A,B`, weight 1 each) and `ENGINE=paced` (no model:
MAX_BATCH sequences, PACED_TOKENS_PER_S tokens per second each, so the queue's policy is all that is measured):
  alone   key B alone: B_JOBS jobs, one every B_EVERY_S, on the idle stack;
  flood   key A sends A_JOBS short jobs with `POST /v1/jobs` at A_RATE per second from one asyncio httpx client
          (open loop, steady), and B sends its B_JOBS jobs, one every B_EVERY_S, starting as A's last job is sent.
B's wait is `started_at - created_at` of its job record (`GET /v1/jobs/{id}?wait=`, once done); A's records are
read from the stack's Redis (the same fields, without 600 more requests through nginx's per-address rate). Engine
tokens/s: completion tokens of every job of the flood / (last `finished_at` - first `created_at`).
Systems: `fair`, this work tree as it is when the run starts (copied to a temporary folder: others edit the tree, and
one run must measure one version), once with MAX_CLIENT_SHARE=1, pure scheduling, and once per other `--shares`
value, A's 429s counted; `fifo`, the committed code before the fair queue (`git archive HEAD`, extracted by the caller
into `--fifo-tree`), its own scripts/devstack.py and its services first on PYTHONPATH. Every stack runs in a child
process started from its own tree; which code a stack runs is checked (the module file the tree's Python imports,
and where the waiting jobs were in Redis during the flood: the fair queue's lists, or RQ's list).

Claim cost (`--claim-cost`): one claim as the worker makes it (`PriorityQueue.dequeue_any`: the pop, then RQ's job
fetch; then CLAIM_SCRIPT and the LREM off the intermediate list) with 10 and with 10,000 jobs queued over 4 clients
(one job re-queued, untimed, after each claim, so the depth holds), on a private redis-server, median of
CLAIM_POPS claims, in microseconds; for both trees (FIFO: RQ's LMOVE pop and the claim script of that time).

    git archive HEAD | tar -x -C /tmp/llamaq-fifo     # the FIFO tree (read-only for git)
    .venv/bin/python scripts/bench_fairness.py --system both --claim-cost    # writes section "fairness"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (  # noqa: E402
    DOC, ROOT, BenchFlag, ForeignLoad, git_revision, machine_line, percentile, services_path, small_model,
    snapshot_worktree, update_doc, wait_for_quiet,
)

KEY_A, KEY_B = "fairness-bench-key-a", "fairness-bench-key-b"
QUEUE = "llamaq"
TERMINAL = {b"succeeded", b"failed", b"canceled"}
SECTION, HEADING = "fairness", "## Fair share between keys"
CLAIM_CLIENTS = 4


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


# ---- a stack in a child process, started from a given tree -------------------------------------------------------


def serve_stack(tree: Path) -> int:
    """Child mode: start the tree's Stack with this environment, print where it is, stop it when stdin closes."""
    sys.path.insert(0, str(tree / "scripts"))
    from devstack import Stack
    from nginx_local import free_port

    import llamaq_gateway.jobs
    import llamaq_worker.priority_queues as pq

    stack = Stack(dict(os.environ), free_port(), Path(tempfile.mkdtemp(prefix="llamaq-fairness-")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        stack.start(wait_ready_s=180)
        print(json.dumps({
            "url": stack.url, "redis_url": stack.env["REDIS_URL"], "workdir": str(stack.workdir),
            "worker_pid": stack.procs["worker"].pid, "gateway_pid": stack.procs["gateway"].pid,
            "priority_queues": pq.__file__, "gateway_jobs": llamaq_gateway.jobs.__file__,
            "has_batch_poll": hasattr(pq, "BATCH_POLL_S"),
        }), flush=True)
        sys.stdin.read()
    finally:
        stack.stop()
    return 0


class ChildStack:
    def __init__(self, tree: Path, env_overrides: dict[str, str]):
        env = dict(os.environ)
        env.pop("API_KEYS_FILE", None)
        env.update(LOG_LEVEL="INFO", PYTHONPATH=services_path(tree), **env_overrides)
        self.env = env
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_stack", str(tree)],
                                     env=env, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise RuntimeError(f"the stack from {tree} did not start (exit {self.proc.returncode})")
        self.info = json.loads(line)
        self.url, self.redis_url = self.info["url"], self.info["redis_url"]
        # The environment the worker really runs with (its PYTHONPATH names the tree whose code it imports).
        environ = Path(f"/proc/{self.info['worker_pid']}/environ").read_bytes().split(b"\0")
        self.info["worker_pythonpath"] = next((e[11:].decode() for e in environ if e.startswith(b"PYTHONPATH=")), "")
        print(f"stack from {tree} on {self.url} (logs in {self.info['workdir']}); worker imports "
              f"{self.info['priority_queues']}", file=sys.stderr)

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(30)


# ---- the scenario -------------------------------------------------------------------------------------------------


class QueueSampler(threading.Thread):
    """Where waiting jobs are, every 0.1 s: RQ's interactive list (FIFO) or the fair queue's count."""

    def __init__(self, redis_url: str):
        super().__init__(daemon=True)
        import redis

        self.r = redis.Redis.from_url(redis_url)
        self.max_rq = self.max_fair = 0
        self.stopping = threading.Event()

    # The jobs in the fair queue's interactive tier: every waiting client's list (records.FAIR_LUA's layout).
    FAIR_COUNT = ("local n = 0 for _, c in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do "
                  "n = n + redis.call('LLEN', ARGV[1] .. c) end return n")

    def run(self) -> None:
        tier = f"llamaq:fq:{QUEUE}:interactive"
        while not self.stopping.wait(0.1):
            with self.r.pipeline(transaction=False) as pipe:
                pipe.llen(f"rq:queue:{QUEUE}")
                pipe.eval(self.FAIR_COUNT, 1, f"{tier}:clients", f"{tier}:jobs:")
                rq_len, fair = pipe.execute()
            self.max_rq = max(self.max_rq, rq_len)
            self.max_fair = max(self.max_fair, int(fair or 0))

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.r.close()


async def submit(client, key: str, i: int, tokens: int) -> tuple[int, str | None, str]:
    resp = await client.post("/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                             json={"prompt": f"job {i}: tell me something short", "max_new_tokens": tokens})
    if resp.status_code == 202:
        return 202, resp.json()["id"], ""
    try:
        code = resp.json()["error"]["code"]
    except Exception:  # noqa: BLE001
        code = resp.text[:80]
    return resp.status_code, None, str(code)


async def send_b(client, args, t0: float) -> list[str]:
    loop = asyncio.get_running_loop()
    ids = []
    for i in range(args.b_jobs):
        delay = t0 + i * args.b_every_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        status, job_id, code = await submit(client, KEY_B, 10_000 + i, args.tokens)
        if status != 202:
            raise RuntimeError(f"B's job {i}: {status} {code}")
        ids.append(job_id)
    return ids


async def wait_b(client, job_id: str) -> dict:
    while True:
        resp = await client.get(f"/v1/jobs/{job_id}", params={"wait": 60},
                                headers={"Authorization": f"Bearer {KEY_B}"})
        resp.raise_for_status()
        job = resp.json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"B's job {job_id}: {job}")
            return job


async def scenario(url: str, redis_url: str, args, flood: bool) -> dict:
    import httpx
    import redis.asyncio as aioredis

    store = aioredis.Redis.from_url(redis_url)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        loop = asyncio.get_running_loop()
        a_tasks = []
        if flood:
            t0 = loop.time()
            for i in range(args.a_jobs):
                delay = t0 + i / args.a_rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                a_tasks.append(asyncio.create_task(submit(client, KEY_A, i, args.tokens)))
        b_ids = await send_b(client, args, loop.time())
        a_results = await asyncio.gather(*a_tasks)
        a_ids = [job_id for _, job_id, _ in a_results if job_id]
        b_jobs = await asyncio.gather(*[wait_b(client, job_id) for job_id in b_ids])
        # Every job of A done: its record terminal.
        deadline = time.monotonic() + 600
        while a_ids:
            statuses = await store.eval(
                "local n = 0 for i, k in ipairs(KEYS) do local s = redis.call('HGET', k, 'status') "
                "if s == 'queued' or s == 'running' then n = n + 1 end end return n", len(a_ids),
                *[f"llamaq:job:{j}" for j in a_ids])
            if statuses == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{statuses} of A's jobs still not done")
            await asyncio.sleep(0.25)
        async with store.pipeline(transaction=False) as pipe:
            for job_id in a_ids:
                pipe.hmget(f"llamaq:job:{job_id}", "status", "created_at", "started_at", "finished_at", "output")
            records = await pipe.execute()
    await store.aclose()
    a_jobs = []
    for status, created, started, finished, output in records:
        if status != b"succeeded":
            raise RuntimeError(f"one of A's jobs ended {status}")
        a_jobs.append({"created": ts(created.decode()), "started": ts(started.decode()),
                       "finished": ts(finished.decode()),
                       "tokens": json.loads(output)["usage"]["completion_tokens"]})
    b = [{"created": ts(j["created_at"]), "started": ts(j["started_at"]), "finished": ts(j["finished_at"]),
          "tokens": j["output"]["usage"]["completion_tokens"]} for j in b_jobs]
    every = a_jobs + b
    span = max(j["finished"] for j in every) - min(j["created"] for j in every)
    tokens = sum(j["tokens"] for j in every)
    b_wait = [j["started"] - j["created"] for j in b]
    a_wait = [j["started"] - j["created"] for j in a_jobs]
    codes = Counter(f"{s} {c}".strip() for s, _, c in a_results if s != 202)
    return {"a_accepted": len(a_ids), "a_refused": sum(codes.values()), "a_refusals": dict(codes),
            "b_p50_s": percentile(b_wait, 50), "b_p95_s": percentile(b_wait, 95), "b_max_s": max(b_wait),
            "a_p50_s": percentile(a_wait, 50) if a_wait else None,
            "a_p95_s": percentile(a_wait, 95) if a_wait else None,
            "tokens": tokens, "span_s": span, "tokens_per_s": tokens / span}


def run_system(name: str, tree: Path, share: str, args, with_alone: bool) -> dict:
    env = dict(MODEL_PATH=small_model(), DEVICE="cpu", ENGINE="paced", PACED_TOKENS_PER_S=str(args.tokens_per_s),
               MAX_BATCH=str(args.max_batch), MAX_QUEUE=str(args.max_queue), API_KEYS=f"{KEY_A},{KEY_B}")
    if share:
        env["MAX_CLIENT_SHARE"] = share
    stack = ChildStack(tree, env)
    try:
        row = {"system": name, "share": share or "-", "tree": str(tree), "code": stack.info}
        if with_alone:
            row["alone"] = asyncio.run(scenario(stack.url, stack.redis_url, args, flood=False))
            print(json.dumps({"system": name, "alone": row["alone"]}), flush=True)
        sampler = QueueSampler(stack.redis_url)
        sampler.start()
        with ForeignLoad() as load:
            row["flood"] = asyncio.run(scenario(stack.url, stack.redis_url, args, flood=True))
        sampler.stop()
        row["flood"]["max_waiting_rq_list"], row["flood"]["max_waiting_fair"] = sampler.max_rq, sampler.max_fair
        row["foreign_cpu_pct"] = round(load.foreign_pct, 1)
        print(json.dumps({"system": name, "share": row["share"], "flood": row["flood"],
                          "foreign_cpu_pct": row["foreign_cpu_pct"]}), flush=True)
    finally:
        stack.stop()
    # The code it ran, checked: the fair tree imports no BATCH_POLL_S and queues in the fair lists; FIFO the opposite.
    fifo_code = stack.info["has_batch_poll"]
    rq_list, fair_lists = row["flood"]["max_waiting_rq_list"] > 0, row["flood"]["max_waiting_fair"] > 0
    expect = name == "fifo"
    if (fifo_code != expect or rq_list != expect or fair_lists == expect
            or not stack.info["priority_queues"].startswith(str(tree))):
        raise RuntimeError(f"{name}: the stack did not run {tree}'s queue: {stack.info}, {row['flood']}")
    return row


# ---- claim cost ---------------------------------------------------------------------------------------------------


def claim_cost_child(tree: Path, system: str, depths: list[int], pops: int) -> int:
    """Child mode (the tree's services on PYTHONPATH): the claim's cost at each depth, as JSON."""
    sys.path.insert(0, str(tree / "scripts"))
    sys.path.insert(0, str(tree / "tests"))
    import redis
    import redis.asyncio as aioredis
    from rq.serializers import JSONSerializer

    from devstack import Stack
    from llamaq_gateway.jobs import JobService
    from llamaq_gateway.settings import GatewaySettings
    from llamaq_protocol import GenerationParams, keys
    from llamaq_protocol.records import CLAIM_SCRIPT, claim_keys
    from llamaq_worker.priority_queues import PriorityQueue
    from nginx_local import free_port

    stack = Stack(dict(os.environ), free_port(), Path(tempfile.mkdtemp(prefix="llamaq-claim-cost-")))
    stack.start_redis()
    url = stack.env["REDIS_URL"]
    out = {"system": system, "module": sys.modules["llamaq_worker.priority_queues"].__file__}
    try:
        r = redis.Redis.from_url(url)
        loop = asyncio.new_event_loop()
        for depth in depths:
            r.flushall()
            settings = GatewaySettings(redis_url=url, max_queue=depth + 100, max_client_share=1)
            aio = aioredis.Redis.from_url(url)
            jobs = JobService(settings, aio, r, hub=None)
            params = GenerationParams(prompt="hi", max_new_tokens=20)
            if system == "fair":
                from llamaq_gateway.callers import Caller

                callers = [Caller(owner=f"owner-{i}", client=f"c{i}", account=f"c{i}", list_owner=f"owner-{i}")
                           for i in range(CLAIM_CLIENTS)]

                def one(i):
                    c = callers[i % CLAIM_CLIENTS]
                    return jobs.enqueue(params, c.owner, None, None, caller=c, prompt_tokens=10)
            else:
                def one(i):
                    return jobs.enqueue(params, f"owner-{i % CLAIM_CLIENTS}", None, None)

            async def fill(n, start):
                for i in range(start, start + n):
                    await one(i)

            loop.run_until_complete(fill(depth, 0))
            queues = [PriorityQueue(name, connection=r, serializer=JSONSerializer)
                      for name in keys.queue_names(settings.queue_name)]
            claim = r.register_script(CLAIM_SCRIPT)
            pop_us, claim_us, total_us = [], [], []
            # Redis' own time for each command (SLOWLOG, every command logged): free of this client's CPU contention.
            r.config_set("slowlog-max-len", 1_000_000)
            r.config_set("slowlog-log-slower-than", 0)
            r.slowlog_reset()
            load = ForeignLoad().__enter__()
            for n in range(pops + 10):
                t0 = time.perf_counter()
                job, queue = PriorityQueue.dequeue_any(queues, None, connection=r, serializer=JSONSerializer)
                t1 = time.perf_counter()
                assert claim(keys=claim_keys(job.id), args=["2026-01-01T00:00:00+00:00", "w:1", job.id]) == b"claimed"
                r.lrem(queue.intermediate_queue_key, 1, job.id)
                t2 = time.perf_counter()
                if n >= 10:  # the first few warm the connection and Redis' script cache
                    pop_us.append((t1 - t0) * 1e6)
                    claim_us.append((t2 - t1) * 1e6)
                    total_us.append((t2 - t0) * 1e6)
                loop.run_until_complete(fill(1, depth + n))  # untimed: the depth holds
            load.__exit__(None, None, None)
            r.config_set("slowlog-log-slower-than", 10_000)
            server = {"pop": [], "claim": []}
            claim_call = b"EVALSHA " + claim.sha.encode() + b" "
            for entry in reversed(r.slowlog_get(-1)):  # oldest first
                cmd = entry["command"]
                # (Redis 7 also logs the commands a script runs, each on its own: those are not counted)
                if cmd.startswith(b"LMOVE ") or (cmd.startswith((b"EVAL ", b"EVALSHA "))
                                                 and b" llamaq:job: llamaq:fq:" in cmd):
                    server["pop"].append(entry["duration"])
                elif cmd.startswith(claim_call):
                    server["claim"].append(entry["duration"])
            # (a script's first EVALSHA may be logged twice: NOSCRIPT, then loaded and sent again)
            if len(server["pop"]) not in (pops + 10, pops + 11) or len(server["claim"]) not in (pops + 10, pops + 11):
                raise RuntimeError(f"slowlog: {len(server['pop'])} pops, {len(server['claim'])} claims")
            out[str(depth)] = {"pop_us": statistics.median(pop_us), "claim_us": statistics.median(claim_us),
                               "total_us": statistics.median(total_us), "pops": len(total_us),
                               "server_pop_us": statistics.median(server["pop"][-pops:]),
                               "server_claim_us": statistics.median(server["claim"][-pops:]),
                               "foreign_cpu_pct": round(load.foreign_pct, 1)}
            loop.run_until_complete(aio.aclose())
        print(json.dumps(out), flush=True)
    finally:
        stack.stop()
    return 0


def claim_cost(system: str, tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=services_path(tree))
    env.pop("API_KEYS", None)
    env.pop("API_KEYS_FILE", None)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_claim", str(tree), system,
                           "--claim-depths", args.claim_depths, "--claim-pops", str(args.claim_pops)],
                          env=env, cwd=tree, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"claim cost on {system} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["module"].startswith(str(tree)):
        raise RuntimeError(f"claim cost on {system} imported {result['module']}")
    print(json.dumps(result), flush=True)
    return result


# ---- output -------------------------------------------------------------------------------------------------------


def sched_table(rows: list[dict], args) -> list[str]:
    lines = ["| system | MAX_CLIENT_SHARE | B alone p50 / p95 (s) | B behind A p50 / p95 / max (s) | "
             "A's wait p50 / p95 (s) | A accepted / refused | jobs waiting, max | engine tokens/s | other CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        f, alone = row["flood"], row.get("alone")
        alone_s = f"{alone['b_p50_s']:.3f} / {alone['b_p95_s']:.3f}" if alone else "–"
        waiting = max(f["max_waiting_rq_list"], f["max_waiting_fair"])
        refused = f"{f['a_refused']}" + (" (" + ", ".join(f"{k}: {v}" for k, v in f["a_refusals"].items()) + ")"
                                         if f["a_refused"] else "")
        lines.append(f"| {row['system']} | {row['share']} | {alone_s} | {f['b_p50_s']:.3f} / {f['b_p95_s']:.3f} / "
                     f"{f['b_max_s']:.3f} | {f['a_p50_s']:.2f} / {f['a_p95_s']:.2f} | {f['a_accepted']} / {refused} | "
                     f"{waiting} | {f['tokens_per_s']:.1f} ({f['tokens']} in {f['span_s']:.1f} s) | "
                     f"{row['foreign_cpu_pct']:.0f}% |")
    return lines


def claim_table(results: list[dict], depths: list[int]) -> list[str]:
    lines = ["| system | queued jobs | pop, in Redis (µs) | claim script, in Redis (µs) | pop, round trip ¹ (µs) | "
             "claim + LREM, round trip (µs) | one claim, round trip (µs) | other CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for depth in depths:
            c = res[str(depth)]
            lines.append(f"| {res['system']} | {depth:,} | {c['server_pop_us']:.0f} | {c['server_claim_us']:.0f} | "
                         f"{c['pop_us']:.0f} | {c['claim_us']:.0f} | {c['total_us']:.0f} | "
                         f"{c['foreign_cpu_pct']:.0f}% |")
    return lines


def verdict(rows: list[dict]) -> list[str]:
    by = {(r["system"], r["share"]): r for r in rows}
    fair = by.get(("fair", "1"))
    fifo = by.get(("fifo", "-"))
    out = []
    if fair:
        alone = fair["alone"]["b_p95_s"] if fair.get("alone") else None
        goal = max(2.0, 3 * alone) if alone is not None else 2.0
        p95 = fair["flood"]["b_p95_s"]
        out.append(f"- fair queue: B's p95 behind A's flood {p95:.3f} s against a goal of max(2 s, 3 × its "
                   f"{alone:.3f} s alone) = {goal:.2f} s: {'met' if p95 <= goal else 'NOT met'}")
    if fair and fifo:
        ratio = fair["flood"]["tokens_per_s"] / fifo["flood"]["tokens_per_s"]
        out.append(f"- engine tokens/s, fair / FIFO = {ratio:.3f} ({fair['flood']['tokens_per_s']:.1f} / "
                   f"{fifo['flood']['tokens_per_s']:.1f}); goal within 5 %: "
                   + ("met" if abs(ratio - 1) <= 0.05 else "NOT met"))
        out.append(f"- FIFO: B's p95 {fifo['flood']['b_p95_s']:.2f} s (p50 {fifo['flood']['b_p50_s']:.2f} s), "
                   f"alone {fifo['alone']['b_p95_s']:.3f} s")
    return out


# The fair queue's code, which other work in this tree may be changing: its files' digests pin what was measured.
FAIR_FILES = ("services/protocol/llamaq_protocol/records.py", "services/worker/llamaq_worker/priority_queues.py",
              "services/gateway/llamaq_gateway/jobs.py")


def fair_digest(tree: Path) -> str:
    import hashlib

    return ", ".join(f"`{Path(f).name}` {hashlib.sha256((tree / f).read_bytes()).hexdigest()[:10]}"
                     for f in FAIR_FILES)


def write_doc(args, rows, claims, quiet, command, digest) -> None:
    depths = [int(d) for d in args.claim_depths.split(",")]
    parts = [f"Command: `{command}` (code at {git_revision()}, copied when the run started: the fair queue's files at "
             f"sha256 {digest}; FIFO: the committed code, `git archive HEAD`, before the fair queue). Machine: "
             f"{machine_line()}; other processes used {quiet:.0f}% of the CPU just before."]
    if rows:
        parts.append(f"""`ENGINE=paced` ({args.max_batch} sequences at {args.tokens_per_s:g} tokens/s each, \
{args.max_batch * args.tokens_per_s:g} tokens/s at most), the whole stack (nginx, 2 gateway processes, Redis, the
worker), `API_KEYS` with two keys of weight 1, `MAX_QUEUE` {args.max_queue}. *alone*: key B's {args.b_jobs} jobs, one
every {args.b_every_s:g} s, on the idle stack. *behind A*: key A sends {args.a_jobs} jobs at {args.a_rate:g} per
second with `POST /v1/jobs` (one asyncio httpx client, open loop), then B its {args.b_jobs} as A's last is sent.
Every job {args.tokens} tokens. Wait: `started_at - created_at` of the job record. Engine tokens/s: completion
tokens of all jobs of the flood / (last finish - first submit). "jobs waiting, max": the deepest the queue got
(sampled every 0.1 s, in RQ's list for FIFO, in the fair queue's lists for fair: which code ran is checked).

{chr(10).join(sched_table(rows, args))}

{chr(10).join(verdict(rows))}""")
    if claims:
        parts.append(f"""One claim as the worker makes it (`PriorityQueue.dequeue_any`, then the claim script and
the LREM off the intermediate list; RQ's job start is the same in both and left out), on a private redis-server,
{CLAIM_CLIENTS} clients' jobs queued, median of {args.claim_pops} claims, the depth held by a job queued (untimed)
after each; FIFO: RQ's LMOVE pop of the committed code. *In Redis*: each command's own time, from Redis' SLOWLOG
(every command logged while measuring): the pop's script (fair) or LMOVE (FIFO), and the claim script.
¹ *Round trip*: as the worker's Python sees it; the pop includes RQ's fetch of the job (HGETALL and deserializing).

{chr(10).join(claim_table(claims, depths))}""")
    body = "\n\n".join(parts)
    text = DOC.read_text()
    if f"<!-- BEGIN {SECTION} " not in text:
        DOC.write_text(text.rstrip() + f"\n\n{HEADING}\n")
    update_doc(SECTION, body, writer="scripts/bench_fairness.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("fair", "fifo", "both"), default="both")
    parser.add_argument("--fifo-tree", type=Path, default=Path("/tmp/llamaq-fifo"))
    parser.add_argument("--shares", default="1,0.5", help="MAX_CLIENT_SHARE values for the fair stack (first: "
                        "the one measured alone too)")
    parser.add_argument("--a-jobs", type=int, default=600)
    parser.add_argument("--a-rate", type=float, default=60)
    parser.add_argument("--b-jobs", type=int, default=8)
    parser.add_argument("--b-every-s", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=20, help="max_new_tokens of every job")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--tokens-per-s", type=float, default=50)
    parser.add_argument("--max-queue", type=int, default=1000)
    parser.add_argument("--claim-cost", action="store_true", help="also measure one claim's cost")
    parser.add_argument("--no-sched", action="store_true", help="skip the stacks (with --claim-cost)")
    parser.add_argument("--claim-depths", default="10,10000")
    parser.add_argument("--claim-pops", type=int, default=200)
    parser.add_argument("--wait-quiet-s", type=float, default=60)
    parser.add_argument("--quiet-pct", type=float, default=25)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--_stack", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_claim", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._stack:
        return serve_stack(args._stack)
    if args._claim:
        return claim_cost_child(Path(args._claim[0]), args._claim[1],
                                [int(d) for d in args.claim_depths.split(",")], args.claim_pops)
    systems = ["fair", "fifo"] if args.system == "both" else [args.system]
    trees = {"fair": snapshot_worktree("llamaq-fair-tree-") if "fair" in systems else ROOT,
             "fifo": args.fifo_tree.resolve()}
    print(f"fair: this tree as of now, copied to {trees['fair']}", file=sys.stderr)
    if "fifo" in systems and not (trees["fifo"] / "services" / "worker").is_dir():
        parser.error(f"no FIFO tree at {trees['fifo']}: git archive HEAD | tar -x -C {trees['fifo']}")
    command = ".venv/bin/python scripts/bench_fairness.py " + " ".join(sys.argv[1:])
    quiet = wait_for_quiet(args.wait_quiet_s, args.quiet_pct)
    digest = fair_digest(trees["fair"])
    rows, claims = [], []
    with BenchFlag():
        if not args.no_sched:
            for system in systems:
                shares = args.shares.split(",") if system == "fair" else [""]
                for n, share in enumerate(shares):
                    rows.append(run_system(system, trees[system], share, args, with_alone=n == 0))
        if args.claim_cost:
            for system in systems:
                claims.append(claim_cost(system, trees[system], args))
    if rows:
        print("\n".join(sched_table(rows, args)))
        print("\n".join(verdict(rows)))
    if claims:
        print("\n".join(claim_table(claims, [int(d) for d in args.claim_depths.split(",")])))
    if not args.no_doc:
        write_doc(args, rows, claims, quiet, command.strip(), digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
