"""Issue 8 (b): DPO pairs/s, rayalign against TRL ``DPOTrainer`` in the same run.

    PYTHONPATH=platform:plugins python benchmarks/dpo_throughput.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/dpo_throughput.py --dry-run --out /tmp/bench   # CPU

Sides (each in its own process, one after the other):

* ``rayalign``: the DPO stage's path — pairs tokenized by ``tokenize_completion`` and packed by
  ``DPOStage._batches`` (chosen then rejected in one padding-free row), reference log-probs
  computed once for every pair by a ``ReferenceWorker`` (timed, and charged to the throughput:
  ``pairs_per_s_with_reference``), then the stage's ``DPOObjective`` (sigmoid, beta 0.1) on
  DeepSpeed ZeRO-2 trainers stepped by ``training.loop.train_step``;
* ``rayalign_labelled``: the same with the stage option ``logits: labelled`` (reference pass too);
* ``trl``: ``DPOTrainer`` with TRL's defaults (reference model run every step, padded batches,
  gradient checkpointing on), sigmoid loss, beta 0.1.

Matched: model, pairs (the same records, each prompt + answer at most ``--max-length`` tokens),
bf16 compute with fp32 master weights, and pairs per optimizer step on average (rayalign packs
``--micro-batch-tokens`` per row; TRL takes ``--trl-batch`` pairs per micro-batch and as many
micro-batches as reach rayalign's mean pairs per step).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "dpo_throughput"

# Per shape: (max length of prompt + answer, rayalign tokens per row, rows per step, TRL pairs per micro-batch)
PLANS = {"0.5b": (1024, 16384, 2, 8), "1.5b": (1024, 8192, 4, 8), "tiny": (192, 768, 1, 4)}


def plan(args) -> dict:
    return {**common.training_plan(args, PLANS), "beta": 0.1}


class _Pair(dict):
    """A preference record as ``DPOStage._batches`` reads one: fields, plus ``tokens`` (chosen, rejected)."""

    tokens: tuple


def data(args, p: dict):
    from transformers import AutoTokenizer

    from rayalign.data.chat import tokenize_completion

    model = common.model_dir(args.shape, args.seed)
    tok = AutoTokenizer.from_pretrained(model)
    pair_tokens = 1.6 * sum(common.long_tailed_lengths(2000, args.seed, p["min_length"], p["max_length"])) / 2000
    n = math.ceil(1.3 * p["micro_batch_tokens"] * p["grad_accum"] * (p["warmup"] + p["steps"]) / pair_tokens) + 16
    records = common.preference_examples(tok, n, args.seed, p["min_length"], p["max_length"])
    pairs = []
    for r in records:
        pair = _Pair(r, unlikelihood=False)
        pair.tokens = (tokenize_completion(tok, r["prompt"], r["chosen"], None),
                       tokenize_completion(tok, r["prompt"], r["rejected"], None))
        if max(len(t) for t in pair.tokens) <= p["max_length"]:  # the stage's rule: never truncate
            pairs.append(pair)
    return model, tok, records, pairs


def run_rayalign(args, labelled: bool = False) -> dict:

    from rayalign.cluster.runtime import Cluster
    from rayalign.cluster.worker_group import WorkerGroup
    from rayalign.config import ResourcesConfig
    from rayalign.workers.reference import ReferenceWorker
    from rayalign_dpo.losses import SigmoidDPOLoss
    from rayalign_dpo.stage import DPOConfig, DPOObjective, DPOStage

    p = plan(args)
    model, _, _, pairs = data(args, p)
    stage = DPOStage(DPOConfig(max_tokens_per_micro_batch=p["micro_batch_tokens"], max_length=p["max_length"]))
    stage.unlikelihood = None
    batches = stage._batches(pairs)
    objective = DPOObjective(SigmoidDPOLoss(beta=p["beta"]), labelled=labelled)
    on_gpu = common.cuda_available()
    common.start_ray(1 if on_gpu else None)
    resources = {"reference": {"num_gpus": 1 if on_gpu else 0, "num_cpus": 2 if on_gpu else 1}}
    used = batches[: (p["warmup"] + p["steps"]) * p["grad_accum"]]
    with Cluster(ResourcesConfig.model_validate(resources)).reserve("bench-ref", ["reference"]) as placement:
        ref = WorkerGroup("bench/reference", ReferenceWorker, placement["reference"], lambda r: (model, 2))
        try:
            ref.run(lambda a, r: a.ping.remote(), 600)
            started = time.perf_counter()
            ref_logps = ref.run(lambda a, r: a.score.remote(objective.logps, used), 900)[0]
            ref_seconds = time.perf_counter() - started
        finally:
            ref.shutdown()
    for batch, (c, r) in zip(used, ref_logps):
        batch["ref_chosen"], batch["ref_rejected"] = c, r
    out = common.rayalign_train(model, used, objective, gpus=1, grad_accum=p["grad_accum"], warmup=p["warmup"],
                                steps=p["steps"], grad_ckpt=args.grad_ckpt, count=objective.weight)
    pairs_used = sum(objective.weight(b) for b in used)
    out["pairs_per_s"] = common.throughput(out["step_seconds"], out["step_counts"])
    # The reference pass is part of the stage's cost: charge it per pair to the median step.
    per_pair_ref = ref_seconds / pairs_used
    median = out["pairs_per_s"]["per_step"]["median"]
    out["reference_seconds"] = ref_seconds
    out["reference_pairs"] = pairs_used
    out["pairs_per_s_with_reference"] = 1 / (1 / median + per_pair_ref) if median else None
    return out


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    p = plan(args)
    model_path, tok, records, pairs = data(args, p)
    tokens_per_step = p["micro_batch_tokens"] * p["grad_accum"]
    mean_pair = sum(len(c) + len(r) for c, r in (x.tokens for x in pairs)) / len(pairs)
    grad_accum = max(1, round(tokens_per_step / mean_pair / p["trl_batch"]))
    kept = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs]
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    timer = common.trl_step_timer(p["warmup"])
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=p["trl_batch"],
                           gradient_accumulation_steps=grad_accum, max_steps=p["warmup"] + p["steps"],
                           max_length=p["max_length"], beta=p["beta"], bf16=on_gpu, report_to="none",
                           save_strategy="no", seed=args.seed, use_cpu=not on_gpu)
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(kept), processing_class=tok,
                             callbacks=[timer])
        trainer.train()
    seconds = timer.step_seconds()
    counts = [float(p["trl_batch"] * grad_accum)] * len(seconds)
    rate = common.throughput(seconds, counts)
    return {"step_seconds": seconds, "step_counts": counts, "grad_accum": grad_accum, "trl_batch": p["trl_batch"],
            "pairs_per_s": rate, "pairs_per_s_with_reference": rate["per_step"]["median"],
            "peak_gib_per_rank": [common.torch_peak_gib()], "gradient_checkpointing": config.gradient_checkpointing,
            "precompute_ref_log_probs": config.precompute_ref_log_probs}


SIDES = {"rayalign": run_rayalign, "rayalign_labelled": lambda a: run_rayalign(a, True), "trl": run_trl}


def summary(results: dict) -> dict:
    with_ref = {k: v.get("pairs_per_s_with_reference") for k, v in results.items()}
    train_only = {k: (v.get("pairs_per_s") or {}).get("per_step", {}).get("median") for k, v in results.items()}
    out = {"pairs_per_s_median": with_ref, "pairs_per_s_train_steps_only": train_only,
           "peak_gib": common.peak_gib(results),
           "vs_trl": common.ratio(with_ref.get("rayalign"), with_ref.get("trl")),
           "labelled_vs_full": common.ratio(with_ref.get("rayalign_labelled"), with_ref.get("rayalign")),
           "target": "rayalign >= 1.5x TRL DPOTrainer (pairs/s, rayalign's reference pass included)"}
    out["target_met"] = out["vs_trl"] is not None and out["vs_trl"] >= 1.5
    return out


def main(argv: list[str] | None = None) -> int:
    return common.bench_main("dpo_throughput.py", NAME, common.training_parser(__doc__, SIDES), SIDES, plan, summary,
                             argv)


if __name__ == "__main__":
    raise SystemExit(main())
