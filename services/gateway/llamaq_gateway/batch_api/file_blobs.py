"""The bytes of the Batch API's files, in a directory every gateway shares (FILES_DIR), and the line index of a batch
input file.

Why a directory: Redis holds every byte it stores in memory, so a few dozen 32 MiB uploads would fill it, and a full
Redis refuses jobs. A directory needs no new service and no new dependency: compose mounts one named volume into the
gateway (its gunicorn workers share it), Kubernetes a ReadWriteMany volume as it does for the models. S3-compatible
storage would suit gateways that share no file system; `FileBlobs`' few methods are where it would plug in.

The record in Redis (files.py) is the truth: a file's bytes are written (to a temporary name, synced, renamed, so a
reader never sees half a file) before its record, and removed after it. Bytes whose record is gone (expired, deleted,
or never written because a gateway died between the two) are removed by `sweep` once SWEEP_GRACE_S old.

A batch input's line index (`<file id>.lines`, built once when a batch first reads the file) holds, per request line,
its byte offset and length and whether its custom_id repeats an earlier line's, so the Batch API driver reads only the
lines it queues, never the whole file again.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
import uuid
from pathlib import Path
from typing import Any

# A file whose record is missing is removed only after this long: its upload may be between its two writes.
SWEEP_GRACE_S = 3600
INDEX_SUFFIX = ".lines"
TMP_PREFIX = ".tmp-"
# One entry per request line: byte offset, length, flags.
INDEX_ENTRY = struct.Struct("<QII")
DUPLICATE = 1
MAX_CUSTOM_ID_CHARS = 512
# What names a file's bytes in the directory (file-<24 hex>, file-<24 hex>-output, ...): files.FILE_ID_PATTERN.
NAME_PATTERN = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")


def request_lines(content: bytes):
    """(offset, line) of each non-blank line of JSONL bytes; lines end at b"\\n" only (JSON text may hold U+2028)."""
    start = 0
    while start < len(content):
        end = content.find(b"\n", start)
        end = len(content) if end < 0 else end
        line = content[start:end]
        if line.strip():
            yield start, line
        start = end + 1


def custom_id_error(entry: Any) -> str | None:
    """Why a parsed line cannot be a batch request on its own (its custom_id's uniqueness aside), or None."""
    if not isinstance(entry, dict):
        return "a line must be a JSON object"
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return f"custom_id: a string of 1 to {MAX_CUSTOM_ID_CHARS} characters is required"
    return None


def parse_line(raw: bytes) -> dict[str, Any] | str:
    """A request line as a dict, or the reason it is not one."""
    try:
        entry = json.loads(raw)
    except ValueError as exc:
        return f"not JSON: {exc}"
    return custom_id_error(entry) or entry


class FileBlobs:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"FILES_DIR {str(self.dir)!r} cannot be created: {exc}") from exc

    def path(self, file_id: str) -> Path:
        if not NAME_PATTERN.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.dir / file_id

    def _write(self, target: Path, content: bytes) -> None:
        tmp = self.dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, file_id: str, content: bytes) -> None:
        self._write(self.path(file_id), content)

    def read(self, file_id: str) -> bytes | None:
        try:
            return self.path(file_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, file_id: str) -> None:
        path = self.path(file_id)
        path.unlink(missing_ok=True)
        path.with_name(file_id + INDEX_SUFFIX).unlink(missing_ok=True)

    # ---- a batch input's line index --------------------------------------------------------------------------

    def line_count(self, file_id: str) -> int | None:
        """Request lines in a batch input, its index built first if need be; None when the file is gone."""
        index = self.path(file_id).with_name(file_id + INDEX_SUFFIX)
        try:
            return index.stat().st_size // INDEX_ENTRY.size
        except FileNotFoundError:
            pass
        content = self.read(file_id)
        if content is None:
            return None
        entries = bytearray()
        seen: set[str] = set()
        for offset, raw in request_lines(content):
            flags = 0
            entry = parse_line(raw)
            if isinstance(entry, dict):
                if entry["custom_id"] in seen:
                    flags = DUPLICATE
                seen.add(entry["custom_id"])
            entries += INDEX_ENTRY.pack(offset, len(raw), flags)
        self._write(index, bytes(entries))
        return len(entries) // INDEX_ENTRY.size

    def lines(self, file_id: str, first: int, count: int) -> list[dict[str, Any] | str] | None:
        """Request lines first .. first+count-1 of a batch input (its index built), each parsed: a dict, or why it is
        not a request. None when the file is gone."""
        path = self.path(file_id)
        try:
            with open(path.with_name(file_id + INDEX_SUFFIX), "rb") as index, open(path, "rb") as data:
                index.seek(first * INDEX_ENTRY.size)
                table = index.read(count * INDEX_ENTRY.size)
                found: list[dict[str, Any] | str] = []
                for offset, length, flags in INDEX_ENTRY.iter_unpack(table):
                    data.seek(offset)
                    entry = parse_line(data.read(length))
                    if flags & DUPLICATE and isinstance(entry, dict):
                        entry = f"custom_id: {entry['custom_id']!r} is used by an earlier line; each must be unique"
                    found.append(entry)
                return found
        except FileNotFoundError:
            return None

    # ---- expiry ----------------------------------------------------------------------------------------------

    def names(self) -> list[tuple[str, float]]:
        """(name, modification time) of everything in the directory."""
        found = []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                try:
                    found.append((entry.name, entry.stat().st_mtime))
                except FileNotFoundError:
                    continue
        return found

    def sweep(self, recorded: set[str], names: list[tuple[str, float]], now: float | None = None) -> int:
        """Removes what is older than SWEEP_GRACE_S and belongs to no file in `recorded` (the ids with a record,
        looked up for `names`, an earlier `names()`); returns how many it removed."""
        cutoff = (now or time.time()) - SWEEP_GRACE_S
        removed = 0
        for name, mtime in names:
            file_id = name.removesuffix(INDEX_SUFFIX)
            if mtime > cutoff or file_id in recorded:
                continue
            if not (name.startswith(TMP_PREFIX) or NAME_PATTERN.fullmatch(file_id)):
                continue  # not ours
            (self.dir / name).unlink(missing_ok=True)
            removed += 1
        return removed
