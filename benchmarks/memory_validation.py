"""Check the memory planner (``rayalign.memory``) against measured peak memory of real training steps.

Builds Qwen2-0.5B-shaped (and with ``--sizes 0.5b,1.5b`` also 1.5B-shaped) models locally with
random weights (a transformers config, nothing downloaded), runs real training steps for several
configurations and compares ``torch.cuda.max_memory_allocated`` with the estimate. Writes
``$OUT/memory_validation.json`` (or ``--out``) and prints a table.

The training step reproduces the memory layout of rayalign's trainer (DeepSpeed, bf16): bf16
weights the model computes with, fp32 master weights, fp32 gradients, torch AdamW's fp32 moments,
and rayalign's SFT loss on packed rows. Needs torch, transformers and peft only (no Ray). Without DeepSpeed installed this is
done by hand (``layout: manual``); with it, ``--deepspeed`` adds ZeRO-2 on one GPU through
DeepSpeed itself.

    PYTHONPATH=platform:plugins python benchmarks/memory_validation.py            # on a GPU machine
    PYTHONPATH=platform:plugins python benchmarks/memory_validation.py --dry-run  # estimates only (CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rayalign.memory import GiB, ModelShape, TrainingPlan, estimate

# Shapes of the public Qwen2 configs (config.json of Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B).
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # For the CPU test of this script only.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class Case:
    name: str
    size: str
    method: str  # full | lora
    seq: int
    micro_batch: int
    grad_ckpt: bool
    layout: str = "manual"  # manual | deepspeed

    def plan(self) -> TrainingPlan:
        return TrainingPlan(method=self.method, zero=0 if self.layout == "manual" else 2, gpus=1, seq=self.seq,
                            micro_batch=self.micro_batch, grad_ckpt=self.grad_ckpt, lora_r=16)


def cases(sizes: list[str], deepspeed: bool) -> list[Case]:
    out = []
    for size in sizes:
        out += [
            Case(f"{size} full", size, "full", 2048, 2, False),
            Case(f"{size} full grad-ckpt", size, "full", 2048, 8, True),
            Case(f"{size} lora", size, "lora", 2048, 2, False),
            Case(f"{size} lora grad-ckpt", size, "lora", 2048, 8, True),
        ]
        if deepspeed:
            out.append(Case(f"{size} full ZeRO-2 (DeepSpeed)", size, "full", 2048, 2, False, layout="deepspeed"))
    return out


def qwen2_config(size: str) -> dict:
    return {"model_type": "qwen2", "max_position_embeddings": 32768, **SHAPES[size]}


def estimate_case(case: Case) -> dict:
    est = estimate(ModelShape.from_config(qwen2_config(case.size)), case.plan())
    # max_memory_allocated sees tensors only: compare without the CUDA context reserve.
    return {"estimate_gib": est.training_peak / GiB, "parts_gib": {k: v / GiB for k, v in est.parts.items()}}


def sft_loss(logits, labels):
    """rayalign's SFT loss (``rayalign_sft.loss.CrossEntropyLoss``; a test keeps them equal), importable
    where Ray is not installed: the plugin package imports its stage, which needs Ray."""
    import torch.nn.functional as F

    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets, ignore_index=-100,
                            reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def build_model(case: Case, device, dtype=None, shape: dict | None = None):
    """bf16 on CUDA (fp32 on CPU unless ``dtype``); LoRA adapters in the same dtype, as DeepSpeed's
    bf16 mode casts them (its fp32 masters live in the optimizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = Qwen2Config(**(shape or SHAPES[case.size]), attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    if case.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(case.plan().lora_targets),
                                                 task_type="CAUSAL_LM")).to(dtype)
        if case.grad_ckpt:
            model.enable_input_require_grads()
    return model


def saved_activation_bytes(shape: dict, method: str = "full", tokens: int = 256) -> tuple[float, float]:
    """(per layer, outside the layers) bytes per token that autograd saves for backward, bf16, on CPU.

    Counted with saved-tensor hooks (each storage once, parameters excluded) on 1- and 2-layer
    models of ``shape``: what the planner's activation coefficients were fitted to.
    """
    import torch

    def saved(layers: int) -> float:
        case = Case("probe", "probe", method, tokens, 1, False)
        model = build_model(case, torch.device("cpu"), torch.bfloat16, {**shape, "num_hidden_layers": layers})
        params = {p.data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, shape["vocab_size"], (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False)
        return sum(storages.values()) / tokens

    one, two = saved(1), saved(2)
    return two - one, one - (two - one)


def packed_batch(case: Case, vocab: int, device):
    """``micro_batch`` sequences of ``seq`` tokens packed in one row, as rayalign's packing does."""
    import torch

    tokens = case.seq * case.micro_batch
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    positions = torch.arange(case.seq, device=device).repeat(case.micro_batch)[None]
    return ids, positions


class ManualMixedPrecision:
    """bf16 weights for compute, fp32 master weights and gradients, AdamW on the masters (DeepSpeed's layout)."""

    def __init__(self, model, lr: float = 1e-5):
        import torch

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)  # DeepSpeed keeps the fp32 gradient buffer allocated
        self.optimizer = torch.optim.AdamW(self.master, lr=lr)

    def step(self):
        import torch

        for p, m in zip(self.params, self.master):
            m.grad.copy_(p.grad)
            p.grad = None
        torch.nn.utils.clip_grad_norm_(self.master, 1.0)
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)


def deepspeed_engine(model):
    import deepspeed
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl")
    params = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model.float(), optimizer=torch.optim.AdamW(params, lr=1e-5),
                                      config=config, dist_init_required=False)
    return engine


def loss_peak_bytes(tokens: int = 512, vocab: int = 20000, hidden: int = 64) -> float:
    """Peak bytes per token x vocab entry of lm_head + rayalign's SFT loss, forward and backward, bf16 on CPU.

    Measured with the torch profiler's memory records (allocations and frees in time order): what
    the planner's ``LOGITS_BYTES`` was set from.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    states = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens))

    def step():
        loss = sft_loss(head(states), labels)
        loss.backward()

    step()  # warm up: lazily created buffers are not the loss's
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak / (tokens * vocab)


def run_case(case: Case, device, steps: int = 3) -> dict:
    """Real training steps; on CUDA the peak allocated memory over them."""
    import torch

    model = build_model(case, device)
    ids, positions = packed_batch(case, model.config.vocab_size, device)
    engine = deepspeed_engine(model) if case.layout == "deepspeed" else None
    trainer = None if engine else ManualMixedPrecision(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started, losses = time.time(), []
    for _ in range(steps):
        target = engine or model
        logits = target(input_ids=ids, position_ids=positions, use_cache=False).logits
        loss = sft_loss(logits, ids)
        del logits
        if engine:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            trainer.step()
        losses.append(loss.item())
    out = {"losses": losses, "seconds": round(time.time() - started, 2)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["measured_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    del model, trainer, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def compare(row: dict) -> dict:
    """Relative error of the estimate against the measurement; within 15% passes.

    ``implied_logits_bytes``: the loss term's bytes per token x vocab entry that would make the
    estimate exact, everything else as modelled (to recalibrate ``LOGITS_BYTES`` from a GPU run).
    """
    if "measured_gib" not in row:
        return row
    error = (row["estimate_gib"] - row["measured_gib"]) / row["measured_gib"]
    out = {**row, "error": error, "within_15pct": abs(error) <= 0.15}
    if "parts_gib" in row and row.get("size") in SHAPES:
        others = row["estimate_gib"] - row["parts_gib"]["logits and loss"]
        tokens_vocab = row["seq"] * row["micro_batch"] * SHAPES[row["size"]]["vocab_size"]
        out["implied_logits_bytes"] = (row["measured_gib"] - others) * GiB / tokens_vocab
    return out


def table(rows: list[dict]) -> str:
    lines = ["| configuration | tokens/micro-batch | estimate GiB | measured GiB | error |", "|---|---|---|---|---|"]
    for r in rows:
        measured = f"{r['measured_gib']:.2f}" if "measured_gib" in r else "-"
        error = f"{100 * r['error']:+.1f}%" if "error" in r else "-"
        lines.append(f"| {r['name']} | {r['seq'] * r['micro_batch']} | {r['estimate_gib']:.2f} | {measured} | {error} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5b", help="comma-separated: 0.5b, 1.5b")
    parser.add_argument("--deepspeed", action="store_true", help="also measure ZeRO-2 through DeepSpeed (installed)")
    parser.add_argument("--dry-run", action="store_true", help="estimates only, no model is built")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for memory_validation.json")
    args = parser.parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    rows = []
    for case in cases(args.sizes.split(","), args.deepspeed):
        row = {**asdict(case), **estimate_case(case)}
        if not args.dry_run:
            try:
                row.update(run_case(case, device, args.steps))
            except torch.cuda.OutOfMemoryError as exc:
                row["error_message"] = f"out of memory: {exc}".splitlines()[0]
                torch.cuda.empty_cache()
        rows.append(compare(row))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "memory_validation.json"
    path.write_text(json.dumps(result, indent=2))
    print(table(rows))
    print(f"wrote {path}")
    measured = [r for r in rows if "error" in r]
    return 0 if all(r["within_15pct"] for r in measured) else 1


if __name__ == "__main__":
    raise SystemExit(main())
