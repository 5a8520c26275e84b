"""The benchmarks' kit: what scripts/bench*.py and scripts/chaos_soak.py share; each script is a command that uses it.

    paths    ROOT, SCRIPTS, DOC (docs/benchmarks.md), BENCH_FLAG (/tmp/BENCH_RUNNING)
    stats    percentile (interpolated, every table's), histogram_percentile (nearest rank, bench_streams')
    docs     update_doc: a section of a markdown file between its BEGIN/END markers
    machine  machine_line, cpu_model, git_revision, loadavg; ForeignLoad (others' share of the CPU), wait_for_quiet,
             BenchFlag (taking turns on a shared machine)
    stacks   start_stack (scripts/devstack.py's Stack), Baseline (scripts/baseline_server.py), VllmServe, small_model,
             services_path and snapshot_worktree (a stack run from a frozen copy of the tree)
    load     PROMPTS, sse_lines / sse_events, the closed-loop clients (one_llamaq, one_original, run_load, RunStats)

The scripts run as `.venv/bin/python scripts/<name>.py`, so scripts/ is on sys.path and `import benchkit` finds this
package; tests import it the same way (the root conftest.py puts scripts/ on sys.path).
"""

from benchkit.docs import update_doc
from benchkit.load import PROMPTS, Result, RunStats, one_llamaq, one_original, run_load, sse_events, sse_lines
from benchkit.machine import (
    BenchFlag, ForeignLoad, cpu_model, foreign_load_now, git_revision, loadavg, machine_line, wait_for_quiet,
)
from benchkit.paths import BENCH_FLAG, DOC, ROOT, SCRIPTS
from benchkit.stacks import (
    SERVED_NAME, TOOL_TEMPLATE, Baseline, VllmServe, services_path, small_model, snapshot_worktree, start_stack,
)
from benchkit.stats import histogram_percentile, percentile

__all__ = [
    "BENCH_FLAG", "DOC", "PROMPTS", "ROOT", "SCRIPTS", "SERVED_NAME", "TOOL_TEMPLATE", "Baseline", "BenchFlag",
    "ForeignLoad", "Result", "RunStats", "VllmServe", "cpu_model", "foreign_load_now", "git_revision",
    "histogram_percentile", "loadavg", "machine_line", "one_llamaq", "one_original", "percentile", "run_load",
    "services_path", "small_model", "snapshot_worktree", "sse_events", "sse_lines", "start_stack", "update_doc",
    "wait_for_quiet",
]
