"""The trainer actor: one per GPU (or CPU slot), DeepSpeed ZeRO among them over torch.distributed.

The driver owns the data order and the step loop; a trainer only holds the micro-batches it was
sent and runs ``train_step(indices)``: one forward/backward per micro-batch, then one optimizer
step at DeepSpeed's accumulation boundary. What a forward pass computes is the stage's
``objective`` (SFT cross-entropy, DPO on chosen/rejected rows, ...), so this class is shared by
every training stage.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from rayalign.training.host_metrics import metrics_to_host
from rayalign.workers.base import Worker, pick_device, weighted_mean
from rayalign.workers.device_batch import batch_to_device, host_ready, to_host
from rayalign.workers.deepspeed_ops import build_deepspeed_ops
from rayalign.workers.quantization import load_qlora_model, save_qlora  # QLoRA: 4-bit base + LoRA adapters


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainSpec:
    model_path: str
    total_steps: int
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    bf16: bool = True  # only on GPU; CPU trains in fp32
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # training/attention.py: varlen flash attention on CUDA, sdpa on CPU
    kernels: str = "none"  # "liger": Liger's RMSNorm/SwiGLU/RoPE kernels (training/liger.py; CUDA only)
    compile: bool = False  # torch.compile each decoder layer (training/compiled_layers.py)
    lora: LoraSpec | None = None
    qlora: LoraSpec | None = None  # 4-bit base + LoRA (workers/quantization.py)
    seed: int = 0
    # "lm": a causal LM (policy, SFT, DPO). "score": the same backbone with a one-output linear
    # head (AutoModelForSequenceClassification, num_labels=1): reward models and PPO critics.
    head: str = "lm"


Objective = Callable[[Any, dict], tuple[Any, dict[str, float]]]


class TrainerWorker(Worker):
    def __init__(self, rank: int, world_size: int, num_threads: int = 1):
        super().__init__(num_threads)
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self.batches: list[dict] = []

    def free_address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            return _node_ip(), s.getsockname()[1]

    def setup(self, master: tuple[str, int], spec: TrainSpec, objective: Objective) -> int:
        import deepspeed
        import torch
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        from rayalign.training.attention import resolve_attention
        from rayalign.training.deepspeed_config import adamw, deepspeed_config

        self.device = pick_device()
        on_cuda = self.device.type == "cuda"
        spec = replace(spec, attn_implementation=resolve_attention(spec.attn_implementation, self.device.type,
                                                                   spec.model_path))
        self.spec, self.objective = spec, objective
        use_bf16 = spec.bf16 and on_cuda
        os.environ.update(
            MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
        )
        build_deepspeed_ops()  # before DeepSpeed's own build, which would wait forever on a killed one's lock
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(spec.seed)

        # bf16 weights from the start on GPU: DeepSpeed's bf16 mode casts the module to bf16 anyway and
        # builds its fp32 master copy from those bf16 values, so an fp32 load only cost time and memory.
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        model = load_qlora_model(spec, self.device) if spec.qlora else _load_for_training(spec, dtype)
        model.config.use_cache = False  # a KV cache would switch off packed-sequence masking
        if spec.kernels == "liger":
            from rayalign.training.liger import apply_liger_kernels

            apply_liger_kernels(model, self.device.type)
        if spec.compile:
            from rayalign.training.compiled_layers import compile_decoder_layers

            compile_decoder_layers(model)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if spec.lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                    target_modules=spec.lora.target_modules,
                    task_type="SEQ_CLS" if spec.head == "score" else "CAUSAL_LM",  # SEQ_CLS trains the head too
                ),
            )
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)  # before ZeRO-3 partitions them (numel() is 0 after)
        optimizer = adamw(params, spec.lr, spec.weight_decay, on_cuda)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=int(spec.warmup_ratio * spec.total_steps),
            num_training_steps=spec.total_steps,
            min_lr_rate=spec.min_lr_ratio,
        )
        ds_config = deepspeed_config(spec.zero_stage, spec.grad_accum, spec.max_grad_norm, use_bf16, self.world_size,
                                     on_cuda)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        self.base_lrs = list(scheduler.base_lrs)
        return trainable

    def load_batches(self, batches: list[dict]) -> int:
        """Every micro-batch of the stage (numpy arrays, zero-copy from the object store)."""
        self.batches = batches
        return len(batches)

    def _to_device(self, batch: dict) -> dict:
        """A micro-batch's arrays on the trainer's device; other values (host-side counts) as they are.

        On CUDA each array goes through pinned host memory and is copied without blocking, so the
        host queues the forward pass behind the copy instead of waiting for it."""
        return batch_to_device(batch, self.device)

    def train_step(self, indices: list[int], scales: list[float]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches ``indices`` (at most grad_accum; every
        rank gets as many, see ``training.loop.split_step``).

        ``scales[k]`` turns micro-batch k's mean loss into its share of the whole step's mean
        (see ``TrainerSession.fit``), so the gradient is one token-level (or pair-level) mean
        over every micro-batch of every rank, as TRL computes it.
        """
        engine = self.engine
        engine.train()
        metrics = []  # each micro-batch's, left on the device until the step is done
        skipped_before = engine.skipped_steps
        for k, (i, scale) in enumerate(zip(indices, scales)):
            # The step ends after this rank's last micro-batch, however few: a short step (an
            # epoch's tail, a small RL batch) does not run empty slots up to grad_accum.
            engine.set_gradient_accumulation_boundary(k == len(indices) - 1)
            loss, m = self.objective(engine, self._to_device(self.batches[i]))
            engine.backward(loss * scale)
            # DeepSpeed only steps the optimizer at the accumulation boundary, and skips the step
            # (and the scheduler) when the gradient norm is not finite.
            engine.step()
            if scale:  # a scale-0 micro-batch only fills an empty accumulation slot
                metrics.append(m)
        norm = engine.get_global_grad_norm()
        # One device-to-host read for the whole step: every micro-batch's metrics and the norm.
        *metrics, tail = metrics_to_host(metrics + [{"grad_norm": norm if norm is not None else float("nan")}])
        out = weighted_mean(metrics) if metrics else {"count": 0.0}
        out["grad_norm"] = float(tail["grad_norm"])
        out["lr"] = engine.lr_scheduler.get_last_lr()[0]
        out["skipped"] = float(engine.skipped_steps - skipped_before)
        return out

    def compute(self, fn: Callable[[Any, dict], Any], indices: list[int]) -> list[Any]:
        """``fn(model, batch)`` on loaded micro-batches ``indices`` without gradients (old
        log-probs, values), tensors moved to CPU (queued without waiting; one wait at the end)."""
        import torch

        self.engine.eval()
        with torch.no_grad():
            out = [to_host(fn(self.engine, self._to_device(self.batches[i]))) for i in indices]
        host_ready(self.device)
        return out

    # -- weight sync to the rollout engines (see rayalign.rollout.weight_sync) -------------------

    def export_weights(self, transport: str, bucket_bytes: int):
        """The policy's weights as the inference engine names them (LoRA merged), in buckets.
        Every rank must be called (ZeRO-3 gathers); rank 0 returns what the engines need:
        object-store refs, CUDA IPC handles, or (nccl) the layouts it just broadcast."""
        from rayalign.rollout import weight_sync as ws

        module, zero = self.engine.module, self.spec.zero_stage
        if transport == "object_store":
            return ws.export_to_object_store(module, zero, self.rank, bucket_bytes)
        if transport == "cuda_ipc":
            handles, self._exported = ws.export_cuda_ipc(module, zero, self.rank, bucket_bytes)
            return handles
        return ws.broadcast_nccl(self._sync_comm if self.rank == 0 else None, module, zero, self.rank, bucket_bytes)

    def release_exported(self) -> None:
        """The engines have loaded the CUDA IPC buffers: free them."""
        self._exported = []

    def offload_states(self) -> None:
        """Optimizer states and fp32 master weights to pinned host memory while a colocated engine
        generates (DeepSpeed's offload_states; it empties torch's cache after). No-op on CPU."""
        if self.device.type == "cuda":
            from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

            self.engine.offload_states(include=[OffloadStateTypeEnum.optim_states, OffloadStateTypeEnum.hp_params])

    def reload_states(self) -> None:
        """Back to the GPU what ``offload_states`` moved (nothing if nothing was moved)."""
        if self.device.type == "cuda":
            self.engine.reload_states()

    def weights_layout(self, bucket_bytes: int) -> list:
        from rayalign.rollout.weight_sync import buckets

        return [layout for _, layout in buckets(self.engine.module, self.spec.zero_stage, self.rank, bucket_bytes)]

    def join_sync_group(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the NCCL group it shares with the engines, as its rank 0."""
        import torch

        from rayalign.rollout.weight_sync import nccl_group

        self._sync_comm = nccl_group(host, port, 0, world_size, torch.device("cuda", torch.cuda.current_device()))

    def save_checkpoint(self, path: str) -> None:
        """Model, optimizer, scheduler (DeepSpeed, every rank its shards) and this rank's RNG."""
        self.engine.save_checkpoint(path, tag="engine")
        _save_rng(os.path.join(path, f"rng-rank{self.rank}"))

    def load_checkpoint(self, path: str, lr_scale: float) -> None:
        """Back to the state of ``path``, with the peak LR scaled by ``lr_scale`` (explosion back-off)."""
        load_path, _ = self.engine.load_checkpoint(path, tag="engine")
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
        _load_rng(os.path.join(path, f"rng-rank{self.rank}"))
        self.set_lr_scale(lr_scale)

    def set_lr_scale(self, scale: float) -> None:
        scheduler = self.engine.lr_scheduler
        ratio = scale * self.base_lrs[0] / scheduler.base_lrs[0]
        scheduler.base_lrs = [b * scale for b in self.base_lrs]
        for group in scheduler.optimizer.param_groups:
            group["lr"] *= ratio

    def evaluate(self, indices: list[int]) -> list[dict[str, float]]:
        import torch

        self.engine.eval()
        with torch.no_grad():
            return metrics_to_host([self.objective(self.engine, self._to_device(self.batches[i]))[1] for i in indices])

    def save(self, path: str) -> None:
        """Write a Hugging Face directory (LoRA merged) that transformers and vLLM load."""
        from rayalign.training.saving import save_inference_model

        module = self.engine.module
        state = None
        if self.spec.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls
        if self.rank != 0:
            return
        if self.spec.qlora is not None:  # QLoRA saves the adapter and a merged bf16 model (workers/quantization.py)
            return save_qlora(module, self.spec, path)
        if self.spec.lora is not None:
            module.save_pretrained(os.path.join(path, "adapter"))
            module = module.merge_and_unload()
        save_inference_model(module, path, self.spec.model_path, state_dict=state)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _load_for_training(spec: TrainSpec, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(dtype=dtype, attn_implementation=spec.attn_implementation)
    if spec.head == "score":
        # A causal-LM checkpoint gets a fresh one-output head; a reward model keeps its own.
        return AutoModelForSequenceClassification.from_pretrained(spec.model_path, num_labels=1, **kwargs)
    return AutoModelForCausalLM.from_pretrained(spec.model_path, **kwargs)


def _save_rng(prefix: str) -> None:
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    with open(prefix + ".json", "w") as fh:
        json.dump(state, fh)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    torch.save(tensors, prefix + ".pt")


def _load_rng(prefix: str) -> None:
    import random

    import numpy as np
    import torch

    with open(prefix + ".json") as fh:
        state = json.load(fh)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = torch.load(prefix + ".pt", weights_only=True)  # tensors only: never unpickle code
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
