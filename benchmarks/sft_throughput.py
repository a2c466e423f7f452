"""Issue 8 (a): SFT non-pad tokens/s, rayalign against TRL ``SFTTrainer`` in the same run.

    PYTHONPATH=platform:plugins python benchmarks/sft_throughput.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/sft_throughput.py --dry-run --out /tmp/bench   # CPU

Sides (each in its own process, one after the other, on the same model, data and precision):

* ``rayalign``: the SFT stage's training path — conversations tokenized by ``tokenize_conversation``,
  packed padding-free by ``rayalign_sft.stage.pack`` (position ids restart per sequence), the
  stage's ``SFTObjective`` on DeepSpeed ZeRO-2 ``TrainerWorker``s in a ``WorkerGroup``, stepped by
  ``training.loop.train_step``;
* ``rayalign_labelled``: the same with the stage option ``logits: labelled`` (the head only where a
  label follows, log-softmax in checkpointed chunks: training/labelled_logps.py);
* ``trl_default``: ``SFTTrainer`` with TRL's defaults (padded batches, gradient checkpointing on);
* ``trl_padding_free``: the same with ``padding_free=True`` (one flattened row per micro-batch).

Matched: model, examples (the same token ids and assistant-only labels), max length, bf16 compute
with fp32 master weights (DeepSpeed bf16; TRL: fp32 model under bf16 autocast), AdamW, and the
tokens per optimizer step (rayalign packs ``--micro-batch-tokens`` per row and accumulates
``--grad-accum`` rows; TRL takes ``--trl-batch`` sequences per micro-batch and as many micro-batches
as reach the same token count on average; the file records the measured tokens per step of each
side). Throughput counts every non-pad input token (prompt and answer) of a step over its wall time.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "sft_throughput"

# Per shape: (max length, rayalign tokens per packed row, rayalign rows per step, TRL sequences per micro-batch)
PLANS = {"0.5b": (2048, 16384, 2, 8), "1.5b": (2048, 8192, 4, 8), "tiny": (256, 512, 1, 4)}


def plan(args) -> dict:
    return common.training_plan(args, PLANS)


def data(args, p: dict):
    """Tokenized examples (rayalign's chat tokenization, assistant-only labels) and the model path."""
    from transformers import AutoTokenizer

    from rayalign.data.chat import tokenize_conversation

    model = common.model_dir(args.shape, args.seed)
    tok = AutoTokenizer.from_pretrained(model)
    tokens_per_step = p["micro_batch_tokens"] * p["grad_accum"] * max(1, p["gpus"])
    mean = sum(common.long_tailed_lengths(2000, args.seed, p["min_length"], p["max_length"])) / 2000
    n = math.ceil(1.25 * tokens_per_step * (p["warmup"] + p["steps"]) / mean) + 16
    records = common.chat_examples(tok, n, args.seed, p["min_length"], p["max_length"])
    return model, tok, [tokenize_conversation(tok, r["messages"], None) for r in records]


def run_rayalign(args, labelled: bool = False) -> dict:
    from rayalign_sft.loss import CrossEntropyLoss
    from rayalign_sft.stage import SFTObjective, pack

    p = plan(args)
    model, _, tokenized = data(args, p)
    batches = pack(tokenized, p["micro_batch_tokens"], args.seed)
    out = common.rayalign_train(model, batches, SFTObjective(CrossEntropyLoss(), labelled), gpus=p["gpus"],
                                grad_accum=p["grad_accum"], warmup=p["warmup"], steps=p["steps"],
                                grad_ckpt=p["grad_ckpt"])
    out["tokens_per_s"] = common.throughput(out["step_seconds"], out["step_counts"])
    out["padding_share"] = 0.0  # packed rows have no padding
    return out


def run_trl(args, padding_free: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    p = plan(args)
    model_path, tok, tokenized = data(args, p)
    mean = sum(len(t) for t in tokenized) / len(tokenized)
    tokens_per_step = p["micro_batch_tokens"] * p["grad_accum"]
    grad_accum = max(1, round(tokens_per_step / (p["trl_batch"] * mean)))
    dataset = Dataset.from_list([{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized])
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    timer = common.trl_step_timer(p["warmup"])
    counts: list[tuple[float, float]] = []

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            real = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(ids.numel())
            counts.append((float(real), float(ids.numel())))
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=p["trl_batch"],
                           gradient_accumulation_steps=grad_accum, max_steps=p["warmup"] + p["steps"],
                           # padding-free TRL refuses a max_length it cannot enforce; no example exceeds it anyway.
                           max_length=None if padding_free else p["max_length"], padding_free=padding_free,
                           bf16=on_gpu, report_to="none", save_strategy="no", seed=args.seed, use_cpu=not on_gpu)
        trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=[timer])
        trainer.train()
    seconds = timer.step_seconds()
    per_step = [counts[i * grad_accum:(i + 1) * grad_accum] for i in range(p["warmup"] + p["steps"])][p["warmup"]:]
    real = [sum(c[0] for c in s) for s in per_step]
    padded = [sum(c[1] for c in s) for s in per_step]
    return {"step_seconds": seconds, "step_counts": real, "grad_accum": grad_accum, "trl_batch": p["trl_batch"],
            "tokens_per_s": common.throughput(seconds, real), "peak_gib_per_rank": [common.torch_peak_gib()],
            "padding_share": 1 - sum(real) / sum(padded) if sum(padded) else None,
            "gradient_checkpointing": config.gradient_checkpointing}


SIDES = {"rayalign": run_rayalign, "rayalign_labelled": lambda a: run_rayalign(a, True), "trl_default": lambda a: run_trl(a, False),
         "trl_padding_free": lambda a: run_trl(a, True)}


def summarize(shape: str):
    def summary(results: dict) -> dict:
        rate = {k: (v.get("tokens_per_s") or {}).get("per_step", {}).get("median") for k, v in results.items()}
        shape_cfg = common.SHAPES.get(shape)  # None when every side failed
        trl_best = max((r for k, r in rate.items() if k.startswith("trl") and r), default=None)
        out = {
            "tokens_per_s_median": rate,
            "mfu": {k: common.mfu(shape_cfg, r) if shape_cfg else None for k, r in rate.items()},
            "peak_gib": common.peak_gib(results),
            "vs_trl_default": common.ratio(rate.get("rayalign"), rate.get("trl_default")),
            "vs_trl_best": common.ratio(rate.get("rayalign"), trl_best),
            "labelled_vs_full": common.ratio(rate.get("rayalign_labelled"), rate.get("rayalign")),
            "target": "rayalign >= 1.3x TRL default and >= 1.0x TRL best",
        }
        out["target_met"] = (out["vs_trl_default"] is not None and out["vs_trl_best"] is not None
                             and out["vs_trl_default"] >= 1.3 and out["vs_trl_best"] >= 1.0)
        return out
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = common.training_parser(__doc__, SIDES)
    ap.add_argument("--gpus", type=int, default=1, help="rayalign trainer ranks (data parallel, ZeRO-2)")
    ap.add_argument("--name", default=NAME, help="result name (file <gpu>-<date>-<name>-<shape>.json)")
    return common.bench_main("sft_throughput.py", NAME, ap, SIDES, plan, summarize_for, argv)


def summarize_for(results: dict) -> dict:
    shape = next((v["shape"] for v in results.values() if "shape" in v), None)
    return summarize(shape)(results)


if __name__ == "__main__":
    raise SystemExit(main())
