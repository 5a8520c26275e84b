"""Processes that must not outlive the worker.

vLLM runs its EngineCore (and that its model workers) in processes it spawns. Killed with SIGKILL (the OOM killer,
`kill -9`), the worker cannot stop them, and an orphaned EngineCore keeps the model's memory (on a GPU host, the
GPU) until someone kills it by hand; a restarted worker would then find no room. Linux's PR_SET_PDEATHSIG has the
kernel kill such a child the moment its parent dies. `die_with_parent` is registered as a vLLM general plugin
(services/worker/pyproject.toml), which vLLM calls early in every process it starts.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """In a process spawned by multiprocessing: be SIGKILLed when the spawning thread's process dies. Returns
    whether it was armed (False off Linux, or in a process of our own)."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent.pid:  # the parent died before the signal was armed
        os._exit(1)
    return True
