"""The machine a benchmark runs on: what it is (for the record), how busy others keep it, and taking turns.

The machine is shared with other sessions whose processes `ps` may not show (other containers on this kernel), but
whose CPU time is in /proc/stat: `ForeignLoad` measures the share of the CPU not used by this benchmark's own
process tree, `wait_for_quiet` waits for it to drop, and `BenchFlag` holds /tmp/BENCH_RUNNING while measuring.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchkit.paths import BENCH_FLAG, ROOT


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def _proc_stat_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (counts every container on this kernel)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def _own_jiffies() -> int:
    """CPU jiffies used by this process and every live descendant (the servers it started)."""
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        parent[int(entry.name)] = int(rest[1])
        used[int(entry.name)] = int(rest[11]) + int(rest[12])  # utime + stime
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return sum(used.get(pid, 0) for pid in ours)


class ForeignLoad:
    """Share of the machine's CPU used by processes that are not this benchmark's, over an interval.

    Other containers on this kernel do not show in `ps` here, but their CPU time is in /proc/stat."""

    def __enter__(self):
        self.busy0, self.total0 = _proc_stat_jiffies()
        self.own0 = _own_jiffies()
        return self

    def __exit__(self, *exc):
        busy, total = _proc_stat_jiffies()
        own = _own_jiffies()
        span = max(1, total - self.total0)
        self.machine_pct = 100 * (busy - self.busy0) / span
        # descendants that exited meanwhile drop out of `own`: clamp at zero rather than over-count others
        self.foreign_pct = max(0.0, 100 * ((busy - self.busy0) - max(0, own - self.own0)) / span)


def foreign_load_now(seconds: float = 5) -> float:
    with ForeignLoad() as probe:
        time.sleep(seconds)
    return probe.foreign_pct


def wait_for_quiet(max_wait_s: float, threshold_pct: float) -> float:
    """Wait (up to max_wait_s) until other processes use under threshold_pct of the machine's CPU and nobody
    else holds /tmp/BENCH_RUNNING. Returns the last foreign-CPU reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        foreign_flag = BENCH_FLAG.exists() and BENCH_FLAG.read_text().strip() != str(os.getpid())
        foreign = foreign_load_now()
        if foreign < threshold_pct and not foreign_flag:
            return foreign
        if time.monotonic() > deadline:
            print(f"machine still busy after {max_wait_s:.0f} s (other processes {foreign:.0f}% CPU); "
                  "measuring anyway, load recorded", file=sys.stderr)
            return foreign
        print(f"waiting for a quiet machine: other processes use {foreign:.0f}% of the CPU"
              + (f"; {BENCH_FLAG} is held by another run" if foreign_flag else ""), file=sys.stderr)
        time.sleep(10)


class BenchFlag:
    """/tmp/BENCH_RUNNING while measuring, so others hold off."""

    def __enter__(self):
        BENCH_FLAG.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        try:
            if BENCH_FLAG.read_text().strip() == str(os.getpid()):
                BENCH_FLAG.unlink()
        except OSError:
            pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    """The machine for a section's record: cores, CPU model, Python, torch and transformers versions."""
    import importlib.metadata as md

    versions = []
    for pkg in ("torch", "transformers"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU; Python {platform.python_version()}, " + ", ".join(
        versions)


def git_revision() -> str:
    """This tree's commit, short, with " + uncommitted changes" when it has any; "unknown" without git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
