"""Benchmark (c): rollout output tokens/s through Ray against raw ``vllm.LLM.generate``, same run, and
what each suspected cause of the gap costs.

    PYTHONPATH=platform:plugins python benchmarks/rollout_throughput.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/rollout_throughput.py --shape 0.5b --out $OUT \\
        --sides raw_vllm_inproc,rayalign_eager,rayalign_4cpu,rayalign_child --name rollout_causes
    PYTHONPATH=platform:plugins python benchmarks/rollout_throughput.py --dry-run --out /tmp/bench  # CPU

Sides (each in its own process, one after the other, so each has the GPU to itself):

* ``raw_vllm``: ``vllm.LLM(...)`` in the process, ``llm.generate`` on token-id prompts (vLLM's
  defaults: the engine core in a child process, text detokenized);
* ``rayalign``: what the RL stages run, with the stages' own defaults: ``RolloutResources()``
  (one CPU per rollout actor, ``enforce_eager`` null: CUDA graphs on a GPU, ``engine_core`` auto:
  vLLM's engine core in the actor's own process) in a ``WorkerGroup``,
  prompts sharded and regathered by ``rollout.sharding.generate_sharded`` (flat arrays through
  Ray, token ids only: the RL loop decodes text itself). The same actor then times two call
  variants on the same engine, each undoing one change: ``detokenize`` (vLLM detokenizes every
  answer and logprob token in the actor) and ``objects`` (``generate``: a list of ``Completion``
  objects pickled through Ray, detokenized, as the stages did before);

and one side per remaining suspect, each differing from ``rayalign`` in that one thing:

* ``raw_vllm_inproc``: raw vLLM with the engine core in the calling process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): scheduling and output processing then share one thread
  with the model's steps;
* ``rayalign_eager``: ``enforce_eager=True`` (the stages' engine setting before);
* ``rayalign_4cpu``: 4 CPUs (so ``OMP_NUM_THREADS`` and torch's threads) per rollout actor, not 1;
* ``rayalign_child``: ``engine_core: child``, the engine core in a child process of the actor (vLLM's
  own default placement; the stages' default on GPUs from 2026-12-03 until the measurements showed
  it slower).

Matched: model, prompts (``--prompts`` random-id prompts of ``--prompt-len`` tokens), sampling
(temperature, top_p, ``--max-tokens``, ``--logprobs``; random weights rarely emit EOS),
``gpu_memory_utilization``, ``max_model_len``, dtype bf16, CUDA graphs (but for
``rayalign_eager``; ``--enforce-eager`` turns them off on every side). One full generate call warms
up; ``--repeats`` timed calls follow. Output tokens are counted from what came back. Peak memory:
nvidia-smi, whole device (vLLM preallocates its fraction; the number shows what each side holds).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "rollout_throughput"
# Call variants timed inside the ``rayalign`` side, on its engine: (generate_batch?, detokenize?).
CALL_VARIANTS = {"default": (True, False), "detokenize": (True, True), "objects": (False, True)}


def plan(args) -> dict:
    if args.dry_run:
        return {"prompts": 16, "prompt_len": 32, "max_tokens": 32, "gpu_memory_utilization": 0.15,
                "max_model_len": 128, "enforce_eager": None, "repeats": 2, "engines": 1, "temperature": 1.0,
                "top_p": 1.0, "logprobs": args.logprobs}
    return {"prompts": args.prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": args.prompt_len + args.max_tokens + 16, "enforce_eager": True if args.enforce_eager else None,
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


def run_raw(args, in_process: bool = False) -> dict:
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    p = plan(args)
    model, ids = prompts(args, p)
    # Eager where vLLM needs it (CPU), as the stages resolve a null enforce_eager.
    eager = p["enforce_eager"] if p["enforce_eager"] is not None else not common.cuda_available()
    started = time.perf_counter()
    llm = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=p["gpu_memory_utilization"],
              max_model_len=p["max_model_len"], seed=args.seed, enforce_eager=eager)
    load = time.perf_counter() - started
    params = SamplingParams(n=1, temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
                            logprobs=0 if p["logprobs"] else None)
    requests = [{"prompt_token_ids": list(x)} for x in ids]

    def generate() -> int:
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False))

    return {"engine_load_s": load, "enforce_eager": eager, "engine_in_process": in_process,
            **timed(generate, p["repeats"])}


def run_rayalign(args, *, eager: bool | None = None, cpus: int | None = None, engine_core: str = "auto",
                 variants: tuple[str, ...] = ("default",)) -> dict:
    """The stages' rollout path; keyword arguments each change one stage default."""
    from rayalign.cluster.runtime import Cluster
    from rayalign.cluster.worker_group import WorkerGroup
    from rayalign.config import ResourcesConfig
    from rayalign.rollout.vllm_engine import Sampling, engine_config
    from rayalign.workers.rollout import RolloutWorker

    p = plan(args)
    model, ids = prompts(args, p)
    on_gpu = common.cuda_available()
    common.start_ray(p["engines"] if on_gpu else None)
    rollout = {"num_workers": p["engines"], "num_gpus": 1 if on_gpu else 0,
               "gpu_memory_utilization": p["gpu_memory_utilization"], "max_model_len": p["max_model_len"],
               "dtype": "bfloat16", "enforce_eager": eager if eager is not None else p["enforce_eager"],
               "engine_core": engine_core}
    if cpus is not None:
        rollout["num_cpus"] = cpus
    resources = ResourcesConfig.model_validate({"rollout": rollout})
    engine = engine_config(resources.rollout, model, args.seed)
    threads = int(resources.rollout.num_cpus)
    with Cluster(resources).reserve("bench", ["rollout"]) as placement:
        started = time.perf_counter()
        group = WorkerGroup("bench/rollout", RolloutWorker, placement["rollout"], lambda r: (engine, threads))
        try:
            group.run(lambda a, r: a.ping.remote(), 900)
            load = time.perf_counter() - started
            out = {"engine_load_s": load, "enforce_eager": group.run(lambda a, r: a.enforce_eager.remote(), 60)[0],
                   "actor_cpus": threads, "engine_core": group.run(lambda a, r: a.engine_core.remote(), 60)[0],
                   "variants": {}}
            for name in variants:
                flat, detokenize = CALL_VARIANTS[name]
                sampling = Sampling(n=1, temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
                                    logprobs=p["logprobs"], detokenize=detokenize)
                out["variants"][name] = timed(lambda: _generate(group, ids, sampling, flat), p["repeats"])
        finally:
            group.shutdown()
    return {**out, **out["variants"]["default"]}


def _generate(group, ids: list[list[int]], sampling, flat: bool) -> int:
    from rayalign.rollout.sharding import generate_sharded

    if flat:
        return sum(len(c.token_ids) for cs in generate_sharded(group, ids, sampling, 900) for c in cs)
    # Before: each engine's answer a list of Completion objects, pickled item by item.
    k = len(group)
    shards = [list(range(len(ids)))[r::k] for r in range(k)]
    results = group.run(lambda a, r: a.generate.remote([ids[i] for i in shards[r]], sampling), 900)
    return sum(len(c.token_ids) for completions in results for c in completions)


SIDES = {
    "raw_vllm": run_raw,
    "rayalign": lambda a: run_rayalign(a, variants=tuple(CALL_VARIANTS)),
    "raw_vllm_inproc": lambda a: run_raw(a, in_process=True),
    "rayalign_eager": lambda a: run_rayalign(a, eager=True),
    "rayalign_4cpu": lambda a: run_rayalign(a, cpus=4),
    "rayalign_child": lambda a: run_rayalign(a, engine_core="child"),
}
HEADLINE = "raw_vllm,rayalign"


def summary(results: dict) -> dict:
    def rate(result: dict | None) -> float | None:
        return ((result or {}).get("tokens_per_s") or {}).get("per_step", {}).get("median")

    rates = {k: rate(v) for k, v in results.items()}
    ours = rates.get("rayalign")
    for name, variant in (results.get("rayalign") or {}).get("variants", {}).items():
        if name != "default":
            rates[f"rayalign+{name}"] = rate(variant)
    out = {"output_tokens_per_s_median": rates,
           "device_peak_gib": {k: v.get("device_peak_gib") for k, v in results.items()},
           "engine_load_s": {k: v.get("engine_load_s") for k, v in results.items()},
           "vs_raw_vllm": common.ratio(ours, rates.get("raw_vllm")),
           # Each suspect's effect: its variant's rate over the stages' default path (< 1: it costs).
           "cause_vs_rayalign": {k: common.ratio(v, ours) for k, v in rates.items()
                                 if k.startswith("rayalign") and k != "rayalign"},
           "engine_in_process_vs_child": common.ratio(rates.get("raw_vllm_inproc"), rates.get("raw_vllm")),
           "target": "rayalign (the stages' defaults) >= 0.9x raw vllm.LLM.generate (same prompts, sampling, "
                     "memory fraction)"}
    out["target_met"] = out["vs_raw_vllm"] is not None and out["vs_raw_vllm"] >= 0.9
    return out


def main(argv: list[str] | None = None) -> int:
    ap = common.comparison_parser(__doc__, SIDES)
    ap.set_defaults(sides=HEADLINE)
    ap.add_argument("--name", help=f"result file name (default {NAME}); another set of sides in the same day's "
                    "run needs its own")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs on any side")
    ap.add_argument("--logprobs", action="store_true", help="return each sampled token's logprob (RL does)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls after one warm-up call")
    ap.add_argument("--engines", type=int, default=1, help="rayalign rollout workers (one GPU each)")
    return common.bench_main("rollout_throughput.py", NAME, ap, SIDES, plan, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
