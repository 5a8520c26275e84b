"""The Batch API's files (`/v1/files`): JSONL inputs uploaded by clients and the output and error files of batches.

Each file's metadata lives in Redis, so it survives a restart exactly as jobs do (compose and k8s run Redis with its
append-only file): a hash expiring FILE_TTL_S after creation (OpenAI's `expires_at`), listed per owner in a sorted
set by creation time. The bytes lie in FILES_DIR, a directory every gateway shares (file_blobs.py says why), written
before the record and removed after it.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import redis.exceptions

from llamaq_protocol import keys

from .file_blobs import INDEX_SUFFIX, FileBlobs, request_lines
from ..errors import InvalidParameter, NotFound, PayloadTooLarge, StorageQuotaExceeded
from ..job_list import cursor_start

# OpenAI's purposes: clients upload `batch`; batches write `batch_output` (both their output and error file).
PURPOSE_BATCH = "batch"
PURPOSE_BATCH_OUTPUT = "batch_output"
FILE_ID_PREFIX = "file-"
# What a file id may be (uploads: file-<24 hex>; a batch's: file-<24 hex>-output / -error); anything else is a 404
# without a look in Redis (an id with a ':' would name another key, `file-<id>:content`, of another type).
FILE_ID_PATTERN = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")
MAX_FILENAME_CHARS = 256


def new_file_id() -> str:
    return FILE_ID_PREFIX + uuid.uuid4().hex[:24]


def file_object(file_id: str, record: dict[bytes, bytes]) -> dict[str, Any]:
    """The OpenAI `file` object of a stored file's record."""
    text = {k.decode(): v.decode() for k, v in record.items()}
    return {
        "id": file_id,
        "object": "file",
        "bytes": int(text["bytes"]),
        "created_at": int(text["created_at"]),
        "expires_at": int(text["expires_at"]),
        "filename": text["filename"],
        "purpose": text["purpose"],
        "status": "processed",
        "status_details": None,
    }


def check_batch_input(content: bytes, max_bytes: int, max_lines: int) -> int:
    """An upload for `purpose=batch` must be UTF-8 JSONL within the limits; returns its number of non-empty lines.
    The lines themselves are judged when a batch runs them (a bad line goes to the error file, not the batch)."""
    if len(content) > max_bytes:
        raise PayloadTooLarge(f"file: {len(content)} bytes; at most {max_bytes} are accepted (MAX_FILE_BYTES)",
                              param="file")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameter(f"file: not UTF-8 text ({exc.reason} at byte {exc.start})", param="file") from exc
    lines = sum(1 for _ in request_lines(content))
    if lines == 0:
        raise InvalidParameter("file: no requests in it (one JSON request per line is expected)", param="file")
    if lines > max_lines:
        raise InvalidParameter(f"file: {lines} requests; a batch takes at most {max_lines} (MAX_BATCH_REQUESTS)",
                               param="file")
    return lines


def stored_file_commands(
    pipe, file_id: str, owner: str, filename: str, purpose: str, size: int, ttl_s: int, list_owner: str
) -> dict[str, Any]:
    """Queue the writes of a file's record on `pipe` (a transaction of the caller's; its bytes, `size` of them, are
    in FileBlobs already); returns its file object. `list_owner`: whose list it appears in (Caller.list_owner)."""
    now = time.time()  # the index's score: to the microsecond, so files of one second keep their order
    created = int(now)
    record = {"owner": owner, "list_owner": list_owner, "filename": filename[:MAX_FILENAME_CHARS],
              "purpose": purpose, "bytes": size, "created_at": created, "expires_at": created + ttl_s}
    pipe.hset(keys.file(file_id), mapping=record)
    pipe.expire(keys.file(file_id), ttl_s)
    pipe.zadd(keys.owner_files(list_owner), {file_id: now})
    pipe.zremrangebyscore(keys.owner_files(list_owner), "-inf", now - ttl_s)
    pipe.expire(keys.owner_files(list_owner), ttl_s)
    return file_object(file_id, {k.encode(): str(v).encode() for k, v in record.items()})


class FileStore:
    def __init__(self, aio, ttl_s: int, blobs: FileBlobs):
        self.aio = aio
        self.ttl_s = ttl_s
        self.blobs = blobs

    async def create(self, owner: str, filename: str, purpose: str, content: bytes,
                     file_id: str | None = None, list_owner: str | None = None, quota: int = 0) -> dict[str, Any]:
        """`quota`: the most bytes of files the caller (its `list_owner`) may keep, this one included (0: none);
        checked and written in one optimistic transaction on the caller's index, so concurrent uploads cannot
        pass it together."""
        list_owner = list_owner or owner
        file_id = file_id or new_file_id()
        index = keys.owner_files(list_owner)
        await asyncio.to_thread(self.blobs.write, file_id, content)
        try:
            async with self.aio.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        if quota:
                            await pipe.watch(index)
                            kept = await self.stored_bytes(list_owner)
                            if kept + len(content) > quota:
                                raise StorageQuotaExceeded(
                                    f"file: this client keeps {kept} bytes of files already and may keep at most "
                                    f"{quota} (MAX_FILE_STORAGE_BYTES); delete some (DELETE /v1/files/{{id}}) or wait "
                                    "for them to expire", param="file")
                            pipe.multi()
                        created = stored_file_commands(pipe, file_id, owner, filename, purpose, len(content),
                                                       self.ttl_s, list_owner)
                        await pipe.execute()
                        return created
                    except redis.exceptions.WatchError:
                        continue  # another upload of the same client landed meanwhile: count again
        except StorageQuotaExceeded:
            await asyncio.to_thread(self.blobs.delete, file_id)
            raise

    async def stored_bytes(self, list_owner: str) -> int:
        """Bytes of the live uploaded files in a client's list (batch outputs excluded)."""
        ids = await self.aio.zrangebyscore(keys.owner_files(list_owner), time.time() - self.ttl_s, "+inf")
        if not ids:
            return 0
        async with self.aio.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hmget(keys.file(file_id.decode()), "bytes", "purpose")
            found = await pipe.execute()
        return sum(int(size) for size, purpose in found if size and purpose != PURPOSE_BATCH_OUTPUT.encode())

    async def record(self, file_id: str, owner: str) -> dict[bytes, bytes]:
        """The file's record, or 404 when it does not exist, expired, or is another key's."""
        record = await self.aio.hgetall(keys.file(file_id)) if FILE_ID_PATTERN.fullmatch(file_id) else {}
        if not record or record.get(b"owner", b"").decode() != owner:
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return record

    async def get(self, file_id: str, owner: str) -> dict[str, Any]:
        return file_object(file_id, await self.record(file_id, owner))

    async def content(self, file_id: str, owner: str) -> bytes:
        await self.record(file_id, owner)
        content = await self.stored_content(file_id)
        if content is None:  # deleted between the two reads
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return content

    async def stored_content(self, file_id: str) -> bytes | None:
        """A file's bytes, or None. A file uploaded before FILES_DIR existed has them in Redis: moved here on first
        read."""
        content = await asyncio.to_thread(self.blobs.read, file_id)
        if content is None:
            legacy = await self.aio.get(keys.file_content(file_id))
            if legacy is not None:
                await asyncio.to_thread(self.blobs.write, file_id, legacy)
                await self.aio.delete(keys.file_content(file_id))
            content = legacy
        return content

    async def line_count(self, file_id: str) -> int | None:
        """A batch input's request lines (FileBlobs.line_count); None when its record or bytes are gone."""
        if not await self.aio.exists(keys.file(file_id)) or await self.stored_content(file_id) is None:
            return None
        return await asyncio.to_thread(self.blobs.line_count, file_id)

    async def delete(self, file_id: str, owner: str) -> dict[str, Any]:
        record = await self.record(file_id, owner)
        async with self.aio.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file(file_id), keys.file_content(file_id))
            pipe.zrem(keys.owner_files((record.get(b"list_owner") or owner.encode()).decode()), file_id)
            await pipe.execute()
        await asyncio.to_thread(self.blobs.delete, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def sweep(self) -> int:
        """Removes the bytes of files whose record is gone (FileBlobs.sweep); how many entries it removed."""
        names = await asyncio.to_thread(self.blobs.names)
        ids = sorted({name.removesuffix(INDEX_SUFFIX) for name, _ in names if FILE_ID_PATTERN.fullmatch(
            name.removesuffix(INDEX_SUFFIX))})
        recorded: set[str] = set()
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            async with self.aio.pipeline(transaction=False) as pipe:
                for file_id in chunk:
                    pipe.exists(keys.file(file_id))
                recorded.update(i for i, found in zip(chunk, await pipe.execute()) if found)
        return await asyncio.to_thread(self.blobs.sweep, recorded, names)

    async def list(self, owner: str, purpose: str | None, limit: int, after: str | None,
                   list_owner: str | None = None) -> dict[str, Any]:
        """`list_owner`: whose list (Caller.list_owner); each file listed must also be `owner`'s."""
        async def load(ids: list[str]) -> list[dict[str, Any]]:
            async with self.aio.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(keys.file(file_id))
                records = await pipe.execute()
            return [file_object(i, r) if r and r.get(b"owner", b"").decode() == owner else None
                    for i, r in zip(ids, records)]

        keep = (lambda f: f["purpose"] == purpose) if purpose else None
        return await owner_page(self.aio, keys.owner_files(list_owner or owner), "file", load, limit, after, keep)


async def owner_page(aio, index: str, what: str, load, limit: int, after: str | None, keep=None,
                     max_scanned: int = 1000) -> dict[str, Any]:
    """One page, newest first, of an owner's sorted-set index (files, batches), in OpenAI's list shape. `load`
    maps ids to objects (None: gone or not the owner's; such entries are dropped from the index); `keep` filters.
    `after`: the previous page's `last_id`."""
    start = await cursor_start(aio, index, after, what)
    found: list[dict[str, Any]] = []
    gone: list[str] = []
    scanned = 0
    exhausted = False
    while len(found) < limit and scanned < max_scanned:
        ids = [i.decode() for i in await aio.zrevrange(index, start, start + limit - len(found) - 1)]
        if not ids:
            exhausted = True
            break
        for item_id, item in zip(ids, await load(ids)):
            start += 1
            scanned += 1
            if item is None:
                gone.append(item_id)
            elif keep is None or keep(item):
                found.append(item)
    has_more = not exhausted and await aio.zcard(index) > start
    if gone:
        await aio.zrem(index, *gone)
    return {"object": "list", "data": found, "first_id": found[0]["id"] if found else None,
            "last_id": found[-1]["id"] if found else None, "has_more": has_more}
