"""Benchmark (b): DPO pairs/s, rayalign against TRL ``DPOTrainer`` in the same run.

    PYTHONPATH=platform:plugins python benchmarks/dpo_throughput.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/dpo_throughput.py --dry-run --out /tmp/bench   # CPU

Sides (each in its own process, one after the other):

* ``rayalign``: the DPO stage's path with the stage's defaults — pairs tokenized by
  ``tokenize_completion`` and packed by ``DPOStage._batches`` (chosen then rejected in one
  padding-free row), reference log-probs computed once for every pair by the stage's sharded
  reference pass (``rayalign_dpo.reference.score_sharded``; timed after scoring three rows untimed,
  as the trainers' warm-up steps, and charged to the throughput: ``pairs_per_s_with_reference``;
  the warm-up's seconds are in the file), its workers shut down before training, then the stage's
  ``DPOObjective`` (sigmoid, beta 0.1) on DeepSpeed ZeRO-2 trainers stepped by
  ``training.loop.train_step``. What the defaults resolved to is in ``settings_used``;
* ``rayalign_full``, ``rayalign_labelled``: the same with ``logits: full`` / ``labelled``
  (the reference pass too);
* ``trl``: ``DPOTrainer`` with TRL's defaults (reference model run every step, padded batches,
  gradient checkpointing on), sigmoid loss, beta 0.1;
* ``trl_tuned``: TRL's best configuration here: ``precompute_ref_log_probs=True`` (the reference
  pass before training, timed and charged per pair like rayalign's), no gradient checkpointing,
  ``use_liger_kernel=True`` where liger-kernel is installed (TRL 1.16 then applies Liger's layer
  kernels; its DPO loss keeps its own chunked LM head). ``padding_free`` is not offered: TRL 1.16's
  DPOTrainer warns that it is unavailable and falls back to padding.

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


REFERENCE_WARMUP_ROWS = 3  # untimed rows first, as the trainers' warm-up steps (CUDA context, kernel choice)


def run_rayalign(args, logits: str = "auto") -> dict:

    from rayalign.cluster.runtime import Cluster
    from rayalign.cluster.worker_group import WorkerGroup
    from rayalign.config import ResourcesConfig
    from rayalign.workers.reference import ReferenceWorker
    from rayalign_dpo.losses import SigmoidDPOLoss
    from rayalign_dpo.reference import score_sharded
    from rayalign_dpo.stage import DPOConfig, DPOObjective, DPOStage

    p = plan(args)
    model, _, _, pairs = data(args, p)
    stage = DPOStage(DPOConfig(max_tokens_per_micro_batch=p["micro_batch_tokens"], max_length=p["max_length"]))
    stage.unlikelihood = None
    batches = stage._batches(pairs)
    objective = DPOObjective(SigmoidDPOLoss(beta=p["beta"]), logits=logits)
    on_gpu = common.cuda_available()
    common.start_ray(1 if on_gpu else None)
    resources = {"reference": {"num_gpus": 1 if on_gpu else 0, "num_cpus": 2 if on_gpu else 1}}
    used = batches[: (p["warmup"] + p["steps"]) * p["grad_accum"]]
    with Cluster(ResourcesConfig.model_validate(resources)).reserve("bench-ref", ["reference"]) as placement:
        ref = WorkerGroup("bench/reference", ReferenceWorker, placement["reference"], lambda r: (model, 2))
        try:
            ref.run(lambda a, r: a.ping.remote(), 600)
            # Untimed, as the trainers' warm-up steps: a real dataset's pass amortises the first
            # calls' set-up (CUDA context, kernel selection); 16 rows would not.
            started = time.perf_counter()
            score_sharded(ref, objective.logps, used[:REFERENCE_WARMUP_ROWS], 900)
            warmup_seconds = time.perf_counter() - started
            started = time.perf_counter()
            ref_logps = score_sharded(ref, objective.logps, used, 900)
            ref_seconds = time.perf_counter() - started
        finally:
            ref.shutdown()
    for batch, (c, r) in zip(used, ref_logps):
        batch["ref_chosen"], batch["ref_rejected"] = c, r
    out = common.rayalign_train(model, used, objective, gpus=1, grad_accum=p["grad_accum"], warmup=p["warmup"],
                                steps=p["steps"], grad_ckpt=args.grad_ckpt, count=objective.weight)
    out["settings_used"]["logits"] = ("labelled" if on_gpu else "full") if logits == "auto" else logits
    pairs_used = sum(objective.weight(b) for b in used)
    out["pairs_per_s"] = common.throughput(out["step_seconds"], out["step_counts"])
    # The reference pass is part of the stage's cost: charge it per pair to the median step.
    per_pair_ref = ref_seconds / pairs_used
    median = out["pairs_per_s"]["per_step"]["median"]
    out["reference_seconds"] = ref_seconds
    out["reference_warmup_seconds"] = warmup_seconds
    out["reference_pairs"] = pairs_used
    out["pairs_per_s_with_reference"] = 1 / (1 / median + per_pair_ref) if median else None
    return out


def run_trl(args, tuned: bool = False) -> dict:
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
    tuned_options = {}
    if tuned:
        tuned_options = {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 2 * p["trl_batch"],
                         "gradient_checkpointing": False, "use_liger_kernel": on_gpu and common.liger_importable()}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    timer = common.trl_step_timer(p["warmup"])
    precompute = {"seconds": 0.0}

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            precompute["seconds"] += time.perf_counter() - started
            return out

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=p["trl_batch"],
                           gradient_accumulation_steps=grad_accum, max_steps=p["warmup"] + p["steps"],
                           max_length=p["max_length"], beta=p["beta"], bf16=on_gpu, report_to="none",
                           save_strategy="no", seed=args.seed, use_cpu=not on_gpu, **tuned_options)
        trainer = Timed(model=model, args=config, train_dataset=Dataset.from_list(kept), processing_class=tok,
                        callbacks=[timer])
        trainer.train()
    seconds = timer.step_seconds()
    counts = [float(p["trl_batch"] * grad_accum)] * len(seconds)
    rate = common.throughput(seconds, counts)
    median = rate["per_step"]["median"]
    # A precomputed reference pass covers the whole training set: charged per pair, as rayalign's.
    per_pair_ref = precompute["seconds"] / len(kept)
    return {"step_seconds": seconds, "step_counts": counts, "grad_accum": grad_accum, "trl_batch": p["trl_batch"],
            "pairs_per_s": rate,
            "pairs_per_s_with_reference": 1 / (1 / median + per_pair_ref) if median else None,
            "reference_seconds": precompute["seconds"],
            "reference_pairs": len(kept) if config.precompute_ref_log_probs else 0,
            "peak_gib_per_rank": [common.torch_peak_gib()], "gradient_checkpointing": config.gradient_checkpointing,
            "precompute_ref_log_probs": config.precompute_ref_log_probs,
            "settings_used": {"attn_implementation": "sdpa", "padding_free": False,
                              "use_liger_kernel": bool(config.use_liger_kernel),
                              "optim": str(getattr(config.optim, "value", config.optim)),
                              "precision": "fp32 weights under bf16 autocast" if on_gpu else "fp32",
                              "precompute_ref_log_probs": config.precompute_ref_log_probs}}


SIDES = {"rayalign": run_rayalign, "rayalign_full": lambda a: run_rayalign(a, "full"),
         "rayalign_labelled": lambda a: run_rayalign(a, "labelled"), "trl": run_trl,
         "trl_tuned": lambda a: run_trl(a, tuned=True)}
DEFAULT_SIDES = ["rayalign", "trl_tuned", "rayalign_full", "trl"]  # the target's sides first


def summary(results: dict) -> dict:
    with_ref = {k: v.get("pairs_per_s_with_reference") for k, v in results.items()}
    train_only = {k: (v.get("pairs_per_s") or {}).get("per_step", {}).get("median") for k, v in results.items()}
    out = {"pairs_per_s_median": with_ref, "pairs_per_s_train_steps_only": train_only,
           "peak_gib": common.peak_gib(results),
           "vs_trl_tuned": common.ratio(with_ref.get("rayalign"), with_ref.get("trl_tuned")),
           "vs_trl": common.ratio(with_ref.get("rayalign"), with_ref.get("trl")),
           "labelled_vs_full": common.ratio(with_ref.get("rayalign_labelled") or with_ref.get("rayalign"),
                                            with_ref.get("rayalign_full")),
           "target": "rayalign >= 1.5x trl_tuned (pairs/s, both sides' reference pass included)"}
    out["target_met"] = out["vs_trl_tuned"] is not None and out["vs_trl_tuned"] >= 1.5
    return out


def main(argv: list[str] | None = None) -> int:
    return common.bench_main("dpo_throughput.py", NAME, common.training_parser(__doc__, SIDES, DEFAULT_SIDES), SIDES,
                             plan, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
