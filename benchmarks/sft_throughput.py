"""Benchmark (a): SFT non-pad tokens/s, rayalign against TRL ``SFTTrainer`` in the same run.

    PYTHONPATH=platform:plugins python benchmarks/sft_throughput.py --shape 0.5b --out $OUT
    PYTHONPATH=platform:plugins python benchmarks/sft_throughput.py --dry-run --out /tmp/bench   # CPU

Sides (each in its own process, one after the other, on the same model and data):

* ``rayalign``: the SFT stage's training path with the stage's defaults — conversations tokenized
  by ``tokenize_conversation``, packed padding-free by ``rayalign_sft.stage.pack`` (position ids
  restart per sequence), the stage's ``SFTObjective`` on DeepSpeed ZeRO-2 ``TrainerWorker``s in a
  ``WorkerGroup``, stepped by ``training.loop.train_step``. What the defaults resolved to
  (attention, logits, optimizer, precision) is in the side's ``settings_used``;
* ``rayalign_full``, ``rayalign_labelled``: the same with ``logits: full`` / ``labelled``;
* ``rayalign_liger``: the same with ``kernels: liger`` and ``logits: fused`` (GPU, liger-kernel);
  ``rayalign_liger_layers`` and ``rayalign_liger_ce`` take one of the two each, to tell which costs;
* ``rayalign_compile``: the same with ``compile: true`` (each decoder layer through torch.compile);
* ``rayalign_varlen``: the same with ``attn_implementation: rayalign_packed`` (torch's
  variable-length flash attention on the packed rows: training/packed_attention.py);
* ``torch_reference``: the fastest plain PyTorch loop measured on this kind of GPU
  (shared/gpu/sft_speed_of_light.py: packed rows, varlen flash attention, cross-entropy in checkpointed
  4096-token chunks, fused AdamW, bf16 weights without fp32 master) on the same packed rows in
  the same order; gradients clipped to 1.0 as on every other side. On CPU: sdpa and fp32;
* ``trl_default``: ``SFTTrainer`` with TRL's defaults (padded batches, gradient checkpointing on);
* ``trl_padding_free``: the same with ``padding_free=True`` (one flattened row per micro-batch);
* ``trl_tuned``: TRL's best configuration here: ``padding_free=True`` with as many sequences per
  micro-batch as fill one of rayalign's rows and rayalign's rows per step, no gradient
  checkpointing, the same varlen flash attention as rayalign on GPU (no flash-attn there), fused AdamW, and
  ``use_liger_kernel=True`` where liger-kernel is installed.

Matched: model, examples (the same token ids and assistant-only labels), max length, AdamW, and the
tokens per optimizer step (rayalign packs ``--micro-batch-tokens`` per row and accumulates
``--grad-accum`` rows; TRL takes ``--trl-batch`` sequences per micro-batch and as many micro-batches
as reach the same token count on average; the file records the measured tokens per step of each
side). Precision: bf16 compute with fp32 master weights (DeepSpeed bf16; TRL: fp32 model under bf16
autocast), except ``torch_reference`` (bf16 weights, as measured). Throughput counts every non-pad
input token (prompt and answer) of a step over its wall time. Every side reports its peak memory.
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


def run_rayalign(args, logits: str = "auto", spec_options: dict | None = None) -> dict:
    from rayalign_sft.loss import CrossEntropyLoss
    from rayalign_sft.stage import SFTObjective, pack

    p = plan(args)
    model, _, tokenized = data(args, p)
    batches = pack(tokenized, p["micro_batch_tokens"], args.seed)
    out = common.rayalign_train(model, batches, SFTObjective(CrossEntropyLoss(), logits=logits), gpus=p["gpus"],
                                grad_accum=p["grad_accum"], warmup=p["warmup"], steps=p["steps"],
                                grad_ckpt=p["grad_ckpt"], spec_options=spec_options)
    on_gpu = common.cuda_available()
    out["settings_used"]["logits"] = ("labelled" if on_gpu else "full") if logits == "auto" else logits
    out["tokens_per_s"] = common.throughput(out["step_seconds"], out["step_counts"])
    out["padding_share"] = 0.0  # packed rows have no padding
    return out


def reference_attention(model_path: str, on_gpu: bool) -> str:
    """The attention kernel the plain loop and tuned TRL run: the fastest for packed rows that this
    GPU machine has (torch's varlen flash attention, registered with transformers as
    ``rayalign_packed``; flash-attn is not installed there, and flex_attention compiles per row
    shape). Every side thus runs the same kernel and the comparison
    measures the rest of the step. On CPU: sdpa."""
    from rayalign.training.attention import resolve_attention

    return resolve_attention("auto", "cuda" if on_gpu else "cpu", model_path)


REFERENCE_CE_CHUNK = 4096  # tokens per checkpointed cross-entropy chunk, as in the measured plain loop


def run_torch_reference(args) -> dict:
    """The plain loop (module docstring) on the rows ``rayalign`` trains, in the same order."""
    import time

    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    from transformers import AutoModelForCausalLM

    from rayalign.training.losses import IGNORE_INDEX
    from rayalign_sft.stage import pack

    p = plan(args)
    model_path, _, tokenized = data(args, p)
    batches = pack(tokenized, p["micro_batch_tokens"], args.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    attn = reference_attention(model_path, on_gpu)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn).to(device)
    model.config.use_cache = False
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if on_gpu else {}))
    head = model.get_output_embeddings().weight
    ga, total = p["grad_accum"] * max(1, p["gpus"]), p["warmup"] + p["steps"]
    if len(batches) < ga * total:
        raise ValueError(f"{len(batches)} packed rows for {total} steps of {ga}: make more examples")

    def chunk_nll(hidden, targets):
        return F.cross_entropy((hidden @ head.t()).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def row_nll(row):
        ids, pos = row["input_ids"].to(device), row["position_ids"].to(device)
        targets = row["labels"][0, 1:].to(device)
        hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0, :-1]
        return sum(checkpoint(chunk_nll, hidden[s:s + REFERENCE_CE_CHUNK], targets[s:s + REFERENCE_CE_CHUNK],
                              use_reentrant=False) for s in range(0, hidden.shape[0], REFERENCE_CE_CHUNK))

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    seconds, counted, losses = [], [], []
    for step in range(total):
        if step == p["warmup"] and on_gpu:
            torch.cuda.reset_peak_memory_stats()
        rows = batches[step * ga:(step + 1) * ga]
        trained = sum(int((r["labels"][:, 1:] != IGNORE_INDEX).sum()) for r in rows)  # on the host
        sync()
        started = time.perf_counter()
        step_loss = 0.0
        for row in rows:
            loss = row_nll(row) / max(1, trained)  # one token-level mean over the step, as every side
            loss.backward()
            step_loss = step_loss + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= p["warmup"]:
            seconds.append(time.perf_counter() - started)
            counted.append(float(sum(r["input_ids"].numel() for r in rows)))
        losses.append(float(step_loss))
    return {"step_seconds": seconds, "step_counts": counted, "losses": losses, "grad_accum": ga,
            "tokens_per_s": common.throughput(seconds, counted), "peak_gib_per_rank": [common.torch_peak_gib()],
            "padding_share": 0.0, "trainable_params": sum(q.numel() for q in params),
            "settings_used": {"attn_implementation": attn, "precision": str(dtype).replace("torch.", ""),
                              "optimizer": "torch AdamW" + (", fused" if on_gpu else ""),
                              "cross_entropy": f"checkpointed chunks of {REFERENCE_CE_CHUNK} tokens",
                              "max_grad_norm": 1.0}}


def run_trl(args, padding_free: bool, tuned: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    p = plan(args)
    model_path, tok, tokenized = data(args, p)
    mean = sum(len(t) for t in tokenized) / len(tokenized)
    tokens_per_step = p["micro_batch_tokens"] * p["grad_accum"]
    on_gpu = torch.cuda.is_available()
    if tuned:
        # One flattened micro-batch holds about as many tokens as one of rayalign's packed rows.
        batch, grad_accum = max(1, round(p["micro_batch_tokens"] / mean)), p["grad_accum"]
        attn = reference_attention(model_path, on_gpu)  # padding-free rows need per-sequence attention, not a dense mask
        tuned_options = {"gradient_checkpointing": False, "use_liger_kernel": on_gpu and common.liger_importable()}
    else:
        batch = p["trl_batch"]
        grad_accum = max(1, round(tokens_per_step / (batch * mean)))
        attn, tuned_options = "sdpa", {}
    dataset = Dataset.from_list([{"input_ids": t.input_ids.tolist(), "labels": t.labels.tolist()} for t in tokenized])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn)
    timer = common.trl_step_timer(p["warmup"])
    counts: list[tuple[float, float]] = []

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            real = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(ids.numel())
            counts.append((float(real), float(ids.numel())))
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=grad_accum, max_steps=p["warmup"] + p["steps"],
                           # padding-free TRL refuses a max_length it cannot enforce; no example exceeds it anyway.
                           max_length=None if padding_free else p["max_length"], padding_free=padding_free,
                           bf16=on_gpu, report_to="none", save_strategy="no", seed=args.seed, use_cpu=not on_gpu,
                           **tuned_options)
        trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=[timer])
        trainer.train()
    seconds = timer.step_seconds()
    per_step = [counts[i * grad_accum:(i + 1) * grad_accum] for i in range(p["warmup"] + p["steps"])][p["warmup"]:]
    real = [sum(c[0] for c in s) for s in per_step]
    padded = [sum(c[1] for c in s) for s in per_step]
    return {"step_seconds": seconds, "step_counts": real, "grad_accum": grad_accum, "trl_batch": batch,
            "tokens_per_s": common.throughput(seconds, real), "peak_gib_per_rank": [common.torch_peak_gib()],
            "padding_share": 1 - sum(real) / sum(padded) if sum(padded) else None,
            "gradient_checkpointing": config.gradient_checkpointing,
            "settings_used": {"attn_implementation": attn, "padding_free": padding_free,
                              "use_liger_kernel": bool(config.use_liger_kernel),
                              "optim": str(getattr(config.optim, "value", config.optim)),
                              "precision": "fp32 weights under bf16 autocast" if on_gpu else "fp32",
                              "per_device_train_batch_size": batch, "gradient_accumulation_steps": grad_accum}}


SIDES = {
    "rayalign": run_rayalign,
    "rayalign_full": lambda a: run_rayalign(a, "full"),
    "rayalign_labelled": lambda a: run_rayalign(a, "labelled"),
    "rayalign_liger": lambda a: run_rayalign(a, "fused", {"kernels": "liger"}),
    "rayalign_liger_layers": lambda a: run_rayalign(a, "auto", {"kernels": "liger"}),
    "rayalign_liger_ce": lambda a: run_rayalign(a, "fused"),
    "rayalign_compile": lambda a: run_rayalign(a, "auto", {"compile": True}),
    "rayalign_varlen": lambda a: run_rayalign(a, "auto", {"attn_implementation": "rayalign_packed"}),
    "torch_reference": run_torch_reference,
    "trl_default": lambda a: run_trl(a, False),
    "trl_padding_free": lambda a: run_trl(a, True),
    "trl_tuned": lambda a: run_trl(a, True, tuned=True),
}


def default_sides() -> list[str]:
    """What one run measures unless ``--sides`` says otherwise (60-90 s a side at 0.5B on an H200),
    the targets' sides first, as a run cut off by the machine's time limit keeps the sides that
    finished: the stage defaults, the plain loop, tuned TRL, Liger where it is installed, what
    ``logits: labelled`` buys over full, and TRL's defaults for continuity."""
    sides = ["rayalign", "torch_reference", "trl_tuned", "rayalign_full", "trl_default"]
    if common.cuda_available() and common.liger_importable():
        sides.insert(3, "rayalign_liger")
    return sides


def summarize(shape: str):
    def summary(results: dict) -> dict:
        rate = {k: (v.get("tokens_per_s") or {}).get("per_step", {}).get("median") for k, v in results.items()}
        shape_cfg = common.SHAPES.get(shape)  # None when every side failed
        trl_best = max((r for k, r in rate.items() if k.startswith("trl") and r), default=None)
        peaks = common.peak_gib(results)
        out = {
            "tokens_per_s_median": rate,
            "mfu": {k: common.mfu(shape_cfg, r) if shape_cfg else None for k, r in rate.items()},
            "peak_gib": peaks,
            "vs_torch_reference": common.ratio(rate.get("rayalign"), rate.get("torch_reference")),
            "peak_vs_torch_reference": common.ratio(peaks.get("rayalign"), peaks.get("torch_reference")),
            "vs_trl_tuned": common.ratio(rate.get("rayalign"), rate.get("trl_tuned")),
            "vs_trl_default": common.ratio(rate.get("rayalign"), rate.get("trl_default")),
            "vs_trl_best": common.ratio(rate.get("rayalign"), trl_best),
            "labelled_vs_full": common.ratio(rate.get("rayalign_labelled") or rate.get("rayalign"),
                                             rate.get("rayalign_full")),
            "liger_vs_default": common.ratio(rate.get("rayalign_liger"), rate.get("rayalign")),
            "target": "rayalign >= 1.0x torch_reference (at no more peak memory) and >= 1.3x trl_tuned",
        }
        ratios = (out["vs_torch_reference"], out["peak_vs_torch_reference"], out["vs_trl_tuned"])
        out["target_met"] = (None not in ratios and ratios[0] >= 1.0 and ratios[1] <= 1.0 and ratios[2] >= 1.3)
        return out
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = common.training_parser(__doc__, SIDES, default_sides())
    ap.add_argument("--gpus", type=int, default=1, help="rayalign trainer ranks (data parallel, ZeRO-2)")
    ap.add_argument("--name", default=NAME, help="result name (file <gpu>-<date>-<name>-<shape>.json)")
    return common.bench_main("sft_throughput.py", NAME, ap, SIDES, plan, summarize_for, argv)


def summarize_for(results: dict) -> dict:
    shape = next((v["shape"] for v in results.values() if "shape" in v), None)
    return summarize(shape)(results)


if __name__ == "__main__":
    raise SystemExit(main())
