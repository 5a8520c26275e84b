"""The OpenAI Batch API through the real stack: the official `openai` SDK runs a batch on the real model, and a
paced-engine stack (API_KEYS set, small file limits) proves refusals, per-key isolation, cancel and a gateway
restart in the middle of a batch."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import redis
from openai import OpenAI

from conftest import running_stack, stack_environment
from helpers import wait_until
from llamaq_protocol import keys

KEY_A, KEY_B = "batch-key-a", "batch-key-b"
MAX_FILE_BYTES = 64 * 1024
MAX_BATCH_REQUESTS = 60
PACED_TOKENS_PER_S = 20


def chat_line(custom_id: str, content: str, max_tokens: int = 3, url: str = "/v1/chat/completions", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                                **body}})


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def wait_for_batch(client: OpenAI, batch_id: str, statuses: tuple[str, ...], timeout_s: float = 180):
    batch = None

    def ended():
        nonlocal batch
        batch = client.batches.retrieve(batch_id)
        return batch.status in statuses

    wait_until(ended, timeout_s, f"batch {batch_id} to be {statuses}", interval_s=0.3)
    return batch


def by_custom_id(content: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in content.splitlines()]
    assert len({line["custom_id"] for line in lines}) == len(lines), "a line answered twice"
    return {line["custom_id"]: line for line in lines}


def test_openai_sdk_runs_a_batch_on_the_real_model(stack) -> None:
    """files.create, batches.create, batches.retrieve, files.content and batches.list from the official SDK; each
    good line's answer is the one the same request gets from /v1/chat/completions; bad lines go to the error file
    and the batch still completes."""
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    questions = {"capital": "What is the capital of France?", "color": "Name a color.", "count": "Count to three."}
    good = [chat_line(cid, text, max_tokens=8, temperature=0) for cid, text in questions.items()]
    bad = [
        "{not json",
        chat_line("wrong-url", "hi", url="/v1/completions"),
        chat_line("capital", "duplicate custom id"),
        chat_line("too-many-choices", "hi", n=99),  # over MAX_N
        chat_line("unknown-model", "hi", model="gpt-4o"),
    ]
    uploaded = client.files.create(file=("questions.jsonl", jsonl(good[:2] + bad + good[2:])), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(good[:2] + bad + good[2:]))
    assert client.files.retrieve(uploaded.id).filename == "questions.jsonl"

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"suite": "batch-api"})
    assert created.status in ("validating", "in_progress") and created.metadata == {"suite": "batch-api"}
    batch = wait_for_batch(client, created.id, ("completed", "failed", "cancelled", "expired"))
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (8, 3, 5)
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at

    outputs = by_custom_id(client.files.content(batch.output_file_id).text)
    assert set(outputs) == set(questions)
    for custom_id, text in questions.items():
        response = outputs[custom_id]["response"]
        assert response["status_code"] == 200 and outputs[custom_id]["error"] is None
        direct = client.chat.completions.create(messages=[{"role": "user", "content": text}], max_tokens=8,
                                                temperature=0, model=response["body"]["model"])
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert response["body"]["usage"]["completion_tokens"] == direct.usage.completion_tokens

    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == 5
    malformed, wrong_url, duplicate, too_many_choices, unknown_model = errors
    assert malformed["custom_id"] is None and "not JSON" in malformed["error"]["message"]
    assert "url" in wrong_url["error"]["message"]
    assert "earlier line" in duplicate["error"]["message"]
    assert too_many_choices["response"]["status_code"] == 400
    assert too_many_choices["response"]["body"]["error"]["param"] == "n"
    assert unknown_model["response"]["status_code"] == 404
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert created.id in [b.id for b in client.batches.list(limit=100).data]


@pytest.fixture(scope="module")
def paced_stack():
    env = stack_environment(ENGINE="paced", PACED_TOKENS_PER_S=str(PACED_TOKENS_PER_S), MAX_BATCH="4",
                            API_KEYS=f"{KEY_A},{KEY_B}", MAX_FILE_BYTES=str(MAX_FILE_BYTES),
                            MAX_BATCH_REQUESTS=str(MAX_BATCH_REQUESTS))
    with running_stack("llamaq-batches-", env) as running:
        yield running


def sdk(stack, key: str) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def upload(stack, key: str, content: bytes, purpose: str = "batch") -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/files", headers={"Authorization": f"Bearer {key}"},
                      files={"file": ("in.jsonl", content)}, data={"purpose": purpose}, timeout=60)


def test_uploads_and_batches_the_api_cannot_take_are_refused_clearly(paced_stack) -> None:
    refusals = {
        "wrong purpose": (upload(paced_stack, KEY_A, jsonl([chat_line("a", "hi")]), purpose="fine-tune"), 400),
        "not UTF-8": (upload(paced_stack, KEY_A, b"\xff\xfe{}\n"), 400),
        "no lines": (upload(paced_stack, KEY_A, b"\n\n"), 400),
        "too many lines": (upload(paced_stack, KEY_A, jsonl([chat_line(str(i), "hi")
                                                              for i in range(MAX_BATCH_REQUESTS + 1)])), 400),
        "over MAX_FILE_BYTES": (upload(paced_stack, KEY_A, jsonl([chat_line("big", "x" * MAX_FILE_BYTES)])), 413),
        "over nginx's limit": (upload(paced_stack, KEY_A, b"x" * (34 * 1024 * 1024)), 413),
        "no key": (httpx.post(f"{paced_stack.url}/v1/files", files={"file": ("a", b"{}")},
                              data={"purpose": "batch"}), 401),
    }
    for name, (response, status) in refusals.items():
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == status and error["message"], name

    file_id = upload(paced_stack, KEY_A, jsonl([chat_line("a", "hi")])).json()["id"]
    headers = {"Authorization": f"Bearer {KEY_A}"}
    for body, status, param in [
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 404,
         "file_id"),
        ({"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}, 422, "endpoint"),
        ({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "1h"}, 422,
         "completion_window"),
        ({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h",
          "metadata": {"k": 1}}, 400, "metadata"),
    ]:
        refused = httpx.post(f"{paced_stack.url}/v1/batches", json=body, headers=headers)
        assert refused.status_code == status, (body, refused.text)
        assert refused.json()["error"]["param"] == param
    for path in ("/v1/batches/batch_nope", "/v1/files/file-nope", "/v1/files/file-nope/content",
                 f"/v1/files/{file_id}:content", f"/v1/files/{file_id}:content/content", "/v1/batches/batch_x:output"):
        assert httpx.get(f"{paced_stack.url}{path}", headers=headers).status_code == 404, path
    assert httpx.delete(f"{paced_stack.url}/v1/files/{file_id}:content", headers=headers).status_code == 404
    odd_input = {"input_file_id": f"{file_id}:content", "endpoint": "/v1/completions", "completion_window": "24h"}
    assert httpx.post(f"{paced_stack.url}/v1/batches", json=odd_input, headers=headers).status_code == 404
    assert httpx.get(f"{paced_stack.url}/v1/files/{file_id}/content", headers=headers).status_code == 200


def test_each_key_sees_only_its_own_files_and_batches(paced_stack) -> None:
    a, b = sdk(paced_stack, KEY_A), sdk(paced_stack, KEY_B)
    mine = a.files.create(file=("mine.jsonl", jsonl([chat_line("only", "hello")])), purpose="batch")
    batch = a.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h")
    headers_b = {"Authorization": f"Bearer {KEY_B}"}
    for path in (f"/v1/files/{mine.id}", f"/v1/files/{mine.id}/content", f"/v1/batches/{batch.id}"):
        assert httpx.get(f"{paced_stack.url}{path}", headers=headers_b).status_code == 404, path
    assert httpx.post(f"{paced_stack.url}/v1/batches/{batch.id}/cancel", headers=headers_b).status_code == 404
    stolen = httpx.post(f"{paced_stack.url}/v1/batches", headers=headers_b, json={
        "input_file_id": mine.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert stolen.status_code == 404
    assert mine.id not in [f.id for f in b.files.list().data]
    assert batch.id not in [x.id for x in b.batches.list().data]
    assert mine.id in [f.id for f in a.files.list().data]

    done = wait_for_batch(a, batch.id, ("completed",))
    # The line ran as one of key A's own jobs, at batch priority.
    jobs = httpx.get(f"{paced_stack.url}/v1/jobs", headers={"Authorization": f"Bearer {KEY_A}"}).json()["data"]
    assert any(j["id"] == f"{batch.id}_0" and j["priority"] == "batch" for j in jobs)
    assert b.files.list().data == [] or done.output_file_id not in [f.id for f in b.files.list().data]
    assert a.files.delete(mine.id).deleted is True
    assert httpx.get(f"{paced_stack.url}/v1/files/{mine.id}",
                     headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 404


def test_cancel_stops_the_unfinished_lines_and_keeps_the_finished(paced_stack) -> None:
    client = sdk(paced_stack, KEY_A)
    # Four quick lines, then twenty that would take 100 s each.
    lines = [chat_line(f"quick-{i}", "hi") for i in range(4)]
    lines += [chat_line(f"slow-{i}", "hi", max_tokens=2000, ignore_eos=True) for i in range(20)]
    batch = client.batches.create(
        input_file_id=client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed == 4, 60, "the quick lines")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    cancelled = wait_for_batch(client, batch.id, ("cancelled",), timeout_s=60)
    assert (cancelled.request_counts.completed, cancelled.request_counts.failed) == (4, 20)
    assert set(by_custom_id(client.files.content(cancelled.output_file_id).text)) == {f"quick-{i}" for i in range(4)}
    errors = by_custom_id(client.files.content(cancelled.error_file_id).text)
    assert set(errors) == {f"slow-{i}" for i in range(20)}
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    again = httpx.post(f"{paced_stack.url}/v1/batches/{batch.id}/cancel", headers={"Authorization": f"Bearer {KEY_A}"})
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_a_gateway_restart_in_the_middle_of_a_batch_loses_and_repeats_no_line(paced_stack) -> None:
    client = sdk(paced_stack, KEY_A)
    count = 40  # at 20 tokens/s, 4 at a time: about ten seconds of work
    lines = [chat_line(f"line-{i}", f"question {i}", max_tokens=20, ignore_eos=True) for i in range(count)]
    batch = client.batches.create(
        input_file_id=client.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4, 60, "a few lines done")
    paced_stack.stop_process("gateway")
    paced_stack.start_gateway()
    done = wait_for_batch(client, batch.id, ("completed",), timeout_s=120)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (count, count, 0)
    outputs = by_custom_id(client.files.content(done.output_file_id).text)
    assert list(outputs) == [f"line-{i}" for i in range(count)]  # in input order, each once
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 20 for o in outputs.values())
    store = redis.Redis.from_url(paced_stack.env["REDIS_URL"])
    try:
        assert not store.sismember(keys.BATCHES_ACTIVE, batch.id)
        assert not store.exists(keys.batch_lines(batch.id, "output"))
    finally:
        store.close()


def test_files_and_batches_are_listed_a_page_at_a_time_newest_first(paced_stack) -> None:
    headers = {"Authorization": f"Bearer {KEY_B}"}
    uploaded = [upload(paced_stack, KEY_B, jsonl([chat_line(f"p{i}", "hi")])).json()["id"] for i in range(3)]
    first = httpx.get(f"{paced_stack.url}/v1/files", params={"limit": 2}, headers=headers).json()
    assert [f["id"] for f in first["data"]] == uploaded[:0:-1] and first["has_more"] is True
    rest = httpx.get(f"{paced_stack.url}/v1/files", params={"limit": 2, "after": first["last_id"]},
                     headers=headers).json()
    assert uploaded[0] in [f["id"] for f in rest["data"]]
    foreign = httpx.get(f"{paced_stack.url}/v1/files", params={"after": uploaded[0]},
                        headers={"Authorization": f"Bearer {KEY_A}"})
    assert foreign.status_code == 400 and foreign.json()["error"]["param"] == "after"
    client = sdk(paced_stack, KEY_B)
    batches = [client.batches.create(input_file_id=f, endpoint="/v1/chat/completions", completion_window="24h").id
               for f in uploaded[:2]]
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [batches[1]] and page.has_more
    assert [b.id for b in client.batches.list(limit=1, after=batches[1]).data] == [batches[0]]


def test_a_hundred_batches_in_progress_at_once_each_end_with_every_line_once(paced_stack) -> None:
    """100 batches created together, all in progress at once: each input file is indexed once (its lines read by
    offset as they are queued, never the whole file per round), every batch completes with each line answered
    once, in input order, and the files' bytes lie in FILES_DIR, not in Redis."""
    # Some 300 requests in a few seconds pass nginx's 100 per second per address (burst 200): the SDK's own retries
    # of a 429 pace them, as a client of a rate-limited API does.
    client = OpenAI(base_url=f"{paced_stack.url}/v1", api_key=KEY_B, max_retries=8)
    count, per_batch = 100, 3
    inputs = []
    for b in range(count):
        lines = [chat_line(f"b{b}-l{i}", f"batch {b} line {i}", max_tokens=4, ignore_eos=True)
                 for i in range(per_batch)]
        if b % 10 == 0:  # a bad line now and then goes to the error file, the batch goes on
            lines.append(json.dumps({"custom_id": f"b{b}-l0", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {}}))
        inputs.append(client.files.create(file=(f"many-{b}.jsonl", jsonl(lines)), purpose="batch"))
    # 1,200 tokens at 20 tokens/s, 4 at a time: about 15 s of work, so all 100 are in progress together.
    batches = [client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h") for uploaded in inputs]
    in_progress = [client.batches.retrieve(b.id).status for b in batches]
    assert sum(s in ("validating", "in_progress") for s in in_progress) >= count // 2, in_progress

    for b, batch in enumerate(batches):
        done = wait_for_batch(client, batch.id, ("completed",), timeout_s=240)
        bad = 1 if b % 10 == 0 else 0
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            per_batch + bad, per_batch, bad), done
        outputs = by_custom_id(client.files.content(done.output_file_id).text)
        assert list(outputs) == [f"b{b}-l{i}" for i in range(per_batch)]
        if bad:
            error = json.loads(client.files.content(done.error_file_id).text)
            assert "earlier line" in error["error"]["message"]  # custom_id b<n>-l0 is the first line's

    files_dir = Path(paced_stack.env["FILES_DIR"])
    on_disk = {p.name for p in files_dir.iterdir()}
    assert {b.input_file_id for b in batches} | {b.input_file_id + ".lines" for b in batches} <= on_disk
    store = redis.Redis.from_url(paced_stack.env["REDIS_URL"])
    try:
        assert not list(store.scan_iter(keys.file_content("*"), count=1000))
    finally:
        store.close()
