"""The memory planner (``rayalign.memory``) against the real trainer's peaks, out of sample.

Each configuration of ``MATRIX`` runs real optimizer steps through rayalign's ``TrainerWorker`` as
the training stages run it (a ``WorkerGroup`` of one DeepSpeed rank, bf16, the SFT stage's
``SFTObjective`` on packed rows of ``--tokens`` tokens), on a Qwen2-0.5B or 1.5B-shaped model with
random weights built locally (``common.model_dir``: nothing downloaded). Every configuration gets a
fresh trainer actor in one Ray cluster: a DeepSpeed engine does not give all its memory back, so a
reused actor would measure its predecessor too. The trainer reports its peaks over setup and over
the steps: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` and the device's used
memory (``Worker.memory_peaks``).

Every configuration is either ``fit`` or ``held_out`` (fixed in ``MATRIX``, recorded in the file).
The planner's free constants (``rayalign.memory.Calibration``: activation scale, CUDA loss bytes
per logit entry, CUDA reserve) are least-squares fitted on the ``fit`` rows only, minimising
relative error; the ``held_out`` rows are then reported with the fitted constants and with those
in ``memory.py`` (``CALIBRATION``). The primary comparison is the estimate's training total
against the peak allocated bytes (what the accounting models); the secondary one is the
estimate's peak (with the CUDA reserve) against the device's used memory. The target: every
held-out row within 15% with the fitted constants. The fitted constants are printed as the line
to paste into memory.py.

Rows are packed from 2048-token sequences of random token ids, each token labelled (the planner
plans for every position being trained). QLoRA rows need bitsandbytes on a GPU; where it is
missing they are recorded as skipped with the reason.

    python benchmarks/memory_validation.py --out $OUT          # the GPU run (about 8 minutes on an H200)
    python benchmarks/memory_validation.py --dry-run           # the plan and estimates only (CPU, no Ray)
    python benchmarks/memory_validation.py --smoke --out /tmp  # tiny shape through the same trainer on CPU

The CPU probes the planner's activation and CPU loss coefficients came from are here too
(``saved_activation_bytes``, ``loss_peak_bytes``; tests/test_memory.py keeps the planner to them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rayalign.memory import CALIBRATION, Calibration, GiB, ModelShape, TrainingPlan, estimate

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # common (imported where the trainer runs), beside this file
    sys.path.insert(0, str(BENCH))

# Shapes of the public Qwen2 configs (config.json of Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B).
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # For the CPU probes' tests only (the smoke run uses common.model_dir's tiny model).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}

LORA_R, LORA_ALPHA = 16, 32  # on the trainer's default targets (q, k, v, o), as the planner's plan
SEQUENCE_TOKENS = 2048  # each packed row holds tokens / 2048 sequences
TARGET = 0.15


@dataclass(frozen=True)
class Case:
    size: str
    method: str  # full | lora | qlora
    zero: int
    grad_ckpt: bool
    logits: str  # full | labelled
    split: str  # fit | held_out

    @property
    def name(self) -> str:
        return (f"{self.size} {self.method} ZeRO-{self.zero}{' ckpt' if self.grad_ckpt else ''}"
                f"{' labelled' if self.logits == 'labelled' else ''}")

    def plan(self, tokens: int) -> TrainingPlan:
        return TrainingPlan(method=self.method, zero=self.zero, gpus=1, seq=tokens, micro_batch=1,
                            grad_ckpt=self.grad_ckpt, lora_r=LORA_R, logits=self.logits, labelled_loss="nll")


def _case(split: str, size: str, method: str, zero: int, ckpt: str, logits: str) -> Case:
    return Case(size, method, zero, ckpt == "ckpt", logits, split)


# Fixed, so a rerun splits the same way. Both sizes, full/LoRA/QLoRA, ZeRO-2/3, checkpointing on and
# off and labelled logits are on both sides; QLoRA only under ZeRO-2 (ZeRO-3 cannot shard 4-bit weights).
MATRIX = [
    _case("fit", "0.5b", "full", 2, "-", "full"),
    _case("fit", "0.5b", "full", 2, "ckpt", "full"),
    _case("fit", "0.5b", "lora", 2, "-", "full"),
    _case("fit", "0.5b", "full", 3, "ckpt", "labelled"),
    _case("fit", "0.5b", "qlora", 2, "-", "full"),
    _case("fit", "1.5b", "full", 2, "-", "labelled"),
    _case("fit", "1.5b", "lora", 3, "ckpt", "full"),
    _case("fit", "1.5b", "full", 3, "-", "full"),
    _case("held_out", "0.5b", "full", 3, "-", "full"),
    _case("held_out", "0.5b", "full", 2, "-", "labelled"),
    _case("held_out", "0.5b", "lora", 2, "ckpt", "labelled"),
    _case("held_out", "0.5b", "lora", 3, "-", "full"),
    _case("held_out", "1.5b", "full", 2, "ckpt", "full"),
    _case("held_out", "1.5b", "lora", 2, "-", "full"),
    _case("held_out", "1.5b", "full", 3, "ckpt", "labelled"),
    _case("held_out", "1.5b", "qlora", 2, "ckpt", "labelled"),
]

# The CPU smoke run: the tiny model through the same trainer, one row of each kind of code path.
SMOKE = [
    Case("tiny", "full", 2, False, "full", "fit"),
    Case("tiny", "lora", 3, True, "labelled", "fit"),
    Case("tiny", "full", 3, False, "labelled", "held_out"),
    Case("tiny", "qlora", 2, False, "full", "held_out"),
]


def select(cases: list[Case], only: str | None, split: str | None) -> list[Case]:
    """``only``: names separated by commas (``--only "0.5b full ZeRO-3,1.5b lora ZeRO-2"``)."""
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {c.name for c in cases}]
        if unknown:
            raise SystemExit(f"memory_validation.py: --only: unknown {unknown}; known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in names]
    return [c for c in cases if split is None or c.split == split]


# -- the estimate, by part and as a function of the calibration -----------------------------------

def estimate_terms(shape: ModelShape, plan: TrainingPlan) -> dict:
    """What the planner's training total is made of, linear in the calibration's constants:
    ``total = max(fixed + activation_scale * activations + logits_bytes * logits_per_byte + logits_fixed, step)``."""
    unit = estimate(shape, plan, Calibration(activation_scale=1.0, logits_bytes=1.0, cuda_reserve_gib=0.0))
    zero = estimate(shape, plan, Calibration(activation_scale=0.0, logits_bytes=0.0, cuda_reserve_gib=0.0))
    fixed = sum(v for k, v in unit.parts.items() if k not in ("activations", "logits and loss"))
    logits_fixed = zero.parts["logits and loss"]
    return {"fixed": fixed, "activations": unit.parts["activations"],
            "logits_per_byte": unit.parts["logits and loss"] - logits_fixed, "logits_fixed": logits_fixed,
            "step": fixed + unit.step_temporaries}


def predicted_allocated(terms: dict, cal: Calibration) -> float:
    forward_backward = (terms["fixed"] + cal.activation_scale * terms["activations"]
                        + cal.logits_bytes * terms["logits_per_byte"] + terms["logits_fixed"])
    return max(forward_backward, terms["step"])


def estimate_case(shape: ModelShape, case: Case, tokens: int, cal: Calibration) -> dict:
    est = estimate(shape, case.plan(tokens), cal)
    return {"training_total_gib": est.training_peak / GiB, "peak_gib": est.peak / GiB,
            "parts_gib": {k: v / GiB for k, v in est.parts.items()}}


# -- the fit --------------------------------------------------------------------------------------

def fit_calibration(rows: list[dict], start: Calibration = CALIBRATION) -> Calibration | None:
    """Least squares on relative error over ``rows`` (each with ``terms`` and ``measured``).

    activation_scale and logits_bytes from the allocated peaks: each row's estimate is the larger of
    its forward/backward total (linear in both) and its optimizer-step total (free of both), so the
    rows on the forward/backward side are fitted, the sides re-decided, until they settle.
    cuda_reserve_gib from the device's used peaks, given those two. None with fewer than two rows.
    """
    import numpy as np

    usable = [r for r in rows if r.get("measured", {}).get("allocated_gib")]
    if len(usable) < 2:
        return None
    cal, active = start, usable
    for _ in range(20):
        y = np.array([r["measured"]["allocated_gib"] * GiB for r in active])
        a = np.array([[r["terms"]["activations"], r["terms"]["logits_per_byte"]] for r in active]) / y[:, None]
        b = (y - np.array([r["terms"]["fixed"] + r["terms"]["logits_fixed"] for r in active])) / y
        (scale, logits_bytes), *_ = np.linalg.lstsq(a, b, rcond=None)
        cal = replace(cal, activation_scale=float(scale), logits_bytes=float(logits_bytes))
        now = [r for r in usable if predicted_allocated(r["terms"], cal) > r["terms"]["step"]]
        if len(now) < 2 or now == active:
            break
        active = now
    device = [r for r in usable if r["measured"].get("device_used_gib")]
    if device:
        d = np.array([r["measured"]["device_used_gib"] for r in device])
        p = np.array([predicted_allocated(r["terms"], cal) / GiB for r in device])
        # argmin over c of sum(((p + c - d) / d)^2)
        cal = replace(cal, cuda_reserve_gib=float(np.sum((d - p) / d**2) / np.sum(1 / d**2)))
    return cal


def errors(row: dict, cal: Calibration) -> dict:
    """The estimate with ``cal`` against the measurement: training total vs allocated, peak vs device used."""
    m = row["measured"]
    total = predicted_allocated(row["terms"], cal) / GiB
    out = {"training_total_gib": total, "allocated_error": (total - m["allocated_gib"]) / m["allocated_gib"]}
    if m.get("device_used_gib"):
        peak = total + cal.cuda_reserve_gib
        out.update(peak_gib=peak, device_error=(peak - m["device_used_gib"]) / m["device_used_gib"])
    return out


def summarize(rows: list[dict], fitted: Calibration | None) -> dict:
    measured = [r for r in rows if r.get("measured", {}).get("allocated_gib")]
    out: dict = {"current": asdict(CALIBRATION), "fitted": asdict(fitted) if fitted else None,
                 "target": f"every held-out row's training total within {TARGET:.0%} of the allocated peak "
                           "with the constants fitted on the fit rows"}
    for r in measured:
        r["with_current"] = errors(r, CALIBRATION)
        if fitted:
            r["with_fitted"] = errors(r, fitted)
    for split in ("fit", "held_out"):
        for which in ("current", "fitted"):
            errs = [r[f"with_{which}"] for r in measured if r["split"] == split and f"with_{which}" in r]
            for kind in ("allocated", "device"):
                values = [e[f"{kind}_error"] for e in errs if f"{kind}_error" in e]
                out[f"{split}_{kind}_max_abs_error_{which}"] = max(map(abs, values)) if values else None
    held = [r for r in measured if r["split"] == "held_out"]
    out["held_out_measured"] = len(held)
    out["skipped"] = {r["name"]: r["skipped"] for r in rows if "skipped" in r}
    # None where nothing held out was measured (CPU, a subset without held-out rows).
    out["target_met"] = (all(abs(r["with_fitted"]["allocated_error"]) <= TARGET for r in held)
                         if held and fitted else None)
    return out


def calibration_line(cal: Calibration) -> str:
    return (f"CALIBRATION = Calibration(activation_scale={cal.activation_scale:.3f}, "
            f"logits_bytes={cal.logits_bytes:.2f}, cuda_reserve_gib={cal.cuda_reserve_gib:.2f})")


# -- running a configuration through the trainer --------------------------------------------------

def packed_rows(tokens: int, vocab: int, count: int, seed: int) -> list[dict]:
    """``count`` packed rows of exactly ``tokens`` tokens: sequences of ``SEQUENCE_TOKENS`` random ids,
    every token labelled (``collate_packed`` unlabels each sequence's first)."""
    import numpy as np

    from rayalign.data.chat import Tokenized
    from rayalign.data.packing import collate_packed

    rng = np.random.default_rng(seed)
    length = min(SEQUENCE_TOKENS, tokens)
    rows = []
    for _ in range(count):
        lengths = [length] * (tokens // length) + ([tokens % length] if tokens % length else [])
        seqs = [rng.integers(10, vocab, n, dtype=np.int32) for n in lengths]
        rows.append(collate_packed([Tokenized(s, s.copy()) for s in seqs]))
    return rows


def why_skipped(case: Case, on_gpu: bool) -> str | None:
    if case.method != "qlora":
        return None
    if not on_gpu:
        return "QLoRA needs a GPU (workers/quantization.py)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed on this machine; QLoRA's 4-bit base needs it"
    return None


def measure(case: Case, model_path: str, tokens: int, steps: int, vocab: int, seed: int) -> dict:
    """Real optimizer steps of ``case`` through a fresh ``TrainerWorker``; its peaks in GiB (GPU)."""
    import common
    from rayalign.workers.trainer import LoraSpec
    from rayalign_sft.loss import CrossEntropyLoss
    from rayalign_sft.stage import SFTObjective

    options: dict = {"zero_stage": case.zero}
    if case.method in ("lora", "qlora"):
        options[case.method] = LoraSpec(r=LORA_R, alpha=LORA_ALPHA)
    batches = packed_rows(tokens, vocab, steps, seed)
    started = time.monotonic()
    out = common.rayalign_train(model_path, batches, SFTObjective(CrossEntropyLoss(), logits=case.logits), gpus=1,
                                grad_accum=1, warmup=0, steps=steps, grad_ckpt=case.grad_ckpt, spec_options=options)
    run = {"seconds": time.monotonic() - started, "losses": out["losses"], "trainable_params": out["trainable_params"],
           "memory_peaks_bytes": out["memory_peaks"], "settings_used": out["settings_used"]}
    setup, stepped = out["memory_peaks"]["setup"][0], out["memory_peaks"]["steps"][0]
    if stepped:  # CUDA: the trainer's peak over everything it ran (setup and steps)
        run["measured"] = {f"{k}_gib": max(setup.get(k, 0.0), stepped[k]) / GiB for k in stepped}
        run["measured"]["steps_allocated_gib"] = stepped["allocated"] / GiB
        run["measured"]["setup_allocated_gib"] = setup.get("allocated", 0.0) / GiB
    return run


def run_matrix(cases: list[Case], args, smoke: bool) -> tuple[list[dict], dict]:
    import common

    on_gpu = common.cuda_available()
    common.start_ray(1 if on_gpu else None)
    rows, paths, path = [], {}, None
    settings = {"tokens_per_micro_batch": args.tokens, "sequence_tokens": SEQUENCE_TOKENS, "steps": args.steps,
                "lora": {"r": LORA_R, "alpha": LORA_ALPHA}, "objective": "SFTObjective(CrossEntropyLoss)",
                "smoke": smoke, "split": {c.name: c.split for c in cases}}
    for k, case in enumerate(cases):
        size = "tiny" if smoke else case.size
        if size not in paths:
            paths[size] = common.model_dir(size, args.seed)
        shape = ModelShape.from_dir(paths[size])
        row = {"name": case.name, **asdict(case), "tokens": args.tokens,
               "terms": estimate_terms(shape, case.plan(args.tokens)),
               "estimate_current": estimate_case(shape, case, args.tokens, CALIBRATION)}
        reason = why_skipped(case, on_gpu)
        if reason:
            row["skipped"] = reason
        else:
            try:
                row.update(measure(case, paths[size], args.tokens, args.steps, shape.vocab, args.seed))
            except Exception as exc:  # an OOM or a crash is a result too; the other rows still run
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        rows.append(row)
        fitted = fit_calibration([r for r in rows if r["split"] == "fit"])
        summary = summarize(rows, fitted)
        print(line(row), flush=True)
        path = common.write_result(args.out, args.name, {
            "benchmark": "memory_validation", "settings": settings, "complete": k == len(cases) - 1,
            "rows": rows, "summary": summary})
    return rows, {"summary": summary, "path": path}


def line(row: dict) -> str:
    m = row.get("measured", {})
    cur = row.get("with_current", {})
    fit = row.get("with_fitted", {})
    status = row.get("skipped") or row.get("error") or ""
    pct = lambda e: f"{100 * e:+.1f}%" if e is not None else "-"  # noqa: E731
    return (f"{row['split']:<9}{row['name']:<34}{row['estimate_current']['training_total_gib']:>9.2f}"
            f"{m.get('allocated_gib', float('nan')):>10.2f}{pct(cur.get('allocated_error')):>9}"
            f"{pct(fit.get('allocated_error')):>9}{m.get('device_used_gib', float('nan')):>10.2f}"
            f"{pct(fit.get('device_error')):>9}  {status}")


HEADER = (f"{'split':<9}{'configuration':<34}{'est GiB':>9}{'alloc GiB':>10}{'err now':>9}{'err fit':>9}"
          f"{'dev GiB':>10}{'dev err':>9}")


def dry_run(cases: list[Case], tokens: int) -> None:
    print(f"{len(cases)} configurations, {tokens} tokens per micro-batch; constants now: {calibration_line(CALIBRATION)}")
    print(f"{'split':<9}{'configuration':<34}{'training GiB':>13}{'peak GiB':>10}  parts GiB")
    for case in cases:
        est = estimate_case(ModelShape.from_config({"model_type": "qwen2", **SHAPES[case.size]}), case, tokens,
                            CALIBRATION)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in est["parts_gib"].items())
        print(f"{case.split:<9}{case.name:<34}{est['training_total_gib']:>13.2f}{est['peak_gib']:>10.2f}  {parts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimates; run nothing")
    parser.add_argument("--smoke", action="store_true", help="the tiny model through the same trainer (CPU works)")
    parser.add_argument("--only", help="configuration names, comma-separated (as --dry-run prints them)")
    parser.add_argument("--split", choices=["fit", "held_out"], help="only the rows of one side of the split")
    parser.add_argument("--tokens", type=int, help="tokens per packed row (micro-batch); default 8192, smoke 256")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--name", help="result name (default memory_validation-heldout; -subset with --only/--split)")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (256 if args.smoke else 8192)
    cases = select(SMOKE if args.smoke else MATRIX, args.only, args.split)
    if args.dry_run:
        dry_run(cases, args.tokens)
        return 0
    partial = bool(args.only or args.split)
    args.name = args.name or ("memory_validation-smoke" if args.smoke else
                              "memory_validation-subset" if partial else "memory_validation-heldout")
    started = time.monotonic()
    print(HEADER, flush=True)
    rows, result = run_matrix(cases, args, args.smoke)
    summary = result["summary"]
    print(HEADER)
    for row in rows:
        print(line(row))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("current", "fitted")}, indent=1, default=float))
    if summary["fitted"]:
        print(f"fitted on {sum(r['split'] == 'fit' and 'measured' in r for r in rows)} rows: "
              f"{calibration_line(Calibration(**summary['fitted']))}")
        print(f"in memory.py now:   {calibration_line(CALIBRATION)}")
    print(f"{result['path']} in {time.monotonic() - started:.0f}s")
    failed = [r["name"] for r in rows if "error" in r]
    return 1 if failed else 0


# -- CPU probes: what the activation and CPU loss coefficients were fitted to ---------------------

def sft_loss(logits, labels):
    """rayalign's SFT loss (``rayalign_sft.loss.CrossEntropyLoss``; a test keeps them equal), importable
    where Ray is not installed: the plugin package imports its stage, which needs Ray."""
    import torch.nn.functional as F

    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets, ignore_index=-100,
                            reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def probe_model(shape: dict, method: str, layers: int):
    """A bf16 Qwen2 of ``shape`` with ``layers`` layers on CPU, with LoRA adapters for ``lora``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**shape, "num_hidden_layers": layers}, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(TrainingPlan.lora_targets)
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=targets,
                                                 task_type="CAUSAL_LM")).to(torch.bfloat16)
    return model


def saved_activation_bytes(shape: dict, method: str = "full", tokens: int = 256) -> tuple[float, float]:
    """(per layer, outside the layers) bytes per token that autograd saves for backward, bf16, on CPU.

    Counted with saved-tensor hooks (each storage once, parameters excluded) on 1- and 2-layer
    models of ``shape``: what the planner's activation coefficients were fitted to.
    """
    import torch

    def saved(layers: int) -> float:
        model = probe_model(shape, method, layers)
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


if __name__ == "__main__":
    raise SystemExit(main())
