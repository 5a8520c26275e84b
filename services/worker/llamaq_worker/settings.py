import os
import socket
import uuid
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaq_protocol.keys import DEFAULT_QUEUE_NAME

DEFAULT_MODEL_ID = "LLM-Research/Meta-Llama-3.1-8B-Instruct"


def default_worker_name() -> str:
    """`<hostname>:<pid>:<random>`, new at every start. Host first, so a container's healthcheck can find its own
    worker by hostname. The random part because a container keeps its hostname across restarts and its worker is
    always PID 1: after an unclean exit RQ's `rq:worker:<name>` key outlives the process by minutes, and a
    restarted worker under the same name would fail RQ's registration ("There exists an active worker named ...")
    until it expired."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class WorkerSettings(BaseSettings):
    """Every knob of the worker, read from the environment (names documented in .env.example)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", protected_namespaces=())

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = DEFAULT_QUEUE_NAME
    log_level: str = "INFO"
    # json: one object per line with job_id and request_id; text: for reading in a terminal.
    log_format: Literal["json", "text"] = "json"
    # Log each job's messages (off: prompts are the users' data).
    log_prompts: bool = False
    # Prometheus metrics of this worker on GET :METRICS_PORT/metrics, the only place they are (Prometheus scrapes
    # each worker); 0 serves none.
    metrics_port: int = Field(default=9100, ge=0, le=65535)

    model_id: str = DEFAULT_MODEL_ID
    # A local model folder; when unset the model is fetched with modelscope's snapshot_download.
    model_path: str | None = None
    model_cache: str = "/models"
    device: str = "cuda"
    # auto: bfloat16 on CUDA and on CPUs with native bf16 (AMX or avx512_bf16), float32 otherwise.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Most sequences generated together (with vLLM, max_num_seqs is this plus INTERACTIVE_HEADROOM).
    max_batch: int = Field(default=32, ge=1)
    # Sequences beyond MAX_BATCH that only interactive jobs may take, in place of batch work the engine holds: one is
    # claimed at once even while batch work fills MAX_BATCH, and the engine decodes it first (preempting a batch
    # sequence, resumed later). Interactive jobs alone never exceed MAX_BATCH. auto: MAX_BATCH // 4, at least 1;
    # 0: none.
    interactive_headroom: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # Batch-tier jobs (batch, and work over its key's limits) are claimed only while the engine has room: at most this
    # many sequences waiting inside it, and its KV cache less full than this share (engines that report them: vLLM's
    # scheduler; the transformers engine's preempted sequences). Otherwise they wait in the fair queue, fair-shared and
    # cancelable, rather than in the engine.
    batch_claim_max_waiting: int = Field(default=0, ge=0)
    batch_claim_max_kv: float = Field(default=0.9, gt=0, le=1)
    # Batch-tier jobs started per decoding step at most. A backlog started all at once prefills in one long step (an
    # interactive job arriving then waits for it) and finishes together, freeing its slots in the same waves; spread
    # over steps, its starts and ends stay spread. auto: MAX_BATCH // 8, at least 1.
    batch_claim_per_step: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # vllm: vLLM's AsyncLLM (paged KV cache, CUDA graphs, its own scheduler); transformers: llamaq's own
    # continuous batching over transformers (CPU development, reference). Test only: "echo" runs no model and
    # answers each job with its last user message; "paced" runs no model and emits max_new_tokens tokens per job
    # at PACED_TOKENS_PER_S (a GPU's token rate, with the model's cost taken out).
    engine: Literal["transformers", "vllm", "echo", "paced"] = "transformers"
    # ENGINE=paced: tokens per second per sequence (a step every 1/paced_tokens_per_s s gives every running sequence a
    # token, as a GPU's batched step does).
    paced_tokens_per_s: float = Field(default=25.0, gt=0)

    # A chat template (a file's path, or the template itself) used instead of the model's own, by the worker and by
    # the gateway's prompt counts (vLLM's --chat-template): for a model whose own template does not render `tools`.
    chat_template: str | None = None
    # vLLM's tool parser that reads tool calls out of the model's text for tool_choice "auto" (vLLM's
    # --tool-call-parser: llama3_json for Llama 3.x, hermes, mistral, ...); "" turns tool calling off.
    tool_call_parser: str = "llama3_json"

    # ---- ENGINE=vllm (vLLM's own names, in upper case) --------------------------------------------------------
    # Fraction of GPU memory vLLM may use for weights, activations and its KV cache.
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # Context length to serve; 0: the model's own (max_position_embeddings).
    max_model_len: int = Field(default=0, ge=0)
    # Reuse the KV cache of a shared prompt prefix (the system prompt, earlier turns).
    enable_prefix_caching: bool = True
    # GPUs one worker spreads the model over.
    tensor_parallel_size: int = Field(default=1, ge=1)
    # No CUDA graphs or torch.compile: faster start, slower decoding.
    enforce_eager: bool = False
    # GiB of CPU memory: the KV cache itself on a CPU build of vLLM (VLLM_CPU_KVCACHE_SPACE), and on a GPU the
    # CPU space for KV blocks offloaded from it; 0: vLLM's default.
    kv_cache_cpu_gib: float = Field(default=0, ge=0)

    result_ttl_s: int = Field(default=3600, ge=1)
    # Times a job is re-queued after its worker or engine died under it before it fails (the gateway's sweep
    # reads the same variable).
    job_retries: int = Field(default=1, ge=0)
    heartbeat_s: float = Field(default=2.0, gt=0)
    # Read by the container healthcheck; the gateway uses the same variable to declare a worker gone.
    worker_stale_s: float = Field(default=15, gt=0)
    # How often RQ's own job/execution heartbeats are refreshed while a batch runs.
    rq_heartbeat_s: float = Field(default=10.0, gt=0)
    # How long a running batch waits for Redis to come back (decoding paused, tokens held) before the worker
    # exits non-zero and leaves its jobs to the lost-worker sweep.
    redis_outage_tolerance_s: float = Field(default=120, gt=0)
    # Seconds the decoding loop may hold jobs without finishing a decoding step (a hung engine.step()) before the
    # worker's heartbeat stops and its healthcheck fails, so the gateway's lost-worker sweep re-queues its jobs. Well
    # above the slowest real step, and above REDIS_OUTAGE_TOLERANCE_S (a batch waiting for Redis makes no steps).
    step_stall_s: float = Field(default=300, gt=0)
    # On SIGTERM: time for the running jobs to finish before they are handed back to the queue. Below compose's
    # stop_grace_period (60 s), after which the container is killed.
    drain_timeout_s: float = Field(default=50, ge=0)
    worker_name: str = Field(default_factory=default_worker_name)

    @property
    def headroom(self) -> int:
        """INTERACTIVE_HEADROOM as a number of sequences."""
        if self.interactive_headroom == "auto":
            return max(1, self.max_batch // 4)
        return self.interactive_headroom

    @property
    def batch_claims_per_step(self) -> int:
        """BATCH_CLAIM_PER_STEP as a number of jobs."""
        if self.batch_claim_per_step == "auto":
            return max(1, self.max_batch // 8)
        return self.batch_claim_per_step
