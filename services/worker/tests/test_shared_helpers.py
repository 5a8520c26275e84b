"""The torch-free helpers both engines and both progress loggers share: slot bookkeeping, periodic reports."""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import llamaq_worker  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaq_worker.periodic import PeriodicReporter
from llamaq_worker.engines.base import PRIORITY_BATCH, PRIORITY_INTERACTIVE, PRIORITY_OVER, SequenceSlots


@dataclass(eq=False)
class _Seq:
    seq_id: str
    canceled: bool = False


class _Slots(SequenceSlots[_Seq]):
    def add(self, seq_id: str, priority: int = PRIORITY_INTERACTIVE) -> None:
        self._enqueue(seq_id, lambda: _Seq(seq_id), priority)


def test_slots_fill_refuse_cancel_and_free() -> None:
    slots = _Slots(max_batch=2)
    slots.add("a")
    slots.add("b")
    assert (slots.active, slots.free_slots) == (2, 0)
    with pytest.raises(ValueError, match=r"^sequence 'a' is already active$"):
        slots.add("a")
    with pytest.raises(ValueError, match=r"^no free slot \(max_batch=2\)$"):
        slots.add("c")
    slots.cancel("b")
    slots.cancel("unknown")  # nothing to cancel: no error
    a, b = slots._take_pending()
    assert (a.canceled, b.canceled) == (False, True)
    assert slots._take_pending() == []
    assert slots.active == 2  # taken is not finished
    slots._release(a, b)
    assert (slots.active, slots.free_slots) == (0, 2)
    slots.add("a")  # the id is free again
    assert slots.active == 1


def test_release_leaves_a_newer_sequence_of_the_same_id() -> None:
    slots = _Slots(max_batch=1)
    slots.add("a")
    (old,) = slots._take_pending()
    slots._release(old)
    slots.add("a")
    slots._release(old)  # a second release of the finished one frees nothing
    assert slots.active == 1


def test_headroom_is_for_interactive_sequences_in_place_of_lower_ones() -> None:
    slots = _Slots(max_batch=2, headroom=1)
    # Interactive sequences alone: max_batch, as ever (more would only wait in the engine).
    assert (slots.free_slots, slots.free_slots_for(PRIORITY_INTERACTIVE)) == (2, 2)
    slots.add("a", PRIORITY_BATCH)
    slots.add("b", PRIORITY_OVER)
    assert (slots.free_slots_for(PRIORITY_BATCH), slots.free_slots_for(PRIORITY_INTERACTIVE)) == (0, 1)
    with pytest.raises(ValueError, match=r"^no free slot \(max_batch=2, headroom=1\)$"):
        slots.add("c", PRIORITY_BATCH)
    slots.add("i")  # interactive: the headroom
    assert (slots.active, slots.free_slots, slots.free_slots_for(PRIORITY_INTERACTIVE)) == (3, 0, 0)
    with pytest.raises(ValueError, match="no free slot"):
        slots.add("j")
    (a, b, i) = slots._take_pending()
    slots._release(a)  # one batch sequence left: room for one more interactive one (two of them, max_batch)
    assert (slots.free_slots_for(PRIORITY_BATCH), slots.free_slots_for(PRIORITY_INTERACTIVE)) == (0, 1)
    slots._release(b)
    assert (slots.free_slots_for(PRIORITY_BATCH), slots.free_slots_for(PRIORITY_INTERACTIVE)) == (1, 1)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"^max_batch must be >= 1$"):
        _Slots(max_batch=0)


def test_periodic_reporter_runs_until_the_block_ends() -> None:
    calls = []
    with PeriodicReporter(0.01, lambda: calls.append(threading.current_thread().name), thread_name="ticker"):
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    seen = len(calls)
    assert seen >= 3 and set(calls) == {"ticker"}
    time.sleep(0.05)
    assert len(calls) == seen
    assert "ticker" not in {t.name for t in threading.enumerate()}


def test_periodic_reporter_waits_one_interval_first() -> None:
    calls = []
    with PeriodicReporter(60, lambda: calls.append(1), thread_name="slow-ticker"):
        pass
    assert calls == []


def test_loading_progress_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from llamaq_worker.engines import loading_progress

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / "config.json").write_text("{}")
    caplog.set_level(logging.INFO, logger="llamaq_worker.engines")
    with loading_progress(str(tmp_path), every_s=0.01):
        time.sleep(0.1)
    messages = [r.getMessage() for r in caplog.records if r.name == "llamaq_worker.engines"]
    assert messages[0] == f"loading model weights: 1 file(s), 0.00 GiB from {tmp_path}"
    assert any(m.startswith("still loading the model (") and m.endswith(" s so far)") for m in messages[1:-1])
    assert messages[-1].startswith("model loaded in ")
