"""The generation engines, behind one interface (`base.Engine`); `build_engine` picks one by `ENGINE`.

This package itself (and `base`, `text`) imports no torch: only the engines that run a model do, and each is
imported when chosen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time

from llamaq_protocol.logs import logging_dict_config

from ..hardware import resolve_dtype
from ..periodic import PeriodicReporter
from ..settings import WorkerSettings
from .base import Engine, EngineDead, SamplingParams, StepOutput

__all__ = ["Engine", "EngineDead", "SamplingParams", "StepOutput", "build_engine", "loading_progress"]

logger = logging.getLogger(__name__)


def build_engine(settings: WorkerSettings, model_dir: str) -> Engine:
    """The engine `settings.engine` names, loaded from `model_dir`, with CHAT_TEMPLATE in place of the model's own
    chat template when set."""
    engine = _load_engine(settings, model_dir)
    if settings.chat_template:
        engine.tokenizer.chat_template = read_chat_template(settings.chat_template)
        logger.info("chat template from CHAT_TEMPLATE (%d characters)", len(engine.tokenizer.chat_template))
    return engine


def read_chat_template(value: str) -> str:
    """CHAT_TEMPLATE: a file's path, or the template text itself (vLLM's --chat-template takes either)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    if "{" not in value:
        raise ValueError(f"CHAT_TEMPLATE {value!r} is neither a file nor a template")
    return value


def _load_engine(settings: WorkerSettings, model_dir: str) -> Engine:
    if settings.engine == "echo":
        from .echo import EchoEngine

        logger.warning("ENGINE=echo: no model runs; every job is answered with its own prompt (tests only)")
        return EchoEngine(model_dir, max_batch=settings.max_batch, headroom=settings.headroom)
    if settings.engine == "paced":
        from .paced import PacedEngine

        logger.warning("ENGINE=paced: no model runs; every job gets max_new_tokens tokens at %.1f tokens/s "
                       "(tests only)", settings.paced_tokens_per_s)
        return PacedEngine(model_dir, max_batch=settings.max_batch, headroom=settings.headroom,
                           tokens_per_s=settings.paced_tokens_per_s)
    if settings.engine == "vllm":
        route_vllm_logs(settings)
        from .vllm import VLLMEngine

        with loading_progress(model_dir):
            return VLLMEngine.from_settings(settings, model_dir)
    from .transformers import TransformersEngine

    dtype = resolve_dtype(settings.dtype, settings.device)
    logger.info("transformers engine on %s in %s (DTYPE=%s)", settings.device, dtype, settings.dtype)
    with loading_progress(model_dir):
        return TransformersEngine(model_dir, device=settings.device, dtype=dtype, max_batch=settings.max_batch,
                                  headroom=settings.headroom)


def route_vllm_logs(settings: WorkerSettings) -> None:
    """vLLM's loggers, in this process and in the EngineCore processes it spawns, write the worker's own lines
    (JSON with LOG_FORMAT=json) instead of vLLM's format: it reads VLLM_LOGGING_CONFIG_PATH when first imported,
    so this runs before that. A VLLM_LOGGING_CONFIG_PATH set by the operator is left alone."""
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH"):
        return
    config = logging_dict_config("worker", settings.log_level, settings.log_format, "vllm")
    fd, path = tempfile.mkstemp(prefix="llamaq-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path


@contextlib.contextmanager
def loading_progress(model_dir: str, every_s: float = 10.0):
    """Log what is being loaded, a line every `every_s` while it loads (an 8B model takes minutes), and the time."""
    weights = [entry for entry in os.scandir(model_dir)
               if entry.is_file() and entry.name.endswith((".safetensors", ".bin", ".pt"))]
    total_gib = sum(entry.stat().st_size for entry in weights) / 2**30
    logger.info("loading model weights: %d file(s), %.2f GiB from %s", len(weights), total_gib, model_dir)
    started = time.monotonic()

    def still_loading() -> None:
        logger.info("still loading the model (%.0f s so far)", time.monotonic() - started)

    with PeriodicReporter(every_s, still_loading, thread_name="llamaq-loading"):
        yield
    logger.info("model loaded in %.1f s", time.monotonic() - started)
