"""The original one-file tutorial server, kept only as the benchmark baseline (scripts/bench.py --target original).

Faithful to the original: the model and tokenizer load at import, `POST /` renders [system, user] with the chat
template, and `model.generate` runs synchronously inside an `async def` handler, so the event loop is blocked
and requests are served strictly one at a time. Run as one uvicorn process:

    MODEL_PATH=.cache/models/SmolLM2-135M-Instruct DEVICE=cpu DTYPE=bfloat16 \\
        .venv/bin/python -m uvicorn --app-dir scripts baseline_server:app --port 6007

Differences from the original, all for a like-for-like benchmark:
- MODEL_PATH / DEVICE / DTYPE come from the environment (the worker's variable names);
- the body may carry `max_new_tokens` (default 512, the original's fixed value);
- decoding is greedy (`do_sample=False`), as the benchmark asks of llamaq (`temperature: 0`); the original
  sampled with the model's generation_config;
- the answer carries one extra field, `completion_tokens` (generated ids, EOS included, as llamaq counts them).
"""

import datetime
import os

import torch
from fastapi import FastAPI, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_PATH = os.environ["MODEL_PATH"]
DEVICE = os.environ.get("DEVICE", "cuda")
DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
    os.environ.get("DTYPE", "bfloat16")
]

tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=DTYPE).to(DEVICE)

app = FastAPI()


def torch_gc():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


@app.post("/")
async def create_item(request: Request):
    body = await request.json()
    prompt = body.get("prompt")
    max_new_tokens = int(body.get("max_new_tokens", 512))
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    model_inputs = tokenizer([text], return_tensors="pt").to(DEVICE)
    # Blocking call inside the event loop: exactly the original's flaw.
    generated_ids = model.generate(
        model_inputs.input_ids, attention_mask=model_inputs.attention_mask,
        max_new_tokens=max_new_tokens, do_sample=False,
    )
    generated_ids = [out[len(inp):] for inp, out in zip(model_inputs.input_ids, generated_ids)]
    response = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
    time = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    torch_gc()
    return {"response": response, "status": 200, "time": time, "completion_tokens": len(generated_ids[0])}
