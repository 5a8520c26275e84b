"""ENGINE=vllm: vLLM's `AsyncLLM` (paged KV cache, CUDA graphs, its own scheduler) behind the worker's engine
interface, embedded in the long-lived RQ batch worker.

vLLM does the batching: the worker claims jobs while `free_slots` allows and hands each to vLLM at once; vLLM
schedules prefill and decode of all of them together. `step()` only collects the text deltas vLLM produced since the
last call.

Priorities are vLLM's own (`scheduling_policy="priority"`): each request carries its job's (interactive 0, batch 1,
over its key's limits 2; within one, arrival order, which is the fair queue's claim order). vLLM's scheduler takes its
waiting requests in that order, and when the KV cache runs short it preempts the running request of the lowest
priority that arrived last. It never preempts a running request only because `max_num_seqs` are running: so
`max_num_seqs` is MAX_BATCH plus the interactive headroom, the worker holding batch work to MAX_BATCH (and
interactive work too, but for the headroom's places beside batch work), and an interactive request is scheduled at
vLLM's next step whatever batch work runs.

One thread owns an asyncio loop for the engine's whole life: AsyncLLM binds its output handler to the loop of its
first call, and the batch worker itself is synchronous. Each sequence is one task on that loop consuming
`AsyncLLM.generate` (DELTA outputs); `cancel` cancels that task, and vLLM's `generate` aborts the request itself
on cancellation, within one engine step. The EngineCore runs in a process vLLM spawns, so a script that builds this
engine needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from dataclasses import dataclass, field

from transformers import AutoTokenizer
from vllm import SamplingParams as VllmSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from ..hardware import resolve_dtype
from .base import (
    LOGPROBS,
    PROMPT_LOGPROBS,
    STRUCTURED,
    PRIORITY_INTERACTIVE,
    EngineDead,
    EngineStats,
    SamplingParams,
    SequenceSlots,
    StepOutput,
    TokenLogprobDict,
    chat_token_ids,
    read_generation_config,
    sampling_defaults,
    validate_request,
)

logger = logging.getLogger(__name__)

# How long `step()` waits for vLLM's next outputs before returning none, so that the decoding loop still looks at
# cancels, timeouts and new jobs while vLLM is busy (a long prefill on a CPU).
STEP_WAIT_S = 0.05
# How often an idle engine is checked for a dead EngineCore.
WATCH_S = 2.0
# vLLM's finish reasons, as the job contract names them ("abort": we cancelled it).
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "canceled"}


def vllm_sampling(params: SamplingParams) -> VllmSamplingParams:
    """A job's sampling settings in vLLM's terms, every field set (vLLM's own max_tokens default is 16)."""
    return VllmSamplingParams(
        n=1,
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,  # 0: greedy
        top_p=params.top_p,
        top_k=params.top_k,  # 0: off, in vLLM too
        repetition_penalty=params.repetition_penalty,  # over prompt and output tokens, as transformers does
        stop=list(params.stop) or None,  # cut before the stop text, which is not returned
        seed=params.seed,
        output_kind=RequestOutputKind.DELTA,
        min_p=params.min_p,
        stop_token_ids=list(params.stop_token_ids) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        skip_special_tokens=params.skip_special_tokens,
        logprobs=params.logprobs,  # from the raw distribution (vLLM's default logprobs_mode, raw_logprobs)
        prompt_logprobs=params.prompt_logprobs,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias) or None,
        structured_outputs=structured_outputs(params),
    )


def structured_outputs(params: SamplingParams) -> StructuredOutputsParams | None:
    """The job's constraint as vLLM's structured-output backend (xgrammar by default) takes it."""
    constraint = params.structured_outputs
    if constraint is None:
        return None
    if constraint.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if constraint.kind == "choice":
        return StructuredOutputsParams(choice=list(constraint.spec))
    return StructuredOutputsParams(**{constraint.kind: constraint.spec})


def token_logprobs(position, chosen: int, top: int) -> TokenLogprobDict | None:
    """One position of vLLM's logprobs ({token id: Logprob}, the chosen token first, then ranks 1..top) in the
    engine interface's shape: the chosen token, and the `top` best by rank."""
    if position is None or chosen not in position:
        return None

    def entry(token_id: int, logprob) -> dict:
        return {"token": logprob.decoded_token or "", "id": int(token_id), "logprob": float(logprob.logprob)}

    best = sorted(((lp.rank, t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= top),
                  key=lambda item: item[0])
    return {**entry(chosen, position[chosen]), "top": [entry(t, lp) for _, t, lp in best]}


@dataclass(eq=False)
class _VllmSeq:
    seq_id: str
    canceled: bool = False
    task: concurrent.futures.Future | None = None
    completion_tokens: int = 0
    finished: bool = False
    params: SamplingParams | None = None
    prompt_ids: list[int] = field(default_factory=list)
    priority: int = PRIORITY_INTERACTIVE
    preemptions: int = 0  # vLLM's count for the request, as its last output showed it


class _StatsRecorder(StatLoggerBase):
    """vLLM's per-step scheduler stats, kept in the engine's `EngineStats` for the worker's metrics."""

    def __init__(self, stats: EngineStats):
        self.stats = stats

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is not None:  # one per scheduler step
            self.stats.steps += 1
            self.stats.running = scheduler_stats.num_running_reqs
            self.stats.waiting = scheduler_stats.num_waiting_reqs
            self.stats.kv_cache_usage = scheduler_stats.kv_cache_usage
        if iteration_stats is not None:
            self.stats.preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self):
        pass


@dataclass
class VllmOptions:
    """What vLLM users tune, from WorkerSettings (vLLM's own names)."""

    dtype: str = "auto"
    max_batch: int = 32
    headroom: int = 0  # sequences beyond max_batch for interactive requests only (vLLM's max_num_seqs: both)
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kv_cache_cpu_gib: float = 0.0
    extra: dict = field(default_factory=dict)


def engine_args(model_path: str, options: VllmOptions) -> AsyncEngineArgs:
    """vLLM's engine arguments for `options`: priority scheduling, and room for the interactive headroom beside
    MAX_BATCH (see the module's docstring)."""
    return AsyncEngineArgs(
        model=model_path,
        dtype=options.dtype,
        max_num_seqs=options.max_batch + options.headroom,
        scheduling_policy="priority",
        max_model_len=options.max_model_len,
        gpu_memory_utilization=options.gpu_memory_utilization,
        enable_prefix_caching=options.enable_prefix_caching,
        tensor_parallel_size=options.tensor_parallel_size,
        enforce_eager=options.enforce_eager,
        # vLLM's own periodic stat lines off; its scheduler stats still reach _StatsRecorder.
        disable_log_stats=True,
        **options.extra,
    )


class VLLMEngine(SequenceSlots[_VllmSeq]):
    capabilities = frozenset({LOGPROBS, PROMPT_LOGPROBS, STRUCTURED})

    @classmethod
    def from_settings(cls, settings, model_dir: str) -> VLLMEngine:
        return cls(model_dir, VllmOptions(
            dtype=resolve_dtype(settings.dtype, settings.device),
            max_batch=settings.max_batch,
            headroom=settings.headroom,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len or None,
            enable_prefix_caching=settings.enable_prefix_caching,
            tensor_parallel_size=settings.tensor_parallel_size,
            enforce_eager=settings.enforce_eager,
            kv_cache_cpu_gib=settings.kv_cache_cpu_gib,
        ))

    def __init__(self, model_path: str, options: VllmOptions | None = None) -> None:
        options = options or VllmOptions()
        super().__init__(options.max_batch, options.headroom)
        self.options = options
        self.model_name = os.path.basename(os.path.normpath(model_path))
        # The same files vLLM tokenizes with; the prompt ids come from this chat template, as the gateway counts.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.defaults = sampling_defaults(read_generation_config(model_path))
        self.stats = EngineStats()
        self._ready: dict[str, StepOutput] = {}
        self._ready_changed = threading.Condition()
        self._dead: BaseException | None = None
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llamaq-vllm-loop", daemon=True)
        self._thread.start()
        try:
            self._llm = self._on_loop(self._start(model_path, options)).result()
        except BaseException:
            self._stop_loop()
            raise
        self._on_loop(self._watch())
        self.context_length = int(self._llm.model_config.max_model_len)
        self.vocab_size = int(self._llm.model_config.get_vocab_size())
        logger.info("vLLM engine ready: model=%s dtype=%s max_num_seqs=%d (batch %d + interactive headroom %d) "
                    "scheduling=priority max_model_len=%d prefix_caching=%s tensor_parallel=%d eager=%s defaults=%s",
                    self.model_name, options.dtype, options.max_batch + options.headroom, options.max_batch,
                    options.headroom, self.context_length, options.enable_prefix_caching,
                    options.tensor_parallel_size, options.enforce_eager, self.defaults)

    async def _start(self, model_path: str, options: VllmOptions) -> AsyncLLM:
        args = engine_args(model_path, options)
        if options.kv_cache_cpu_gib:
            if current_platform.is_cpu():
                # On a CPU build the KV cache itself lives in CPU memory; vLLM reads whole GiB from the environment
                # (its EngineCore process inherits it).
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(options.kv_cache_cpu_gib)))
            else:
                args.kv_offloading_size = options.kv_cache_cpu_gib
        stats = self.stats
        return AsyncLLM.from_engine_args(args, stat_loggers=[lambda config, index: _StatsRecorder(stats)])

    # ---- the engine interface --------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, tools)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
            priority: int = PRIORITY_INTERACTIVE) -> None:
        validate_request(prompt_ids, params, self.context_length, self.vocab_size)
        if self._dead is not None:
            raise EngineDead(f"vLLM engine is dead: {self._dead}")
        sampling = vllm_sampling(params)
        prompt = TokensPrompt(prompt_token_ids=[int(t) for t in prompt_ids])
        seq = _VllmSeq(seq_id, params=params, prompt_ids=list(prompt["prompt_token_ids"]), priority=priority)
        self._claim(seq_id, lambda: seq, priority=priority)
        seq.task = self._on_loop(self._generate(seq, prompt, sampling))
        seq.task.add_done_callback(lambda task: self._ended(seq, task))

    def cancel(self, seq_id: str) -> None:
        super().cancel(seq_id)
        with self._lock:
            seq = self._by_id.get(seq_id)
        if seq is not None and seq.task is not None:
            # Cancelling the task makes vLLM's generate() abort the request; _ended reports "canceled".
            seq.task.cancel()

    def step(self) -> list[StepOutput]:
        with self._ready_changed:
            if not self._ready and self._dead is None:
                self._ready_changed.wait(STEP_WAIT_S)
            ready, self._ready = self._ready, {}
            dead = self._dead
        if dead is not None and not ready:
            raise EngineDead(f"vLLM engine is dead: {dead}")
        return list(ready.values())

    def device_memory(self) -> tuple[int, int]:
        """GPU memory in use on this worker's devices (NVML: the EngineCore process holds it, not this one), and
        the share vLLM was given; 0, 0 on a CPU."""
        if current_platform.is_cpu():
            return 0, 0
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            indexes = ([int(i) for i in visible.split(",") if i.strip().isdigit()] if visible
                       else range(pynvml.nvmlDeviceGetCount()))
            infos = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indexes]
            used = sum(int(info.used) for info in infos)
            budget = sum(int(info.total * self.options.gpu_memory_utilization) for info in infos)
            return used, budget
        except Exception:  # no NVML here: the metric is informative only
            return 0, 0

    def close(self) -> None:
        """Stop vLLM's EngineCore and the loop thread (at once: a draining worker has handed its jobs back)."""
        if not self._thread.is_alive():
            return
        self._closing = True
        try:
            # A dead EngineCore has nothing to drain, and its shutdown may wait out the whole timeout: the worker
            # would then exit a minute late, its jobs long handed back.
            self._on_loop(self._shutdown()).result(timeout=5 if self._dead is not None else 60)
        except Exception as exc:
            logger.warning("vLLM did not shut down cleanly: %s", exc)
        finally:
            self._stop_loop()
            # Shut down now, while the interpreter is whole: AsyncLLM.__del__ would try again at exit.
            self._llm = None

    async def _shutdown(self) -> None:
        self._llm.shutdown()

    # ---- on the engine's loop --------------------------------------------------------------------------------

    def _on_loop(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    async def _watch(self) -> None:
        """A running batch learns at its next step that the EngineCore died (every request fails); an idle worker
        would only learn it from the next job, after /readyz had called it ready all along. So: exit non-zero
        while idle, for the supervisor to start a fresh worker (there are no jobs to hand back)."""
        while not self._closing:
            await asyncio.sleep(WATCH_S)
            if self._closing or not self._llm.errored:
                continue
            with self._ready_changed:
                if self._dead is None:
                    self._dead = RuntimeError("vLLM's EngineCore is no longer running")
                self._ready_changed.notify_all()
            if not self.active:
                logger.error("vLLM's EngineCore died while this worker was idle; exiting for a fresh worker")
                os._exit(1)
            return

    async def _generate(self, seq: _VllmSeq, prompt: TokensPrompt, sampling: VllmSamplingParams) -> None:
        async for out in self._llm.generate(prompt, sampling, request_id=seq.seq_id, priority=seq.priority):
            self._count_preemptions(seq, out)
            completion = out.outputs[0]
            seq.completion_tokens += len(completion.token_ids)
            finish = None
            if out.finished:
                finish = FINISH_REASONS.get(completion.finish_reason or "", None)
                if finish is None:
                    self._report(seq, completion.text, error=f"engine_error: vLLM finished the request with "
                                                             f"{completion.finish_reason!r}")
                    return
            self._report(seq, completion.text, finish, logprobs=self._logprobs(seq, completion, out),
                         token_ids=[int(t) for t in completion.token_ids])
        if not seq.finished:
            self._report(seq, "", error="engine_error: vLLM ended the request without a finish reason")

    def _count_preemptions(self, seq: _VllmSeq, out) -> None:
        """vLLM counts a request's preemptions in its stats (RequestOutput.metrics, kept while stats are logged): the
        new ones go to this engine's count by priority, once the request has an output again."""
        preemptions = getattr(getattr(out, "metrics", None), "num_preemptions", None)
        if preemptions is not None and preemptions > seq.preemptions:
            self.stats.count_preemption(seq.priority, preemptions - seq.preemptions)
            seq.preemptions = preemptions

    def _ended(self, seq: _VllmSeq, task: concurrent.futures.Future) -> None:
        """The sequence's task is over: report how, unless its last output already did."""
        if seq.finished:
            return
        if task.cancelled():
            self._report(seq, "", "canceled")
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, EngineDeadError):
            logger.error("vLLM's engine died: %s", exc)
            with self._ready_changed:
                self._dead = exc
                self._ready_changed.notify_all()
            return
        logger.error("vLLM failed sequence %s: %r", seq.seq_id, exc)
        cause = exc.__cause__ or exc
        if isinstance(cause, ValueError):  # vLLM refused the request itself (a grammar it cannot compile, say)
            self._report(seq, "", error=f"invalid_request: {cause}")
            return
        self._report(seq, "", error=f"engine_error: {type(cause).__name__}: {cause}")

    @staticmethod
    def _logprobs(seq: _VllmSeq, completion, out) -> tuple[list | None, list | None]:
        """The output's token logprobs and (on the first) prompt logprobs, when the sequence asked for them."""
        params = seq.params
        tokens = tokens_prompt = None
        if params is not None and params.logprobs is not None and completion.logprobs is not None:
            tokens = [token_logprobs(position, int(t), params.logprobs)
                      for t, position in zip(completion.token_ids, completion.logprobs)]
        if params is not None and params.prompt_logprobs is not None and out.prompt_logprobs is not None:
            tokens_prompt = [None] + [token_logprobs(position, t, params.prompt_logprobs)
                                      for t, position in zip(seq.prompt_ids[1:], list(out.prompt_logprobs)[1:])]
        return tokens, tokens_prompt

    def _report(
        self, seq: _VllmSeq, text: str, finish: str | None = None, error: str | None = None,
        logprobs: tuple[list | None, list | None] = (None, None), token_ids: list[int] | None = None,
    ) -> None:
        """Merge one output into what the next `step()` returns, and give the slot back once the sequence ended."""
        with self._ready_changed:
            if seq.finished:
                return  # a cancel was reported while vLLM still had this output in flight
            new = StepOutput(seq.seq_id, text, seq.completion_tokens, finish, error, *logprobs, token_ids=token_ids)
            out = self._ready.get(seq.seq_id)
            if out is None:
                self._ready[seq.seq_id] = new
            else:
                out.merge(new)
            if finish is not None or error is not None:
                seq.finished = True
                self._release(seq)
            self._ready_changed.notify_all()
