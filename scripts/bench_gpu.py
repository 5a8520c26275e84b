"""llamaq's engines on the Llama-3.1-8B architecture with random bf16 weights, on one CUDA GPU, no download.

    .venv/bin/python scripts/bench_gpu.py                      # on the GPU host: both engines, 1/8/64/256 streams
    .venv/bin/python scripts/bench_gpu.py --engine vllm --dry-run   # anywhere: a tiny config on the CPU

`--engine vllm` runs `llamaq_worker.engines.vllm.VLLMEngine` (vLLM's AsyncLLM, as ENGINE=vllm does) over a model
folder written here with the architecture's config.json, the synthetic tokenizer and no weights: vLLM's
`load_format="dummy"` fills them with random values on the GPU. The folder has no end-of-sequence id, so every
stream produces exactly `--new-tokens` tokens there too. `--engine both` runs the two one after the other (the
transformers model is freed before vLLM starts).

The model is built straight on the GPU (`torch.device("cuda")` as the default device, bf16), so nothing is
materialised on the CPU. The real `llamaq_worker.engines.transformers.TransformersEngine` drives it
(`TransformersEngine.from_model`): prompts are random token ids (`add` takes ids), decoding is greedy, and
end-of-sequence is disabled (the engine gets no EOS ids), so every stream produces exactly `--new-tokens` tokens,
as load generators do with "ignore EOS".
The tokenizer is a synthetic word-level one covering the 128256 ids (the engine detokenizes every token, as in
production; the text itself means nothing with random weights).

For each stream count S it reports the wall time of the whole run (one prefill step + decode steps), aggregate
tokens/s (S x new tokens / wall), per-stream decode tokens/s, and the memory-bandwidth bound: one decode step
reads every weight once plus the live KV cache, so steps/s <= bandwidth / (weight bytes + KV bytes), and the
bound on aggregate tokens/s is S times that. `--bandwidth-tbs` defaults from the GPU's name (H100 SXM 3.35 TB/s,
H100 PCIe 2.0, H200 4.8, A100 80GB 2.0).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services" / "worker"))  # llamaq_worker without installing it

LLAMA_31_8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
)
# Same architecture family, tiny: proves the code path on a CPU (head_dim 64: vLLM's CPU attention has no 16).
TINY = dict(LLAMA_31_8B, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512)

BANDWIDTH_TBS = [("H100 PCIe", 2.0), ("H100", 3.35), ("H200", 4.8), ("A100-SXM4-80GB", 2.039), ("A100", 1.555)]


def synthetic_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"\u2581w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="\u2581w0"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def build_model(config_kwargs: dict, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**config_kwargs)
    with torch.device(device):  # parameters are created on the device: no CPU copy of 16 GB
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def llama_weight_bytes(c: dict, dtype_bytes: int = 2) -> tuple[int, int]:
    """(all weights, weights a decode step reads) of a Llama config, counted from its shapes."""
    h, kv = c["hidden_size"], c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"] + 2 * h
    embed = c["vocab_size"] * h
    total = c["num_hidden_layers"] * layer + h + embed * (1 if c["tie_word_embeddings"] else 2)
    return total * dtype_bytes, (total - (0 if c["tie_word_embeddings"] else embed)) * dtype_bytes


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def run_streams(engine, streams: int, prompt_tokens: int, new_tokens: int, seed: int, sync) -> dict:
    from llamaq_worker.engines.base import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    for i in range(streams):
        engine.add(f"s{streams}-{seed}-{i}", [rng.randrange(engine.vocab_size) for _ in range(prompt_tokens)], params)
    sync()
    start = time.perf_counter()
    first_step = None
    steps = 0
    tokens = 0
    while engine.active:
        outputs = engine.step()  # transformers: ends with .tolist() of the sampled ids, the step's GPU work done
        steps += 1
        if first_step is None and outputs:  # vLLM's step() may return nothing while it prefills
            first_step = time.perf_counter() - start
        tokens += sum(o.completion_tokens for o in outputs if o.finish_reason)
        for o in outputs:
            if o.error:
                raise RuntimeError(f"sequence {o.seq_id} failed: {o.error}")
    sync()
    wall = time.perf_counter() - start
    decode = wall - first_step
    return {
        "streams": streams, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "completion_tokens": tokens,
        "steps": steps, "wall_s": wall, "prefill_step_s": first_step, "decode_s": decode,
        "aggregate_tok_s": tokens / wall,
        # the first output is each stream's first token (prefill); every stream then decodes new_tokens - 1 more
        "decode_tok_s": streams * (new_tokens - 1) / decode if decode > 0 else float("nan"),
        "per_stream_tok_s": (new_tokens - 1) / decode if decode > 0 else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["transformers", "vllm", "both"], default="both")
    parser.add_argument("--streams", default="1,8,64,256")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--bandwidth-tbs", type=float, help="HBM bandwidth in TB/s (default: from the GPU name)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny config on the CPU through the same code path (no GPU needed; figures meaningless)")
    parser.add_argument("--doc", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()

    import torch

    if args.dry_run:
        device, config_kwargs, gpu_name = "cpu", TINY, "CPU (dry run, tiny config)"
        streams_list = [int(s) for s in args.streams.split(",")]
        bandwidth = args.bandwidth_tbs or 0.0
        sync = lambda: None  # noqa: E731
    else:
        if not torch.cuda.is_available():
            print("bench_gpu.py: no CUDA device is available (torch.cuda.is_available() is False). Run it on a GPU "
                  "host with a CUDA build of torch, or use --dry-run to check the code path on a CPU.",
                  file=sys.stderr)
            return 2
        device, config_kwargs = "cuda", LLAMA_31_8B
        gpu_name = torch.cuda.get_device_name(0)
        streams_list = [int(s) for s in args.streams.split(",")]
        bandwidth = args.bandwidth_tbs or next((bw for key, bw in BANDWIDTH_TBS if key in gpu_name), 0.0)
        if not bandwidth:
            print(f"unknown GPU {gpu_name!r}: pass --bandwidth-tbs for the bound", file=sys.stderr)
        sync = torch.cuda.synchronize

    full, read = llama_weight_bytes(LLAMA_31_8B)
    print(f"# Llama-3.1-8B in bf16: {full / 1e9:.2f} GB of weights, {read / 1e9:.2f} GB read per decode step; "
          f"one-stream bound on an H100 SXM (3.35 TB/s): {3.35e12 / read:.0f} tokens/s "
          f"({3.35e12 / full:.0f} counting every weight)", flush=True)
    engines = ["transformers", "vllm"] if args.engine == "both" else [args.engine]
    status = 0
    for name in engines:
        status |= bench_engine(name, args, device, config_kwargs, gpu_name, streams_list, bandwidth, sync)
    return status


def transformers_engine(args, device, config_kwargs, streams_list, sync):
    import torch

    from llamaq_worker.engines.transformers import TransformersEngine

    model = build_model(config_kwargs, device, torch.bfloat16)
    sync()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes == llama_weight_bytes(config_kwargs)[0], "shape count disagrees with the model"
    return TransformersEngine.from_model(
        model, synthetic_tokenizer(model.config.vocab_size), max_batch=max(streams_list),
        model_name="llama-3.1-8b-arch-random" if not args.dry_run else "tiny-llama-random", eos_token_ids=frozenset(),
    )


def vllm_engine(args, device, config_kwargs, streams_list, sync):
    import tempfile

    from transformers import LlamaConfig

    from llamaq_worker.engines.vllm import VLLMEngine, VllmOptions

    folder = tempfile.mkdtemp(prefix="llama-3.1-8b-arch-")
    # No eos_token_id: random weights must not end a stream early.
    LlamaConfig(**dict(config_kwargs, eos_token_id=None, architectures=["LlamaForCausalLM"])).save_pretrained(folder)
    synthetic_tokenizer(config_kwargs["vocab_size"]).save_pretrained(folder)
    return VLLMEngine(folder, VllmOptions(
        dtype="bfloat16" if device == "cuda" else "float32", max_batch=max(streams_list),
        max_model_len=args.prompt_tokens + args.new_tokens + 16, enforce_eager=args.dry_run,
        kv_cache_cpu_gib=1 if device == "cpu" else 0, extra={"load_format": "dummy"},
    ))


def bench_engine(name, args, device, config_kwargs, gpu_name, streams_list, bandwidth, sync) -> int:
    import gc

    import torch

    started = time.perf_counter()
    engine = (transformers_engine if name == "transformers" else vllm_engine)(
        args, device, config_kwargs, streams_list, sync)
    build_s = time.perf_counter() - started
    config = SimpleNamespace(**config_kwargs)
    weight_bytes, _ = llama_weight_bytes(config_kwargs)
    read_bytes = weight_bytes - config.vocab_size * config.hidden_size * 2  # a decode step gathers S embedding rows
    kv_token = kv_bytes_per_token(config, 2)
    print(f"# {name} on {gpu_name}; engine ready in {build_s:.1f} s; {weight_bytes / 1e9:.2f} GB of bf16 weights "
          f"({read_bytes / 1e9:.2f} GB read per decode step); KV {kv_token / 1024:.0f} KiB/token; "
          f"bandwidth {bandwidth} TB/s", flush=True)
    if bandwidth:
        print(f"# bound, one stream: {bandwidth * 1e12 / read_bytes:.1f} tokens/s "
              f"(= {bandwidth} TB/s / {read_bytes / 1e9:.2f} GB per step; all weights: "
              f"{bandwidth * 1e12 / weight_bytes:.1f})", flush=True)

    # Warm-up: kernels and allocator for every batch size, a few tokens each.
    for streams in streams_list:
        run_streams(engine, streams, args.prompt_tokens, min(8, args.new_tokens), seed=0, sync=sync)

    rows = []
    header = ("| engine | streams | new tokens | wall (s) | prefill step (s) | aggregate tok/s | decode tok/s | "
              "per-stream tok/s | bound tok/s | of bound |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(header)
    for streams in streams_list:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = run_streams(engine, streams, args.prompt_tokens, args.new_tokens, seed=1, sync=sync)
        mean_context = args.prompt_tokens + args.new_tokens / 2
        step_bytes = read_bytes + streams * mean_context * kv_token
        bound = streams * bandwidth * 1e12 / step_bytes if bandwidth else float("nan")
        result.update(gpu=gpu_name, bound_tok_s=bound, of_bound=result["decode_tok_s"] / bound if bandwidth else None,
                      peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None)
        row = (f"| {name} | {streams} | {args.new_tokens} | {result['wall_s']:.2f} | {result['prefill_step_s']:.3f} | "
               f"{result['aggregate_tok_s']:.1f} | {result['decode_tok_s']:.1f} | {result['per_stream_tok_s']:.1f} | "
               f"{bound:.0f} | {result['decode_tok_s'] / bound:.0%} |" if bandwidth else
               f"| {name} | {streams} | {args.new_tokens} | {result['wall_s']:.2f} | {result['prefill_step_s']:.3f} | "
               f"{result['aggregate_tok_s']:.1f} | {result['decode_tok_s']:.1f} | {result['per_stream_tok_s']:.1f} | "
               f"– | – |")
        rows.append(row)
        print(row, flush=True)
        print(json.dumps(result), flush=True)
    if args.doc and not args.dry_run:
        from benchkit import update_doc

        # Its sections carry bench.py's name, as they always have: a rerun finds its section by it.
        command = f".venv/bin/python scripts/bench_gpu.py --engine {name} --streams {args.streams} " \
                  f"--new-tokens {args.new_tokens} --prompt-tokens {args.prompt_tokens} --doc"
        update_doc(f"gpu-{name}", f"Command: `{command}` on {gpu_name}, bandwidth {bandwidth} TB/s; engine ready "
                                  f"in {build_s:.0f} s.\n\n" + header + "\n" + "\n".join(rows),
                   writer="scripts/bench.py")
    engine.close()
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
