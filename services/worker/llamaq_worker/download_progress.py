"""Download progress in the logs.

modelscope draws tqdm bars, which need a terminal: in a container's log they are carriage-return runs that
never end a line. While a download runs, `DownloadProgress` logs how much of the model cache is on disk every
`interval_s` (partial files included, so a resumed download shows what it already has at once), and tqdm's
bars are turned off when stderr is not a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from .periodic import PeriodicReporter

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0


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

    def __init__(self, folder: str, interval_s: float = DEFAULT_INTERVAL_S, quiet_tqdm: bool | None = None):
        self.folder = folder
        self.interval_s = interval_s
        # tqdm's bars off when nobody watches a terminal (TQDM_DISABLE is read by tqdm >= 4.66).
        self.quiet_tqdm = (not sys.stderr.isatty()) if quiet_tqdm is None else quiet_tqdm
        self._reporter: PeriodicReporter | None = None
        self._saved_tqdm_env: str | None = None
        self._start_bytes = 0
        self._start_time = 0.0
        self._last_bytes = 0
        self._last_time = 0.0

    def __enter__(self) -> DownloadProgress:
        if self.quiet_tqdm:
            self._saved_tqdm_env = os.environ.get("TQDM_DISABLE")
            os.environ["TQDM_DISABLE"] = "1"
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
        if self.quiet_tqdm:
            if self._saved_tqdm_env is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = self._saved_tqdm_env
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
