"""Trainer -> vLLM weight sync after every policy update: versioned, bucketed, with a deadline.

The trainer's weights are exported under the names a plain Hugging Face checkpoint uses (what
``model.load_weights`` of every vLLM model accepts): DeepSpeed's wrapper and PEFT's prefixes are
removed, and LoRA adapters are merged on the fly (``W + B @ A * scale``) without touching the
trainer's own adapters, so the engine serves the policy being trained, not its base weights.

Transport: the tensors travel in buckets of about ``bucket_bytes`` through the Ray object store
(shared memory on one node, Ray's transfer across nodes). Each engine loads one bucket at a time,
so peak extra memory is one bucket, not a second copy of the model.

Every sync carries a version. Engines stamp it on the completions they produce, and the RL loop
counts (and drops) completions sampled with any other version instead of training on them.
A sync that does not finish within ``timeouts.sync_s`` raises an error naming the engine.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.errors import WorkerError

DEFAULT_BUCKET_BYTES = 256 << 20


def _peft_base(module):
    """The Hugging Face model inside a PEFT wrapper (with LoRA layers injected), else ``module``."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _units(model) -> Iterator[tuple[str, object, bool]]:
    """(prefix, module, recurse) units whose parameters are exported together: a LoRA layer with
    its adapters (recurse), or any other module's own parameters."""
    from peft.tuners.lora import LoraLayer

    inside_lora: list[str] = []
    for name, sub in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_lora):
            continue
        if isinstance(sub, LoraLayer):
            inside_lora.append(name)
            yield name, sub, True
        elif any(True for _ in sub.parameters(recurse=False)):
            yield name, sub, False


def _unit_tensors(prefix: str, module, is_lora: bool) -> list[tuple[str, "object"]]:
    """Inference-named tensors of one unit; a LoRA layer's base weight comes back merged."""
    join = lambda n: f"{prefix}.{n}" if prefix else n  # noqa: E731
    if not is_lora:
        return [(join(n), p.detach()) for n, p in module.named_parameters(recurse=False)]
    weight = module.base_layer.weight.detach()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    out = [(join("weight"), weight)]
    out += [(join(n), p.detach()) for n, p in module.base_layer.named_parameters(recurse=False) if n != "weight"]
    return out


def named_inference_tensors(module, zero_stage: int) -> Iterator[tuple[str, "object"]]:
    """Every weight of ``module`` as an inference engine names it (LoRA merged), on the CPU.

    Under ZeRO-3 the parameters are sharded: every rank must call this (each unit's parameters
    are gathered collectively), and only rank 0's results are meaningful to keep.
    """
    model = _peft_base(module)
    for prefix, sub, is_lora in _units(model):
        params = list(sub.parameters(recurse=is_lora))
        gather = contextlib.nullcontext()
        if zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            for name, tensor in _unit_tensors(prefix, sub, is_lora):
                yield name, tensor.to("cpu", copy=True)


def export_buckets(module, zero_stage: int, rank: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list:
    """Rank 0: the model in object-store buckets (a list of ObjectRefs); other ranks: []."""
    import ray

    refs, bucket, size = [], [], 0
    for name, tensor in named_inference_tensors(module, zero_stage):
        if rank != 0:
            continue
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            refs.append(ray.put(bucket))
            bucket, size = [], 0
    if bucket and rank == 0:
        refs.append(ray.put(bucket))
    return refs


@dataclass
class SyncStats:
    version: int
    seconds: float
    buckets: int
    bytes: int


class WeightSync:
    """Pushes the trainer group's weights into the rollout group's engines, versioned."""

    def __init__(self, trainers: WorkerGroup, engines: WorkerGroup, timeout_s: float,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.trainers, self.engines = trainers, engines
        self.timeout_s, self.bucket_bytes = timeout_s, bucket_bytes
        self.version = 0  # the engines start with the stage's input model: version 0

    def sync(self) -> SyncStats:
        """Export, transfer and load the current policy as ``version + 1``; raise on a timeout."""
        version = self.version + 1
        started = time.monotonic()
        try:
            refs = self.trainers.run(lambda a, r: a.export_weights.remote(self.bucket_bytes), self.timeout_s)[0]
            # A list of refs is passed unresolved (Ray only resolves top-level refs), so each
            # engine fetches one bucket at a time.
            loaded = self.engines.run(lambda a, r: a.update_weights.remote(refs, version), self.timeout_s)
        except WorkerError as exc:
            raise WorkerError(exc.actor_name, f"weight sync to version {version}: {exc.detail}", exc.retryable) from exc
        self.version = version
        return SyncStats(version, time.monotonic() - started, len(refs), loaded[0])
