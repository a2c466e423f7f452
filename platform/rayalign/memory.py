"""GPU memory planner: per-GPU bytes of a training configuration, by part, before anything runs.

The model follows what rayalign's trainer does (``workers/trainer.py``): DeepSpeed with bf16
compute weights, fp32 master weights, fp32 gradient partitions and AdamW's two fp32 moments; ZeRO
stage ``z`` over ``N`` GPUs shards the optimizer states (z >= 1), the fp32 gradients (z >= 2) and
the bf16 weights and gradients (z = 3). Per trainable parameter that is 2 + 2 + 4 + 4 + 8 = 20
bytes without sharding (the Rajbhandari et al. 2020 accounting, plus the fp32 gradient copy
DeepSpeed's bf16 optimizer makes), though not all at once: at the loss, where the forward/backward
peak is, backward has produced no gradient yet, and the fp32 copy exists only in the optimizer step.

Activations are what autograd saves for backward, per token and layer of a Llama/Qwen2 decoder
layer in bf16 with SDPA attention (no seq x seq term), with h = hidden, q = heads x head_dim,
k = kv_heads x head_dim, i = intermediate size. The coefficients were fitted to the bytes autograd
saves on five shapes (``benchmarks/memory_validation.py``'s ``saved_activation_bytes``; the fit is
exact to about 1%, and ``tests/test_memory.py`` keeps it so):

    full fine-tuning                  16h + 4q + 4k + 8i   (+ 8.3h outside the layers)
    LoRA on attention (frozen MLP)    10.5h + 4q + 4k + 6i (a frozen linear keeps no input)
    LoRA on attention and MLP         12.5h + 4q + 4k + 8i

With gradient checkpointing a layer keeps only its input (2h) and one layer is recomputed at a
time. The loss adds ``LOGITS_BYTES`` bytes per token and vocabulary entry at its peak: bf16 logits,
their fp32 copy and the log-softmax (measured with the torch profiler on CPU, ``loss_peak_bytes``;
the backward pass reuses that much; CUDA keeps more, ``Calibration.logits_bytes``). For small
models with large vocabularies (Qwen2-0.5B: 152k entries) that term is larger than all layers'
activations together.

What the accounting cannot derive is in ``Calibration`` (one line, ``CALIBRATION``), fitted to
peaks of the real trainer on a GPU by ``benchmarks/memory_validation.py``, which also reports the
error on configurations the fit did not see; ``docs/memory.md`` describes the model and the check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rayalign.errors import ConfigError

GiB = 1024**3
LOGITS_BYTES = 10  # per token x vocab entry, bf16 logits (2) + fp32 copy (4) + log-softmax (4); measured on CPU
LABELLED_CHUNK_TOKENS = 1024  # training/labelled_logps.py's CHUNK_TOKENS (not imported: no torch here)
LABELLED_CHUNK_ELEMENTS = 1 << 28  # training/linear_cross_entropy.py's CHUNK_ELEMENTS (SFT's labelled loss)
UNSPLIT_LOGITS_BYTES = 4  # per labelled position x vocab entry under ZeRO-3: bf16 logits and their gradient
DS_BUCKET = 2e8  # training/deepspeed_config.py's BUCKET_ELEMENTS: ZeRO's reduce bucket of bf16 gradients
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64, fp32 absmax per 256 blocks


@dataclass(frozen=True)
class Calibration:
    """The planner's free constants: what the byte accounting above cannot derive and a GPU run fits.

    ``benchmarks/memory_validation.py`` least-squares fits them on some configurations run through
    the real trainer and reports the error on others the fit never saw (docs/memory.md).
    """

    # Multiplies the activation bytes fitted to what autograd saves on CPU (CUDA kernels keep other
    # temporaries, and the caching allocator rounds blocks up).
    activation_scale: float = 1.0
    # The loss's peak on CUDA, per token x vocabulary entry of the logits it sees (full logits, or
    # one chunk of labelled positions): bf16 logits, their fp32 copy and the log-softmax and its
    # gradient, more than the CPU profile's LOGITS_BYTES.
    logits_bytes: float = 12.35
    # CUDA context, cuBLAS workspaces and the allocator's cached blocks: the device memory a trainer
    # process uses beyond torch.cuda.max_memory_allocated.
    cuda_reserve_gib: float = 1.0


# The constants in use: fitted by benchmarks/memory_validation.py on its `fit` rows only (one H200,
# benchmarks/results/h200-20261203-memory_validation-heldout.json); its held-out rows judge them.
CALIBRATION = Calibration(activation_scale=1.083, logits_bytes=11.74, cuda_reserve_gib=5.95)

Method = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer's config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied: bool
    attention_bias: bool = False

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "ModelShape":
        config = config.get("text_config", config)  # multimodal wrappers keep the LM's shape inside
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size") if k not in config]
        if missing:
            raise ConfigError(where, f"not a decoder config the memory planner knows: missing {', '.join(missing)}")
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"], intermediate=config["intermediate_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-style configs say so with attention_bias.
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelShape":
        config = Path(path) / "config.json"
        if not config.exists():
            raise ConfigError(str(path), "no config.json: not a Hugging Face model directory")
        try:
            return cls.from_config(json.loads(config.read_text()), str(config))
        except json.JSONDecodeError as exc:
            raise ConfigError(str(config), f"malformed JSON ({exc.msg})") from None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one layer, by its Hugging Face name."""
        h, q, k, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        bias = self.q_dim + 2 * self.kv_dim if self.attention_bias else 0
        return sum(a * b for a, b in self.linear_shapes().values()) + bias

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)  # input embedding (+ untied lm_head)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.embedding_params + self.layers * self.layer_linear_params + norms

    def lora_params(self, r: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    def activation_bytes_per_token_layer(self, method: str = "full", lora_targets=()) -> float:
        """Bytes autograd saves per token in one decoder layer (bf16; fitted, see the module doc)."""
        h, q, k, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        if method == "full":
            return 16 * h + 4 * q + 4 * k + 8 * i
        if {"gate_proj", "up_proj", "down_proj"} & set(lora_targets):
            return 12.5 * h + 4 * q + 4 * k + 8 * i
        return 10.5 * h + 4 * q + 4 * k + 6 * i  # frozen MLP linears keep no input

    def activation_bytes_outside_layers(self, method: str = "full") -> float:
        """Per token: embedding output and final norm (a frozen embedding needs none)."""
        return 8.3 * self.hidden if method == "full" else 0.0

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * dtype_bytes


@dataclass(frozen=True)
class TrainingPlan:
    method: Method = "full"
    zero: int = 2
    gpus: int = 1
    seq: int = 2048
    micro_batch: int = 1
    grad_ckpt: bool = False
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    gpu_memory_gib: float = 80.0
    vllm_fraction: float = 0.0  # share of the GPU a colocated vLLM engine takes when awake
    # full: the loss sees the whole [tokens x vocabulary] logits; labelled: the output head runs on
    # a chunk of labelled positions at a time (training/labelled_logps.py), so one chunk's logits
    # and their float32 work are live at once.
    logits: Literal["full", "labelled"] = "full"
    # How a labelled loss runs the head. logps: token log-probs in checkpointed chunks of
    # LABELLED_CHUNK_TOKENS positions (DPO, RL, any loss but SFT's). nll: SFT's mean NLL, head and
    # gradients in one pass over chunks of LABELLED_CHUNK_ELEMENTS logits (training/linear_cross_entropy.py).
    labelled_loss: Literal["logps", "nll"] = "logps"


@dataclass
class Estimate:
    plan: TrainingPlan
    shape: ModelShape
    parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU while training
    vllm: dict[str, float] = field(default_factory=dict)  # bytes per GPU of the awake vLLM engine
    static: float = 0.0  # what stays allocated while vLLM is awake (weights, grads, optimizer)
    # What the optimizer step adds to weights, gradients and optimizer states: the gradients it
    # completes and converts to fp32, and torch AdamW's sqrt(v) copy (foreach).
    step_temporaries: float = 0.0
    calibration: Calibration = CALIBRATION

    @property
    def training_peak(self) -> float:
        """Forward/backward with every part live, or the optimizer step after activations are freed."""
        step = self.parts["weights"] + self.parts["gradients"] + self.parts["optimizer states"] + self.step_temporaries
        return max(sum(self.parts.values()), step)

    @property
    def peak(self) -> float:
        """The larger of training and (colocated) generation, plus the CUDA reserve."""
        generation = self.static + sum(self.vllm.values())
        return max(self.training_peak, generation) + self.calibration.cuda_reserve_gib * GiB

    @property
    def capacity(self) -> float:
        return self.plan.gpu_memory_gib * GiB

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def summary(self) -> str:
        """One line: the peak, the capacity and the largest parts (for errors and logs)."""
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in top)
        verdict = "fits" if self.fits else "does not fit"
        return (f"{self.plan.method} ZeRO-{self.plan.zero} on {self.plan.gpus} GPU(s), {self.plan.micro_batch}x"
                f"{self.plan.seq} tokens per micro-batch: {self.peak / GiB:.1f} GiB per GPU {verdict} in "
                f"{self.plan.gpu_memory_gib:.0f} GiB ({parts} GiB)")

    def table(self) -> str:
        p, s = self.plan, self.shape
        lines = [f"model: {s.params / 1e9:.3f}B parameters ({s.layers} layers, hidden {s.hidden}, heads {s.heads}/"
                 f"{s.kv_heads} kv, vocab {s.vocab}{', tied embeddings' if s.tied else ''})",
                 f"plan: {p.method}, ZeRO-{p.zero}, {p.gpus} GPU(s), micro-batch {p.micro_batch} x {p.seq} tokens, "
                 f"gradient checkpointing {'on' if p.grad_ckpt else 'off'}", "",
                 f"{'part':<28}{'GiB per GPU':>12}"]
        lines += [f"{name:<28}{value / GiB:>12.2f}" for name, value in self.parts.items()]
        lines.append(f"{'training total':<28}{self.training_peak / GiB:>12.2f}")
        if self.vllm:
            lines += [f"{'vLLM ' + name:<28}{value / GiB:>12.2f}" for name, value in self.vllm.items()]
            lines.append(f"{'while vLLM is awake':<28}{(self.static + sum(self.vllm.values())) / GiB:>12.2f}")
        lines.append(f"{'CUDA context, allocator':<28}{self.calibration.cuda_reserve_gib:>12.2f}")
        lines.append(f"{'peak':<28}{self.peak / GiB:>12.2f}  of {p.gpu_memory_gib:.0f} GiB: "
                     + ("fits" if self.fits else f"DOES NOT FIT (short by {(self.peak - self.capacity) / GiB:.1f} GiB)"))
        return "\n".join(lines)


def logits_bytes(shape: ModelShape, plan: TrainingPlan, calibration: Calibration = CALIBRATION) -> float:
    """The loss's peak bytes beyond the layers' activations, by ``plan.logits``.

    full: every position's logits. labelled: the head runs on one chunk of labelled positions at a
    time (``plan.labelled_loss`` says how large a chunk). SFT's one-pass loss also keeps the
    head's gradient in fp32 until backward when the head trains (full fine-tuning). Under ZeRO-3 the
    head cannot be split from the model (training/output_head.py), so the model's own forward
    returns bf16 logits at every labelled position, kept with their gradient.
    """
    tokens = plan.seq * plan.micro_batch
    if plan.logits == "full":
        return tokens * shape.vocab * calibration.logits_bytes
    if plan.labelled_loss == "nll" and plan.zero < 3:
        out = min(tokens * shape.vocab, LABELLED_CHUNK_ELEMENTS) * calibration.logits_bytes
        if plan.method == "full":
            out += 4 * shape.vocab * shape.hidden
        return out
    out = min(tokens, LABELLED_CHUNK_TOKENS) * shape.vocab * calibration.logits_bytes
    if plan.zero == 3:
        out += tokens * shape.vocab * UNSPLIT_LOGITS_BYTES
    return out


def estimate(shape: ModelShape, plan: TrainingPlan, calibration: Calibration = CALIBRATION) -> Estimate:
    if plan.zero not in (0, 1, 2, 3):
        raise ConfigError("zero", f"ZeRO stage must be 0, 1, 2 or 3, got {plan.zero}")
    n, z = plan.gpus, plan.zero
    total = shape.params
    if plan.method == "full":
        trainable = total
        weights = 2 * total / (n if z == 3 else 1)
    else:
        trainable = shape.lora_params(plan.lora_r, list(plan.lora_targets))
        if plan.method == "lora":
            frozen = 2 * total
        else:  # 4-bit linear layers; embeddings, lm_head and norms stay bf16
            linear = shape.layers * shape.layer_linear_params
            frozen = NF4_BYTES * linear + 2 * (total - linear)
        weights = frozen / (n if z == 3 else 1) + 2 * trainable
    # bf16 gradients, then their fp32 copy in the optimizer step (DeepSpeed's bf16 ZeRO). The forward/
    # backward peak is at the loss, before backward has produced gradients: ZeRO-2 then holds its
    # reduce bucket, ZeRO-3 its bf16 gradient partition (allocated up front); ZeRO-0/1 are counted
    # with every gradient live (not measured).
    bf16_grads = 2 * trainable / (n if z >= 2 else 1)
    fp32_grads = 4 * trainable / (n if z >= 2 else 1)
    working_grads = {3: bf16_grads, 2: min(2 * trainable, 2 * DS_BUCKET)}.get(z, bf16_grads + fp32_grads)
    optimizer = 12 * trainable / (n if z >= 1 else 1)  # fp32 master + Adam m, v

    tokens = plan.seq * plan.micro_batch
    per_layer = shape.activation_bytes_per_token_layer(plan.method, plan.lora_targets)
    if plan.grad_ckpt:  # every layer keeps its input; one layer's activations live during recompute
        activations = tokens * (2 * shape.hidden * shape.layers + per_layer)
    else:
        activations = tokens * per_layer * shape.layers
    activations += tokens * shape.activation_bytes_outside_layers(plan.method)

    est = Estimate(plan, shape, calibration=calibration)
    est.parts = {"weights": weights, "gradients": working_grads, "optimizer states": optimizer,
                 "activations": activations * calibration.activation_scale,
                 "logits and loss": logits_bytes(shape, plan, calibration)}
    est.static = weights + fp32_grads + optimizer
    est.step_temporaries = bf16_grads + fp32_grads - working_grads + 4 * trainable / (n if z >= 1 else 1)
    if plan.vllm_fraction > 0:
        budget = plan.vllm_fraction * plan.gpu_memory_gib * GiB
        vllm_weights = 2 * total
        est.vllm = {"weights": vllm_weights, "KV cache": max(0.0, budget - vllm_weights)}
    return est


def kv_cache_tokens(est: Estimate) -> int:
    """Tokens the colocated vLLM engine's KV cache holds."""
    return int(est.vllm.get("KV cache", 0) // est.shape.kv_bytes_per_token())


def method_of(stage_config) -> Method:
    if getattr(stage_config, "qlora", None):
        return "qlora"
    return "lora" if getattr(stage_config, "lora", None) else "full"


def plan_for_stage(stage_config, run, gpu_memory_gib: float) -> TrainingPlan:
    """The plan a training stage's config and the run's resources describe (one packed row per micro-batch)."""
    lora = getattr(stage_config, "lora", None) or getattr(stage_config, "qlora", None)
    res = run.resources
    return TrainingPlan(
        method=method_of(stage_config), zero=stage_config.zero_stage, gpus=res.trainer.num_workers,
        seq=stage_config.max_tokens_per_micro_batch, micro_batch=1,
        grad_ckpt=stage_config.gradient_checkpointing,
        lora_r=getattr(lora, "r", 16), lora_targets=tuple(getattr(lora, "target_modules", TrainingPlan.lora_targets)),
        gpu_memory_gib=gpu_memory_gib,
        vllm_fraction=res.rollout.gpu_memory_utilization if res.colocated else 0.0,
    )


def gpu_memory_gib() -> float | None:
    """Memory of one trainer GPU: ``RAYALIGN_GPU_MEMORY_GIB``, else this machine's first GPU, else unknown."""
    import os

    if os.environ.get("RAYALIGN_GPU_MEMORY_GIB"):
        return float(os.environ["RAYALIGN_GPU_MEMORY_GIB"])
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GiB
    except Exception:  # a broken CUDA setup is the trainer's error to report, not the planner's
        return None
    return None


def check_training_memory(run, entries, model_path: str, log) -> list[Estimate]:
    """Refuse, before anything is allocated, a GPU training stage whose plan cannot fit.

    Training stages are those whose config has ``zero_stage`` (``TrainingConfig``). QLoRA without a
    GPU is refused first. The memory check is skipped on CPU runs, for hub ids without a local
    config.json, and when the GPU's memory is unknown.
    """
    from rayalign.training.qlora_requirements import require_gpu_for_qlora

    require_gpu_for_qlora(run, entries)
    if run.resources.trainer.num_gpus <= 0:
        return []
    # A stage that plans its colocated roles itself (RL: trainer, reference, engines) is left to it.
    training = [(i, e) for i, e in enumerate(entries) if hasattr(e.config, "zero_stage")
                and not (run.resources.colocated and getattr(e.config, "plans_colocated_memory", False))]
    if not training or not (Path(model_path) / "config.json").exists():
        return []
    capacity = gpu_memory_gib()
    if capacity is None:
        log.info("memory plan skipped: GPU memory unknown here; set RAYALIGN_GPU_MEMORY_GIB to check it")
        return []
    if run.resources.split:  # the engines beside the trainer hold their share of each GPU
        capacity *= 1 - run.resources.rollout.gpu_memory_utilization
    shape = ModelShape.from_dir(model_path)
    out = []
    for i, entry in training:
        est = estimate(shape, plan_for_stage(entry.config, run, capacity))
        if not est.fits:
            raise ConfigError(f"stages[{i}].{entry.name}", f"memory plan: {est.summary()}; try LoRA, a higher "
                              "zero_stage, more GPUs, gradient_checkpointing or a smaller max_tokens_per_micro_batch "
                              "(rayalign estimate-memory shows every part)")
        log.info("[%s] memory plan: %s", entry.name, est.summary())
        out.append(est)
    return out
