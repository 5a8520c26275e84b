"""Where things are: the repository, its scripts, the benchmarks' document, the flag a measuring run holds."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
DOC = ROOT / "docs" / "benchmarks.md"
BENCH_FLAG = Path("/tmp/BENCH_RUNNING")
