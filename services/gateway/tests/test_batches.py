"""Batch API lines: parsing and refusals, result lines, and the collection of ended jobs against real Redis (the
job-state scripts append a batch's ended jobs once per ending; collecting an entry twice writes its line once)."""

import asyncio
import json
import os
import time
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from llamaq_gateway.batch_api.batches import BatchDriver, BatchInput, BatchService, LineRefused, ended_line, line_job_id
from llamaq_gateway.errors import NotFound
from llamaq_gateway.batch_api.file_blobs import SWEEP_GRACE_S, FileBlobs
from llamaq_gateway.batch_api.files import FileStore
from llamaq_gateway.settings import GatewaySettings
from llamaq_protocol import keys
from llamaq_protocol.models import utc_now
from llamaq_protocol.records import CANCEL_SCRIPT, end_keys, new_record

CHAT = "/v1/chat/completions"


def line(custom_id="a", url=CHAT, method="POST", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": body or {"messages": [{"role": "user", "content": "hi"}]}})


def test_each_line_is_a_request_or_the_reason_it_is_not(tmp_path) -> None:
    content = "\n".join([
        line("a"), "", "   ", "{oops", "[1, 2]", json.dumps({"method": "POST"}), line("a"), line("b", url="/v1/x"),
        line("c", method="GET"), json.dumps({"custom_id": "d", "method": "POST", "url": CHAT, "body": {}, "x": 1}),
        line("e", messages=[{"role": "user", "content": "hi"}], stream=True), line("f", messages=[]),
    ]).encode()
    blobs = FileBlobs(tmp_path)
    blobs.write("file-in", content)
    assert blobs.line_count("file-in") == 10  # blank lines are not lines
    entries = blobs.lines("file-in", 0, 10)
    custom_id, request = BatchInput.request(entries[0], CHAT)
    assert custom_id == "a" and request.messages[0].content == "hi"
    reasons = []
    for entry in entries[1:]:
        with pytest.raises(LineRefused) as refused:
            BatchInput.request(entry, CHAT)
        reasons.append((refused.value.status_code, refused.value.message))
    assert [status for status, _ in reasons] == [None, None, None, None, None, None, None, 400, 422]
    for (_, message), expected in zip(reasons, ["not JSON", "JSON object", "custom_id", "earlier line", "url",
                                                "method", "unknown field", "stream", "messages"]):
        assert expected in message
    parsed = BatchInput(SimpleNamespace(blobs=blobs), "file-in", 10)
    assert asyncio.run(parsed.custom_id(1)) is None and asyncio.run(parsed.custom_id(5)) == "b"
    assert blobs.lines("file-in", 8, 5) == entries[8:]  # past the end: what there is
    # The index is built once: a later look reads it, not the file (rewritten here to show it).
    blobs.write("file-in", b"\n" * len(content))
    assert blobs.line_count("file-in") == 10


def test_lines_end_at_newlines_only(tmp_path) -> None:
    """JSON text may hold U+2028 and U+0085 raw in a string (str.splitlines would cut the line there); CRLF is fine."""
    blobs = FileBlobs(tmp_path)
    odd = line("a", messages=[{"role": "user", "content": "one\u2028two\u0085three"}]).replace("\\u2028", "\u2028")
    blobs.write("file-odd", (odd + "\r\n" + line("b") + "\n\n").encode())
    assert blobs.line_count("file-odd") == 2
    first, second = blobs.lines("file-odd", 0, 2)
    assert "\u2028" in first["body"]["messages"][0]["content"] and second["custom_id"] == "b"


def _record(status: str, **fields) -> dict[bytes, bytes]:
    record = {**new_record(utc_now(), None, "owner"), "status": status, **fields}
    return {k.encode(): str(v).encode() for k, v in record.items()}


def test_result_lines_of_ended_jobs() -> None:
    output = json.dumps({"text": "Paris", "finish_reason": "stop",
                         "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
    render = json.dumps({"model": "small", "logprobs": None})
    kind, text = ended_line("batch_x", "batch_x_3", _record("succeeded", output=output, batch_custom_id="q",
                                                            batch_render=render), None, CHAT)
    answered = json.loads(text)
    assert kind == "output" and answered["custom_id"] == "q" and answered["id"] == "batch_req_batch_x_3"
    assert answered["response"]["status_code"] == 200 and answered["response"]["request_id"] == "batch_x_3"
    assert answered["response"]["body"]["choices"][0]["message"]["content"] == "Paris"
    assert answered["response"]["body"]["model"] == "small"

    error = json.dumps({"type": "engine_error", "message": "boom"})
    kind, text = ended_line("batch_x", "batch_x_4", _record("failed", error=error, batch_custom_id="r"), None, CHAT)
    failed = json.loads(text)
    assert kind == "error" and failed["response"]["status_code"] == 500
    assert failed["response"]["body"]["error"]["type"] == "engine_error"

    kind, text = ended_line("batch_x", "batch_x_5", _record("canceled", batch_custom_id="s"), None, CHAT)
    assert kind == "error" and json.loads(text)["error"]["code"] == "batch_cancelled"
    kind, text = ended_line("batch_x", "batch_x_6", {}, "t", CHAT)
    assert kind == "error" and json.loads(text)["error"]["code"] == "result_expired"
    assert json.loads(text)["custom_id"] == "t"


def test_an_ended_batch_job_is_collected_once_however_often_it_is_listed(store, redis_url, tmp_path) -> None:
    batch_id, other = "batch_" + "a" * 24, "plainjob"
    job_id = line_job_id(batch_id, 0)
    store.hset(keys.batch(batch_id), mapping={"status": "in_progress", "endpoint": CHAT, "input_file_id": "file-x",
                                              "owner": "owner"})
    for jid, extra in ((job_id, {"batch": batch_id, "batch_custom_id": "only"}), (other, {})):
        store.hset(keys.job(jid), mapping={**new_record(utc_now(), None, "owner"), **extra})
    for _ in range(2):  # a script re-sent after a lost reply: the second run sees the job ended already
        for jid in (job_id, other):
            store.eval(CANCEL_SCRIPT, len(end_keys(jid)), *end_keys(jid), utc_now().isoformat(), jid, 60)
    assert store.lrange(keys.BATCH_JOBS_ENDED, 0, -1) == [f"{batch_id} {job_id}".encode()]

    store.rpush(keys.BATCH_JOBS_ENDED, f"{batch_id} {job_id}")  # as if a driver died before trimming

    async def collect() -> int:
        aio = aioredis.Redis.from_url(redis_url)
        try:
            driver = _driver(aio, tmp_path)
            store.set(keys.BATCH_DRIVER_LOCK, driver.token)  # (the driver that holds the lock trims)
            return await driver.collect_ended()
        finally:
            await aio.aclose()

    assert asyncio.run(collect()) == 2
    assert store.llen(keys.BATCH_JOBS_ENDED) == 0
    lines = store.hgetall(keys.batch_lines(batch_id, "error"))
    assert list(lines) == [b"0"] and json.loads(lines[b"0"])["custom_id"] == "only"


def test_odd_file_and_batch_ids_are_404_without_a_look_at_other_keys(store, redis_url, tmp_path) -> None:
    """`file-<id>:content` names the file's bytes (a string), `batch_<id>:output` a batch's lines: ids are checked
    against a strict pattern, so no such id reaches Redis (it was a 500, WRONGTYPE) and each is a plain 404."""
    batch_id = "batch_" + "b" * 24
    store.hset(keys.batch(batch_id), mapping={"owner": "owner", "status": "in_progress"})
    store.set(keys.batch(batch_id) + ":odd", "a string where a hash would be")

    async def run() -> None:
        aio = aioredis.Redis.from_url(redis_url)
        try:
            files = FileStore(aio, 60, FileBlobs(tmp_path))
            file_id = (await files.create("owner", "in.jsonl", "batch", b"{}\n"))["id"]
            assert (await files.get(file_id, "owner"))["id"] == file_id
            for odd in (f"{file_id}:content", f"{file_id}\n", f"{file_id}:", "file-", "file-" + "a" * 65,
                        "file-a b", "file-a/b", "file-é"):
                for call in (files.get, files.content, files.delete):
                    with pytest.raises(NotFound):
                        await call(odd, "owner")
            assert await files.content(file_id, "owner") == b"{}\n"  # nothing was deleted on the way
            batches = BatchService(GatewaySettings(), aio, files)
            for odd in (f"{batch_id}:odd", f"{batch_id}:output", f"{batch_id}\n", "batch_", "batch_a:b"):
                for call in (batches.get, batches.cancel):
                    with pytest.raises(NotFound):
                        await call(odd, "owner")
        finally:
            await aio.aclose()

    asyncio.run(run())


def _ended_batch_jobs(store, batch_id: str, lines: int) -> None:
    """A batch in progress whose `lines` line jobs have all ended (canceled), each notice on BATCH_JOBS_ENDED."""
    store.hset(keys.batch(batch_id), mapping={"status": "in_progress", "endpoint": CHAT, "input_file_id": "file-x",
                                              "owner": "owner", "submitted": lines, "total": lines,
                                              "expires_at": 2**40, "created_at": 1})
    store.sadd(keys.BATCHES_ACTIVE, batch_id)
    for n in range(lines):
        jid = line_job_id(batch_id, n)
        store.hset(keys.job(jid), mapping={**new_record(utc_now(), None, "owner"), "batch": batch_id,
                                           "batch_custom_id": f"c{n}"})
        store.eval(CANCEL_SCRIPT, len(end_keys(jid)), *end_keys(jid), utc_now().isoformat(), jid, 60)


def _driver(aio, files_dir) -> BatchDriver:
    return BatchDriver(SimpleNamespace(aio=aio, settings=GatewaySettings()), FileStore(aio, 60, FileBlobs(files_dir)))


def test_a_driver_whose_lock_lapsed_cannot_drop_what_its_successor_has_not_collected(store, redis_url,
                                                                                       tmp_path) -> None:
    batch_id = "batch_" + "c" * 24
    _ended_batch_jobs(store, batch_id, 3)

    async def race() -> None:
        aio = aioredis.Redis.from_url(redis_url)
        try:
            late, holder = _driver(aio, tmp_path), _driver(aio, tmp_path)
            store.set(keys.BATCH_DRIVER_LOCK, holder.token)
            # The driver whose lock lapsed writes the lines it read (harmless, by number) but trims nothing...
            assert await late.collect_ended() == 0
            assert store.llen(keys.BATCH_JOBS_ENDED) == 3
            store.rpush(keys.BATCH_JOBS_ENDED, "batch_new batch_new_0")  # a notice that arrives meanwhile
            # ...so the holder still finds every entry, the new one included, and trims them.
            assert await holder.collect_ended() == 4
            assert store.llen(keys.BATCH_JOBS_ENDED) == 0
        finally:
            await aio.aclose()

    asyncio.run(race())
    assert sorted(store.hgetall(keys.batch_lines(batch_id, "error"))) == [b"0", b"1", b"2"]


def test_a_batch_whose_notices_were_lost_is_reconciled_from_its_jobs_and_ends(store, redis_url, monkeypatch,
                                                                              tmp_path) -> None:
    import llamaq_gateway.batch_api.batches as batches

    batch_id = "batch_" + "d" * 24
    _ended_batch_jobs(store, batch_id, 3)
    store.delete(keys.BATCH_JOBS_ENDED)  # every notice lost
    monkeypatch.setattr(batches, "RECONCILE_S", 0.0)

    async def drive() -> None:
        aio = aioredis.Redis.from_url(redis_url)
        try:
            driver = _driver(aio, tmp_path)
            store.set(keys.BATCH_DRIVER_LOCK, driver.token)
            await driver.round()  # first look: no progress seen yet
            await driver.round()  # no progress since: reconciled, then finalized
        finally:
            await aio.aclose()

    asyncio.run(drive())
    batch = store.hgetall(keys.batch(batch_id))
    assert batch[b"status"] == b"completed" and batch[b"failed_count"] == b"3", batch
    assert not store.sismember(keys.BATCHES_ACTIVE, batch_id)


def test_file_bytes_live_in_files_dir_and_go_with_their_record(store, redis_url, tmp_path) -> None:
    """Upload, read, delete: the bytes are in FILES_DIR, never in Redis. A file of the old layout (bytes in Redis) is
    read all the same and moved out on the way. The sweep removes bytes whose record is gone once SWEEP_GRACE_S old
    (an upload between its two writes is younger), and leaves the rest."""
    async def run() -> None:
        aio = aioredis.Redis.from_url(redis_url)
        try:
            blobs = FileBlobs(tmp_path)
            files = FileStore(aio, 60, blobs)
            kept = (await files.create("owner", "in.jsonl", "batch", b"{}\n"))["id"]
            gone = (await files.create("owner", "in.jsonl", "batch", b"[]\n"))["id"]
            assert (tmp_path / kept).read_bytes() == b"{}\n" and not store.exists(keys.file_content(kept))
            await files.delete(gone, "owner")
            assert not (tmp_path / gone).exists()
            with pytest.raises(NotFound):
                await files.content(gone, "owner")

            legacy = "file-" + "e" * 24
            store.hset(keys.file(legacy), mapping={"owner": "owner", "purpose": "batch"})
            store.set(keys.file_content(legacy), b"old bytes\n")
            assert await files.content(legacy, "owner") == b"old bytes\n"
            assert (tmp_path / legacy).read_bytes() == b"old bytes\n" and not store.exists(keys.file_content(legacy))

            assert await files.line_count(kept) == 1  # its index: file-<id>.lines
            orphan, young = "file-" + "f" * 24, "file-" + "9" * 24
            for name in (orphan, orphan + ".lines", young, ".tmp-123", "unrelated.txt"):
                (tmp_path / name).write_bytes(b"x")
            old = time.time() - SWEEP_GRACE_S - 10
            for name in (orphan, orphan + ".lines", ".tmp-123", "unrelated.txt", kept, kept + ".lines"):
                os.utime(tmp_path / name, (old, old))
            assert await files.sweep() == 3
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
                [kept, kept + ".lines", young, legacy, "unrelated.txt"])
        finally:
            await aio.aclose()

    asyncio.run(run())
