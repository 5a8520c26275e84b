"""Incremental detokenization and stop strings (engines.text), with a toy tokenizer: one id per character, and
multi-byte characters spread over several ids the way byte-level BPE does."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import llamaq_worker  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaq_worker.engines.text import IncrementalText


# ids < 256 are bytes; decoding is UTF-8 with replacement, as a byte-level tokenizer's is.
def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def ids_of(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def feed(text: IncrementalText, ids: list[int]) -> list[str]:
    """Each id added in turn, as an engine does; the pieces handed out along the way."""
    pieces = []
    for n in range(1, len(ids) + 1):
        text.add(ids[:n])
        if text.cut_at_stop():
            break
        pieces.append(text.releasable())
    return [p for p in pieces if p]


def test_partial_characters_are_held_until_whole() -> None:
    ids = ids_of("a€😀b")
    text = IncrementalText(decode)
    pieces = feed(text, ids)
    assert pieces == ["a", "€", "😀", "b"]
    assert text.rest() == ""


def test_flush_drops_a_trailing_partial_character() -> None:
    ids = ids_of("ok€")[:-1]
    text = IncrementalText(decode)
    assert feed(text, ids) == ["o", "k"]
    text.flush(ids)
    assert text.rest() == ""


def test_stop_string_cut_and_prefix_held_back() -> None:
    ids = ids_of("one, two. STOP here")
    text = IncrementalText(decode, stop=("STOP", "two!"))
    pieces = feed(text, ids)
    # "two" could begin "two!" and "S".."STO" could begin "STOP": held back until they cannot.
    assert "".join(pieces) + text.rest() == "one, two. "
    assert all("STO" not in p for p in pieces)


def test_stop_string_completed_by_the_flush() -> None:
    text = IncrementalText(decode, stop=("€",))
    ids = ids_of("x€")
    assert feed(text, ids[:-1]) == ["x"]
    text.flush(ids)
    assert text.cut_at_stop() and text.rest() == ""


def test_include_stop_keeps_the_stop_string() -> None:
    text = IncrementalText(decode, stop=("STOP",), include_stop=True)
    feed(text, ids_of("abcSTOPdef"))
    assert text.text == "abcSTOP"


def test_stop_strings_count_only_after_min_tokens() -> None:
    """Before `activate_stops` (min_tokens reached) nothing is cut nor held back; after, only new text counts."""
    text = IncrementalText(decode, stop=("ab",), stops_active=False)
    pieces = []
    ids = ids_of("abab-ab")
    for n in range(1, len(ids) + 1):
        text.add(ids[:n])
        if n == 3:  # min_tokens = 3: "aba" is in, the stop may begin only after it
            text.activate_stops()
        if text.cut_at_stop():
            break
        pieces.append(text.releasable())
    assert text.text == "abab-"  # "ab" at 2 overlaps the first 3 tokens' text ("aba"): not a stop; "ab" at 5 is
    assert "".join(pieces) == "abab-"
