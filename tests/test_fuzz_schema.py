"""Schemathesis against the gateway's own OpenAPI schema, every request sent through nginx to the real stack.

Driven through schemathesis's Python API (`operation.as_strategy()` under Hypothesis, `case.call`,
`case.validate_response`) inside an ordinary test, so it runs on the session stack. Valid requests queue real
generation, so every case is capped to at most 4 new tokens and 1 s of waiting; everything else is as generated.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import requests
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llamaq_gateway.app import create_app
from llamaq_gateway.settings import GatewaySettings

# Generated requests per operation and generation mode (an operation without parameters yields fewer).
EXAMPLES = 60
MIN_REQUESTS = 1000
# Tiers (the root conftest.py): over a thousand generated requests through the stack.
pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 4
MAX_WAIT_S = 1
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
ERROR_TYPES_WITH_RETRY_AFTER = (429, 503)
# Requests are paced below nginx's per-address rate (100 r/s, burst 200): most refusals are answered in a
# millisecond, and the run is about the API, not about the rate limit (tests/test_limits.py tests that).
MIN_INTERVAL_S = 1 / 80


def cap(case) -> None:
    """Keep generation tiny and waits short; an absent max_new_tokens would mean 512 tokens."""
    if isinstance(case.query, dict) and _number(case.query.get("wait")):
        case.query["wait"] = min(case.query["wait"], MAX_WAIT_S)
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.operation.path
    if path in ("/tokenize", "/detokenize"):
        return  # nothing generated
    if path in ("/v1/chat/completions", "/v1/completions"):
        names = ("max_tokens", "max_completion_tokens")
        for name in names:
            if name in body and body[name] is None:  # null means the default, 512
                body[name] = MAX_NEW_TOKENS
        if not any(name in body for name in names):
            body["max_tokens"] = MAX_NEW_TOKENS
    else:
        names = ("max_new_tokens",)
        body.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    for name in names:
        # Integers may come as 422.0, which is valid JSON for an integer schema.
        if _number(body.get(name)) and body[name] > MAX_NEW_TOKENS:
            body[name] = MAX_NEW_TOKENS
    if _number(body.get("wait_s")):
        body["wait_s"] = min(body["wait_s"], MAX_WAIT_S)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def problems_with(case, response) -> list[str]:
    """What is wrong with one answer: a 5xx, an error not in the error shape, or a breach of the schema."""
    found = []
    status = response.status_code
    if status >= 500:
        found.append(f"server error {status}: {response.text[:300]}")
    if status >= 400:
        try:
            error = response.json()["error"]
            assert isinstance(error["type"], str) and error["type"]
            assert isinstance(error["message"], str) and error["message"]
            assert error["code"] == status
        except Exception:  # noqa: BLE001 - any way of not being the error shape
            found.append(f"{status} not in the error shape: {response.text[:300]!r}")
        # (schemathesis' response keeps the headers as sent: lower case from nginx, a list of values each)
        if status in ERROR_TYPES_WITH_RETRY_AFTER and not {k.lower() for k in response.headers} & {"retry-after"}:
            found.append(f"{status} without Retry-After")
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        found.extend(f"{type(failure).__name__}: {failure.title}" for failure in group.exceptions)
    return found


def test_schemathesis_finds_no_server_error_and_no_schema_breach(stack):
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every operation the app serves is in its schema (none hidden from the fuzz), and each is fuzzed below.
    app_operations = {(method.upper(), re.sub(r":\w+}", "}", route.path))  # ({model_id:path} is {model_id})
                      for route in create_app(GatewaySettings()).routes
                      if isinstance(route, APIRoute) for method in route.methods if method != "HEAD"}
    assert {(op.method.upper(), op.path) for op in operations} == app_operations
    session = requests.Session()
    statuses: Counter[int] = Counter()
    per_operation: Counter[str] = Counter()
    failures: list[str] = []
    nothing_to_negate: list[str] = []
    started = time.monotonic()
    pace = {"next": started}

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                cap(case)
                time.sleep(max(0.0, pace["next"] - time.monotonic()))
                sent = pace["next"] = time.monotonic()
                pace["next"] += MIN_INTERVAL_S
                try:
                    response = case.call(base_url=stack.url, session=session, timeout=60)
                except requests.RequestException as exc:
                    failures.append(f"{operation.label} [{mode.value}] no answer after "
                                    f"{time.monotonic() - sent:.0f} s: {exc!r}\n    {case.as_curl_command()}")
                    return
                statuses[response.status_code] += 1
                per_operation[operation.label] += 1
                for problem in problems_with(case, response):
                    failures.append(f"{operation.label} [{mode.value}] {problem}\n    {case.as_curl_command()}")

            try:
                run()
            except Unsatisfiable:
                # Negative mode of an operation with nothing to make invalid (no parameters, no body).
                assert mode is GenerationMode.NEGATIVE, operation.label
                nothing_to_negate.append(operation.label)

    total = sum(statuses.values())
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {total} requests in {elapsed:.0f} s; statuses {dict(sorted(statuses.items()))}")
    print("per operation:", dict(per_operation))
    print("no negative cases for:", nothing_to_negate)
    assert set(per_operation) == {operation.label for operation in operations}, "operations never answered"
    assert not failures, f"{len(failures)} problem(s):\n" + "\n".join(failures[:40])
    assert total >= MIN_REQUESTS, total
    # Both valid and refused requests were exercised, and the rate limit did not swallow the run.
    assert sum(n for code, n in statuses.items() if code < 300) >= total * 0.05, statuses
    assert sum(n for code, n in statuses.items() if 400 <= code < 500) >= total * 0.3, statuses
    assert statuses[429] < total * 0.05, statuses

    # And the stack still answers.
    answer = session.post(stack.url, json={"prompt": "What is the capital of France?", "max_new_tokens": 12,
                                           "temperature": 0}, timeout=60)
    assert answer.status_code == 200 and "Paris" in answer.json()["response"]
    assert session.get(f"{stack.url}/readyz", timeout=10).status_code == 200
