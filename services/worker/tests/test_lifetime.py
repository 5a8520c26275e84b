"""A process the worker spawns dies with it, even after kill -9 (vLLM's EngineCore)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from llamaq_worker.lifetime import die_with_parent

# A parent that spawns a child which arms die_with_parent, prints the child's pid, then waits to be killed.
PARENT = textwrap.dedent("""
    import multiprocessing, sys, time
    from llamaq_worker.lifetime import die_with_parent

    def child(ready):
        ready.put(die_with_parent())
        time.sleep(120)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Queue()
        proc = ctx.Process(target=child, args=(ready,))
        proc.start()
        print(proc.pid, ready.get(timeout=60), flush=True)
        time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie waiting for its reaper is gone for our purpose
        return fh.read().split()[2] != "Z"


def test_not_armed_in_a_process_of_our_own():
    assert die_with_parent() is False


def test_a_spawned_child_dies_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid, armed = parent.stdout.readline().split()
        assert armed == "True"
        child_pid = int(child_pid)
        assert alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child_pid)
    finally:
        parent.kill()
        parent.wait()
