"""Download progress in the logs.

modelscope draws tqdm bars, which need a terminal: in a container's log they are carriage-return runs that
never end a line. While a download runs, `DownloadProgress` logs how much of the model cache is on disk every
`interval_s` (partial files included, so a resumed download shows what it already has at once). The bars
themselves are turned off by TQDM_DISABLE=1: set in the worker image, and by `disable_tqdm_without_terminal`
for a process started elsewhere with its stderr in a file.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from .periodic import PeriodicReporter

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0


def disable_tqdm_without_terminal() -> bool:
    """Sets TQDM_DISABLE=1 when stderr is not a terminal and the variable is unset; True if bars are off.

    tqdm (>= 4.66) reads its TQDM_* variables once, when `tqdm.std` is imported (the `@envwrap` on
    `tqdm.__init__`), so this has to run before anything imports tqdm: modelscope
    (`from modelscope import snapshot_download`), transformers."""
    if "TQDM_DISABLE" in os.environ:
        return os.environ["TQDM_DISABLE"] != ""  # tqdm takes any non-empty value as true, "0" included
    if sys.stderr.isatty():
        return False
    os.environ["TQDM_DISABLE"] = "1"
    if "tqdm.std" in sys.modules:
        logger.warning("tqdm was imported before TQDM_DISABLE was set: its progress bars stay on")
        return False
    return True


def folder_usage(folder: str) -> tuple[int, int]:
    """(files, bytes) under `folder`, following no links; files that vanish while counted (renamed into place,
    removed) are skipped."""
    files = size = 0
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    size += entry.stat(follow_symlinks=False).st_size
                    files += 1
            except OSError:
                continue
    return files, size


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class DownloadProgress:
    """Context manager: logs the growth of `folder` from a daemon thread until the block ends."""

    def __init__(self, folder: str, interval_s: float = DEFAULT_INTERVAL_S):
        self.folder = folder
        self.interval_s = interval_s
        self._reporter: PeriodicReporter | None = None
        self._start_bytes = 0
        self._start_time = 0.0
        self._last_bytes = 0
        self._last_time = 0.0

    def __enter__(self) -> DownloadProgress:
        files, size = folder_usage(self.folder)
        self._start_bytes = self._last_bytes = size
        self._start_time = self._last_time = time.monotonic()
        logger.info("download starting: %s in %d files already under %s", human_bytes(size), files, self.folder)
        self._reporter = PeriodicReporter(self.interval_s, self.report, thread_name="download-progress")
        self._reporter.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._reporter is not None:
            self._reporter.stop()
        self.report(final=True, failed=exc_type is not None)

    def report(self, final: bool = False, failed: bool = False) -> None:
        files, size = folder_usage(self.folder)
        now = time.monotonic()
        rate = (size - self._last_bytes) / max(now - self._last_time, 1e-6)
        self._last_bytes, self._last_time = size, now
        grown = human_bytes(size - self._start_bytes)
        elapsed = now - self._start_time
        if final:
            logger.info(
                "download %s after %.0f s: %s in %d files under %s (+%s)",
                "stopped" if failed else "finished", elapsed, human_bytes(size), files, self.folder, grown,
            )
        else:
            logger.info(
                "downloading: %s in %d files under %s (+%s in %.0f s, %s/s now)",
                human_bytes(size), files, self.folder, grown, elapsed, human_bytes(rate),
            )
