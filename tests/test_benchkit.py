"""The benchmarks' kit (scripts/benchkit): its pure functions, and that every script uses the kit, not another
command. No stack, no model (tier `unit`); scripts/ is on sys.path (the root conftest.py)."""

from __future__ import annotations

import ast
import asyncio
import math
from collections import Counter
from pathlib import Path

import httpx
import pytest

from benchkit import histogram_percentile, percentile, sse_events, sse_lines, update_doc

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


# ---- percentiles ---------------------------------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([40, 10, 30, 20], 50) == 25  # unsorted input; halfway between 20 and 30
    assert percentile([10, 20, 30, 40], 95) == pytest.approx(38.5)  # rank 2.85: 30 + 0.85 * 10
    assert percentile([10, 20, 30, 40], 0) == 10
    assert percentile([10, 20, 30, 40], 100) == 40
    assert percentile([7.5], 95) == 7.5


def test_percentile_is_numpys_default():
    values = [0.3, 4.1, 2.2, 9.9, 5.0, 1.7, 3.3, 8.8, 6.4]
    expected = {50: 4.1, 95: 9.46, 99: 9.812}  # numpy.percentile(values, q), linear (its default)
    for q, value in expected.items():
        assert percentile(values, q) == pytest.approx(value)


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 50))


def test_histogram_percentile_is_nearest_rank():
    delays = Counter({1: 1, 2: 1, 3: 2})  # 1, 2, 3, 3 ms
    assert histogram_percentile(delays, 0.5) == 2  # a measured value, where percentile interpolates...
    assert percentile([1, 2, 3, 3], 50) == 2.5  # ...between two
    assert histogram_percentile(delays, 0.25) == 1
    assert histogram_percentile(delays, 0.99) == 3
    assert histogram_percentile(delays, 1.0) == 3
    assert histogram_percentile(Counter({5: 100}), 0.5) == 5


def test_histogram_percentile_of_nothing_is_none():
    assert histogram_percentile(Counter(), 0.5) is None


# ---- a section of docs/benchmarks.md --------------------------------------------------------------------------------


def test_update_doc_appends_a_missing_section(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nSome prose.\n")
    update_doc("hop", "| a | b |\n", doc, writer="scripts/x.py")
    assert doc.read_text() == ("# Benchmarks\n\nSome prose.\n\n<!-- BEGIN hop (written by scripts/x.py) -->\n"
                               "| a | b |\n<!-- END hop -->\n")


def test_update_doc_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("intro\n<!-- BEGIN hop (written by scripts/x.py) -->\nold\n<!-- END hop -->\nmiddle\n"
                   "<!-- BEGIN suite (written by scripts/x.py) -->\nsuite\n<!-- END suite -->\nend\n")
    update_doc("hop", r"new \1 \g<0> text", doc, writer="scripts/x.py")  # taken as it is, not as a replacement
    assert doc.read_text() == ("intro\n<!-- BEGIN hop (written by scripts/x.py) -->\nnew \\1 \\g<0> text\n"
                               "<!-- END hop -->\nmiddle\n<!-- BEGIN suite (written by scripts/x.py) -->\nsuite\n"
                               "<!-- END suite -->\nend\n")


def test_update_doc_finds_a_section_by_its_writer_too(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("<!-- BEGIN hop (written by scripts/x.py) -->\nx's\n<!-- END hop -->\n")
    update_doc("hop", "y's", doc, writer="scripts/y.py")
    text = doc.read_text()
    assert "x's" in text and text.endswith("<!-- BEGIN hop (written by scripts/y.py) -->\ny's\n<!-- END hop -->\n")


def test_update_doc_makes_a_missing_file(tmp_path):
    doc = tmp_path / "docs" / "new.md"
    update_doc("gpu", "figures", doc, writer="scripts/x.py")
    assert doc.read_text() == ("# Benchmarks\n\n<!-- BEGIN gpu (written by scripts/x.py) -->\nfigures\n"
                               "<!-- END gpu -->\n")


# ---- reading SSE ----------------------------------------------------------------------------------------------------


def test_sse_events_and_lines():
    body = ("event: token\r\ndata: {\"text\": \"a\u2028b\"}\r\n\r\n: ping\n\nid: 1\ndata: one\ndata: two\n\n"
            "event: done\ndata: {}\n\ntrailing").encode()

    async def read():
        events = [e async for e in sse_events(httpx.Response(200, content=body))]
        lines = [line async for line in sse_lines(httpx.Response(200, content=body))]
        return events, lines

    events, lines = asyncio.run(read())
    # U+2028 inside a token's JSON splits nothing; comments are skipped; data lines join with "\n"
    assert events == [("token", '{"text": "a\u2028b"}'), ("message", "one\ntwo"), ("done", "{}")]
    assert lines[:3] == ["event: token", 'data: {"text": "a\u2028b"}', ""]
    assert lines[-1] == "trailing"


# ---- the scripts use the kit --------------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_scripts_import_the_kit_and_no_benchmark_command():
    commands = {p.stem for p in SCRIPTS.glob("bench*.py")} | {"chaos_soak"}
    assert "bench" in commands
    for path in sorted(SCRIPTS.glob("*.py")):
        assert not imported_modules(path) & commands, f"{path.name} imports a benchmark command"
    for path in sorted((SCRIPTS / "benchkit").glob("*.py")):
        assert not imported_modules(path) & commands, f"benchkit/{path.name} imports a benchmark command"
