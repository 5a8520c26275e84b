"""One batch of N prompts, three ways, in one process on the CPU: transformers' padded `generate`, transformers'
continuous batching (`generate_batch`), and llamaq's transformers engine (`TransformersEngine.add` x N, then `step`
until done).

    .venv/bin/python scripts/bench_hf_cb.py [--dtype bfloat16] [--sequences 16] [--max-new-tokens 64]

Same prompts as scripts/bench.py (benchkit's PROMPTS; chat template, default system prompt), greedy, the same
token cap. Each way runs once untimed (warm-up), then `--repeats` timed runs; the best is reported as completion
tokens/s (tokens generated, EOS included, / wall time). Why it exists: docs/benchmarks.md, "Why our own batching loop".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchkit import PROMPTS, ForeignLoad, small_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-path")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from llamaq_protocol import GenerationParams
    from llamaq_worker.engines.base import SamplingParams, chat_token_ids
    from llamaq_worker.engines.transformers import TransformersEngine

    model_path = args.model_path or small_model()
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    # The token ids the worker would queue for the same requests (the gateway's messages, the worker's template).
    prompts = [chat_token_ids(tokenizer, GenerationParams(prompt=PROMPTS[i % len(PROMPTS)]).chat_messages())
               for i in range(args.sequences)]
    eos = tokenizer.eos_token_id
    cap = args.max_new_tokens

    def padded_generate() -> int:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id or eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=cap, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or eos)
        tokens = 0
        for row in out[:, width:].tolist():  # count up to and including the first EOS, as llamaq does
            tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    cb_config = ContinuousBatchingConfig(num_blocks=256, page_size=64)

    def hf_continuous_batching() -> int:
        gen = GenerationConfig(max_new_tokens=cap, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        with torch.inference_mode():
            results = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb_config,
                                           progress_bar=False, warmup=False)
        return sum(len(r.generated_tokens) for r in results.values())

    engine = TransformersEngine.from_model(model, tokenizer, max_batch=args.sequences,
                                           model_name=Path(model_path).name)
    params = SamplingParams(max_new_tokens=cap, temperature=0.0)
    runs = [0]

    def llamaq_engine() -> int:
        runs[0] += 1
        for i, p in enumerate(prompts):
            engine.add(f"r{runs[0]}-{i}", p, params)
        tokens = 0
        while engine.active:
            tokens += sum(o.completion_tokens for o in engine.step() if o.finish_reason)
        return tokens

    for name, fn in (("padded generate", padded_generate), ("transformers continuous batching", hf_continuous_batching),
                     ("llamaq Engine", llamaq_engine)):
        fn()  # warm-up
        best = None
        for _ in range(args.repeats):
            with ForeignLoad() as load:
                start = time.perf_counter()
                tokens = fn()
                wall = time.perf_counter() - start
            if best is None or tokens / wall > best["tok_s"]:
                best = {"way": name, "dtype": args.dtype, "sequences": args.sequences, "max_new_tokens": cap,
                        "completion_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
                        "foreign_cpu_pct": round(load.foreign_pct, 1)}
        print(f"| {name} | {args.dtype} | {best['completion_tokens']} | {best['tok_s']} "
              f"| {best['foreign_cpu_pct']:.0f}% |")
        print(json.dumps(best), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
