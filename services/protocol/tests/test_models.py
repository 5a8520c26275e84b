from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from llamaq_protocol import DEFAULT_SYSTEM_PROMPT, GenerationParams, Job, JobStatus, JobOutput
from llamaq_protocol.records import job_from_record, new_record


def test_prompt_becomes_system_and_user_turns():
    params = GenerationParams(prompt="hi")
    assert params.chat_messages() == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
    ]
    assert GenerationParams(prompt="hi", system="be brief").chat_messages()[0]["content"] == "be brief"


def test_messages_pass_through():
    params = GenerationParams(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert [m["role"] for m in params.chat_messages()] == ["user", "assistant"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "b"}], "system": "x"},
        {"prompt": ""},
        {"prompt": 5},
        {"prompt": "a", "max_new_tokens": 0},
        {"prompt": "a", "max_new_tokens": "many"},
        {"prompt": "a", "temperature": -0.1},
        {"prompt": "a", "temperature": 2.5},
        {"prompt": "a", "top_p": 0},
        {"prompt": "a", "top_k": -1},
        {"prompt": "a", "repetition_penalty": 0},
        {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]},
        {"prompt": "a", "stop": [""]},
        {"prompt": "a", "seed": -1},
        {"prompt": "a", "unknown": 1},
        {"messages": [{"role": "robot", "content": "b"}]},
        {"messages": []},
    ],
)
def test_invalid_params_are_refused(body):
    with pytest.raises(ValidationError):
        GenerationParams.model_validate(body)


def test_stop_accepts_a_string_or_a_list():
    assert GenerationParams(prompt="a", stop="x").stop == ["x"]
    assert GenerationParams(prompt="a", stop=["x", "y"]).stop == ["x", "y"]
    assert GenerationParams(prompt="a", stop=[]).stop is None


def test_status_terminality():
    assert [s.value for s in JobStatus if s.is_terminal()] == ["succeeded", "failed", "canceled"]


def test_public_job_shows_optional_fields_only_when_meaningful():
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    queued = Job(id="j", status=JobStatus.queued, position=2, created_at=created).public()
    assert queued["position"] == 2 and queued["started_at"] is None
    assert "output" not in queued and "error" not in queued
    done = Job(id="j", status=JobStatus.succeeded, created_at=created, output=JobOutput(text="hi")).public()
    assert "position" not in done and done["output"]["text"] == "hi"


def test_record_round_trip():
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    record = new_record(created, "req-1", "public")
    job = job_from_record("abc", {k.encode(): v.encode() for k, v in record.items()}, position=4)
    assert job.status is JobStatus.queued and job.position == 4 and job.created_at == created
    record.update(status="failed", error='{"type": "timeout", "message": "slow"}', output='{"text": "par"}')
    job = job_from_record("abc", record, position=4)
    assert job.position is None and job.error.type == "timeout" and job.output.text == "par"
