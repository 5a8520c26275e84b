"""Error constructors shared by several answers: one wording wherever a client meets them."""

import json
from datetime import datetime, timezone

import pytest

from llamaq_gateway import http_worker
from llamaq_gateway.errors import InvalidParameter, InvalidRequest, JobFailed
from llamaq_gateway.jobs import check_max_new_tokens
from llamaq_protocol import Job, JobStatus


def failed_job(error: dict | None) -> Job:
    return Job(id="abc", status=JobStatus.failed, created_at=datetime(2024, 1, 1, tzinfo=timezone.utc), error=error)


def test_job_failed_passes_the_jobs_error_through():
    failed = JobFailed.of(failed_job({"type": "timeout", "message": "too slow"}))
    assert (failed.status_code, failed.error_type, failed.message) == (500, "timeout", "job abc failed: too slow")
    unknown = JobFailed.of(failed_job(None))
    assert (unknown.error_type, unknown.message) == ("internal_error", "job abc failed: unknown error")


def test_the_new_tokens_cap_names_the_field_the_client_used():
    check_max_new_tokens(10, 10)
    with pytest.raises(InvalidRequest) as plain:
        check_max_new_tokens(11, 10)
    assert type(plain.value) is InvalidRequest and plain.value.message == "max_new_tokens: must be at most 10"
    with pytest.raises(InvalidParameter) as openai:
        check_max_new_tokens(11, 10, "max_tokens", InvalidParameter)
    assert openai.value.param == "max_tokens" and openai.value.message == "max_tokens: must be at most 10"


def test_a_malformed_http_request_gets_the_one_error_shape():
    assert json.loads(http_worker._BODY) == {
        "error": {"type": "bad_request", "message": "Malformed HTTP request.", "code": 400}
    }
