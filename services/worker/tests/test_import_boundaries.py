"""Only the engines that run a model import torch: the decoding loop, claiming, publishing and the engines package
itself (its interface) do not, whichever engine runs."""

from __future__ import annotations

import subprocess
import sys

TORCH_FREE = [
    "llamaq_worker.decoding_loop",
    "llamaq_worker.claiming",
    "llamaq_worker.publishing",
    "llamaq_worker.slots",
    "llamaq_worker.rq_bookkeeping",
    "llamaq_worker.rq_adapter",
    "llamaq_worker.engines",
    "llamaq_worker.engines.base",
    "llamaq_worker.engines.text",
]


def test_worker_modules_do_not_import_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)\n"
        "engines = sorted(m for m in sys.modules if m.startswith('llamaq_worker.engines.')\n"
        "                 and m not in ('llamaq_worker.engines.base', 'llamaq_worker.engines.text'))\n"
        "assert not heavy and not engines, (heavy, engines)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
