"""Writing a benchmark's section into a markdown file (docs/benchmarks.md unless told) between its markers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from benchkit.paths import DOC


def update_doc(section: str, content: str, path: Path = DOC, *, writer: str) -> None:
    """Replace what lies between `<!-- BEGIN section (written by writer) -->` and `<!-- END section -->` with
    `content` (appended at the end of the file if there is no such section; the file made if missing). A rerun
    finds its section by the whole BEGIN marker, the writer's name included."""
    begin, end = f"<!-- BEGIN {section} (written by {writer}) -->", f"<!-- END {section} -->"
    block = f"{begin}\n{content.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"updated section {section!r} of {path}", file=sys.stderr)
