"""Issue 8 (c): rollout output tokens/s through Ray against raw ``vllm.LLM.generate``, same run.

    PYTHONPATH=platform:plugins python benchmarks/rollout_throughput.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/rollout_throughput.py --dry-run --out /tmp/bench  # CPU

Sides (each in its own process, one after the other, so each has the GPU to itself):

* ``raw_vllm``: ``vllm.LLM(...)`` in the process, ``llm.generate`` on token-id prompts;
* ``rayalign``: ``RolloutWorker``s in a ``WorkerGroup`` (``--engines``, one GPU each), prompts
  sharded and regathered by ``rayalign.rollout.sharding.generate_sharded`` (what the RL stages
  call), completions returned through Ray to the driver;
* ``rayalign_stage_engine``: the same with the engine settings the stages use today
  (``EngineConfig`` defaults: ``enforce_eager=True``, so no CUDA graphs).

Matched: model, prompts (``--prompts`` random-id prompts of ``--prompt-len`` tokens), sampling
(temperature, top_p, ``--max-tokens``, no stop on EOS needed: random weights rarely emit it),
``gpu_memory_utilization``, ``max_model_len``, dtype bf16 and, except for the third side,
``enforce_eager``. One full generate call warms up; ``--repeats`` timed calls follow. Output
tokens are counted from what came back. Peak memory: nvidia-smi, whole device (vLLM preallocates
its fraction; the number shows what each side holds in all).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "rollout_throughput"


def plan(args) -> dict:
    if args.dry_run:
        return {"prompts": 16, "prompt_len": 32, "max_tokens": 32, "gpu_memory_utilization": 0.15,
                "max_model_len": 128, "enforce_eager": True, "repeats": 2, "engines": 1, "temperature": 1.0,
                "top_p": 1.0, "logprobs": args.logprobs}
    return {"prompts": args.prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": args.prompt_len + args.max_tokens + 16, "enforce_eager": args.enforce_eager,
            "repeats": args.repeats, "engines": args.engines, "temperature": 1.0, "top_p": 1.0,
            "logprobs": args.logprobs}


def prompts(args, p: dict) -> tuple[str, list[list[int]]]:
    from transformers import AutoConfig

    model = common.model_dir(args.shape, args.seed)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    return model, common.prompt_token_ids(p["prompts"], p["prompt_len"], vocab, args.seed)


def timed(generate, repeats: int) -> dict:
    """One warm-up call, then ``repeats`` timed ones; output tokens/s of each."""
    generate()
    seconds, tokens = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        tokens.append(float(generate()))
        seconds.append(time.perf_counter() - started)
    return {"call_seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": common.throughput(seconds, tokens)}


def run_raw(args) -> dict:
    from vllm import LLM, SamplingParams

    p = plan(args)
    model, ids = prompts(args, p)
    started = time.perf_counter()
    llm = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=p["gpu_memory_utilization"],
              max_model_len=p["max_model_len"], seed=args.seed, enforce_eager=p["enforce_eager"])
    load = time.perf_counter() - started
    params = SamplingParams(n=1, temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
                            logprobs=0 if p["logprobs"] else None)
    requests = [{"prompt_token_ids": list(x)} for x in ids]

    def generate() -> int:
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False))

    return {"engine_load_s": load, **timed(generate, p["repeats"])}


def run_rayalign(args, stage_engine: bool = False) -> dict:
    from rayalign.cluster.runtime import Cluster
    from rayalign.cluster.worker_group import WorkerGroup
    from rayalign.config import ResourcesConfig
    from rayalign.rollout.sharding import generate_sharded
    from rayalign.rollout.vllm_engine import EngineConfig, Sampling
    from rayalign.workers.rollout import RolloutWorker

    p = plan(args)
    model, ids = prompts(args, p)
    on_gpu = common.cuda_available()
    common.start_ray(p["engines"] if on_gpu else None)
    engine = EngineConfig(model=model, dtype="bfloat16", gpu_memory_utilization=p["gpu_memory_utilization"],
                          max_model_len=p["max_model_len"], seed=args.seed)
    if not stage_engine:
        engine.enforce_eager = p["enforce_eager"]
    sampling = Sampling(n=1, temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
                        logprobs=p["logprobs"])
    resources = {"rollout": {"num_workers": p["engines"], "num_gpus": 1 if on_gpu else 0, "num_cpus": 2,
                             "gpu_memory_utilization": p["gpu_memory_utilization"]}}
    with Cluster(ResourcesConfig.model_validate(resources)).reserve("bench", ["rollout"]) as placement:
        started = time.perf_counter()
        group = WorkerGroup("bench/rollout", RolloutWorker, placement["rollout"], lambda r: (engine, 2))
        try:
            group.run(lambda a, r: a.ping.remote(), 900)
            load = time.perf_counter() - started

            def generate() -> int:
                return sum(len(c.token_ids) for cs in generate_sharded(group, ids, sampling, 900) for c in cs)

            out = {"engine_load_s": load, "enforce_eager": engine.enforce_eager, **timed(generate, p["repeats"])}
        finally:
            group.shutdown()
    return out


SIDES = {"raw_vllm": run_raw, "rayalign": run_rayalign,
         "rayalign_stage_engine": lambda a: run_rayalign(a, stage_engine=True)}


def summary(results: dict) -> dict:
    rate = {k: (v.get("tokens_per_s") or {}).get("per_step", {}).get("median") for k, v in results.items()}
    out = {"output_tokens_per_s_median": rate,
           "device_peak_gib": {k: v.get("device_peak_gib") for k, v in results.items()},
           "engine_load_s": {k: v.get("engine_load_s") for k, v in results.items()},
           "vs_raw_vllm": common.ratio(rate.get("rayalign"), rate.get("raw_vllm")),
           "stage_engine_vs_raw_vllm": common.ratio(rate.get("rayalign_stage_engine"), rate.get("raw_vllm")),
           "target": "rayalign >= 0.9x raw vllm.LLM.generate (same prompts, sampling, memory fraction)"}
    out["target_met"] = out["vs_raw_vllm"] is not None and out["vs_raw_vllm"] >= 0.9
    return out


def main(argv: list[str] | None = None) -> int:
    ap = common.comparison_parser(__doc__, SIDES)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs on the first two sides")
    ap.add_argument("--logprobs", action="store_true", help="return each sampled token's logprob (RL does)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls after one warm-up call")
    ap.add_argument("--engines", type=int, default=1, help="rayalign rollout workers (one GPU each)")
    return common.bench_main("rollout_throughput.py", NAME, ap, SIDES, plan, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
