"""Trainer -> vLLM weight sync after every policy update: versioned, bucketed, with a deadline.

The trainer's weights are exported under the names a plain Hugging Face checkpoint uses (what
``model.load_weights`` of every vLLM model accepts): DeepSpeed's wrapper and PEFT's prefixes are
removed, and LoRA adapters are merged on the fly (``W + B @ A * scale``) without touching the
trainer's own adapters, so the engine serves the policy being trained, not its base weights.

Weights travel as buckets: one flat buffer of about ``bucket_bytes`` plus a ``BucketLayout``
saying which tensor sits where. Three transports move them (``resources.rollout.weight_sync``):

* ``object_store`` (CPU, or any cluster): each bucket is put in the Ray object store (shared
  memory on one node, Ray's transfer across nodes); every engine loads one bucket at a time.
* ``cuda_ipc`` (trainer and engine colocated on one GPU): the engine maps the trainer's GPU
  buffers through CUDA IPC handles; nothing is copied off the GPU.
* ``nccl`` (engines on other GPUs): trainer rank 0 and the engines form their own NCCL group
  (vLLM's stateless group, so it never touches the trainers' torch.distributed world) and each
  bucket is one broadcast.

Every sync carries a version. Engines stamp it on the completions they produce, and the RL loop
counts (and drops) completions sampled with any other version instead of training on them.
A sync that does not finish within ``timeouts.sync_s`` raises an error naming the worker.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.errors import WorkerError

DEFAULT_BUCKET_BYTES = 256 << 20
TRANSPORTS = ("object_store", "cuda_ipc", "nccl")


@dataclass
class BucketLayout:
    """Where each named tensor lies in a bucket's flat buffer."""

    dtype: str  # torch dtype name, e.g. "bfloat16"
    numel: int = 0
    tensors: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)  # (name, shape, offset)

    def views(self, flat) -> Iterator[tuple[str, "object"]]:
        for name, shape, offset in self.tensors:
            size = 1
            for d in shape:
                size *= d
            yield name, flat[offset : offset + size].view(shape)

    @property
    def nbytes(self) -> int:
        import torch

        return self.numel * torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()


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
    """Every weight of ``module`` as an inference engine names it (LoRA merged), where it lives.

    Under ZeRO-3 the parameters are sharded: every rank must iterate (each unit's parameters are
    gathered collectively) and must be done with a tensor before asking for the next one.
    """
    from rayalign.training.scores import hf_model

    model = hf_model(module)  # under a PEFT wrapper: the model with its LoRA layers injected
    for prefix, sub, is_lora in _units(model):
        params = list(sub.parameters(recurse=is_lora))
        gather = contextlib.nullcontext()
        if zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            yield from _unit_tensors(prefix, sub, is_lora)


def buckets(module, zero_stage: int, rank: int, bucket_bytes: int) -> Iterator[tuple["object", BucketLayout]]:
    """Rank 0: (flat buffer on the weights' device, layout) per bucket; other ranks only take part
    in ZeRO-3 gathers and yield nothing. A bucket never mixes dtypes."""
    import torch

    with torch.no_grad():  # a merged LoRA weight would otherwise carry autograd history
        pending: list[tuple[str, object]] = []
        size = 0
        for name, tensor in named_inference_tensors(module, zero_stage):
            if rank != 0:
                continue
            if pending and (tensor.dtype != pending[0][1].dtype or size >= bucket_bytes):
                yield _flatten(pending)
                pending, size = [], 0
            pending.append((name, tensor))  # _flatten copies, so a gathered ZeRO-3 tensor may go
            size += tensor.numel() * tensor.element_size()
        if pending:
            yield _flatten(pending)


def _flatten(named: list[tuple[str, "object"]]) -> tuple["object", BucketLayout]:
    import torch

    layout = BucketLayout(str(named[0][1].dtype).removeprefix("torch."))
    for name, tensor in named:
        layout.tensors.append((name, tuple(tensor.shape), layout.numel))
        layout.numel += tensor.numel()
    return torch.cat([t.reshape(-1) for _, t in named]), layout


# -- the trainer's side (called from TrainerWorker methods) --------------------------------------

def export_to_object_store(module, zero_stage: int, rank: int, bucket_bytes: int) -> list:
    """Rank 0: a list of object-store refs, one (CPU flat buffer, layout) per bucket."""
    import ray

    return [ray.put((flat.cpu(), layout)) for flat, layout in buckets(module, zero_stage, rank, bucket_bytes)]


def export_cuda_ipc(module, zero_stage: int, rank: int, bucket_bytes: int) -> tuple[list, list]:
    """Rank 0: (CUDA IPC handle, layout) per bucket, and the buffers the caller must keep alive
    until every engine has loaded them."""
    from torch.multiprocessing.reductions import reduce_tensor

    held, handles = [], []
    for flat, layout in buckets(module, zero_stage, rank, bucket_bytes):
        held.append(flat)
        handles.append((reduce_tensor(flat), layout))
    return handles, held


def broadcast_nccl(comm, module, zero_stage: int, rank: int, bucket_bytes: int) -> list[BucketLayout]:
    """Rank 0 broadcasts every bucket to the engines' NCCL group; returns the layouts sent."""
    layouts = []
    for flat, layout in buckets(module, zero_stage, rank, bucket_bytes):
        comm.broadcast(flat, src=0)
        layouts.append(layout)
    if layouts:
        import torch

        torch.cuda.current_stream().synchronize()
    return layouts


def nccl_group(host: str, port: int, rank: int, world_size: int, device):
    """A NCCL communicator among trainer rank 0 (rank 0 here) and the engines, outside
    torch.distributed's default world (vLLM's stateless group works in both 0.26 and 0.32)."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


# -- the engine's side (called from RolloutWorker methods) ---------------------------------------
#
# The functions that take ``worker`` run inside vLLM's worker, which is the rollout actor's process
# or the engine core's child (``VLLMEngine.run_in_worker``): what they receive must cross that
# process boundary, so object-store buckets are fetched by the actor first when the model is in the
# child ("buckets"), and the NCCL communicator lives on the worker itself.

def resolve_for_worker(transport: str, payload: list, model_in_process: bool) -> tuple[str, list]:
    """(transport, payload) as the worker can take them: object-store refs become ``buckets``
    ((flat CPU tensor, layout) pairs) when the worker is in another process, which is not a Ray
    worker and cannot fetch them itself."""
    if transport != "object_store" or model_in_process:
        return transport, payload
    import ray

    return "buckets", [ray.get(ref) for ref in payload]


def load_in_worker(worker, transport: str, payload: list) -> int:
    """Load every bucket of ``payload`` into the worker's model; returns the bytes loaded."""
    from rayalign.rollout.vllm_engine import load_into_model

    source = {
        "object_store": lambda: from_object_store(payload),
        "buckets": lambda: (named for flat, layout in payload for named in layout.views(flat)),
        "cuda_ipc": lambda: from_cuda_ipc(payload),
        "nccl": lambda: from_nccl(worker.rayalign_sync_comm, payload),
    }[transport]()
    loaded = [0]

    def counted():
        for name, tensor in source:
            loaded[0] += tensor.numel() * tensor.element_size()
            yield name, tensor

    load_into_model(worker, counted())
    return loaded[0]


def join_in_worker(worker, host: str, port: int, rank: int, world_size: int) -> None:
    """The worker joins the weight-sync NCCL group (``nccl_group``) on its own GPU."""
    import torch

    worker.rayalign_sync_comm = nccl_group(host, port, rank, world_size,
                                           torch.device("cuda", torch.cuda.current_device()))


def from_object_store(refs: list) -> Iterator[tuple[str, "object"]]:
    import ray

    for ref in refs:
        flat, layout = ray.get(ref)
        yield from layout.views(flat)


def from_cuda_ipc(handles: list) -> Iterator[tuple[str, "object"]]:
    for (rebuild, args), layout in handles:
        yield from layout.views(rebuild(*args))


def from_nccl(comm, layouts: list[BucketLayout]) -> Iterator[tuple[str, "object"]]:
    import torch

    for layout in layouts:
        flat = torch.empty(layout.numel, dtype=getattr(torch, layout.dtype), device=comm.device)
        comm.broadcast(flat, src=0)
        yield from layout.views(flat)


# -- the driver's side -----------------------------------------------------------------------------

def choose_transport(resources) -> str:
    """``resources.weight_sync_transport`` (the config resolves ``auto``); kept for plugins that call it."""
    return resources.weight_sync_transport


@dataclass
class SyncStats:
    version: int
    seconds: float
    buckets: int
    bytes: int
    transport: str


class WeightSync:
    """Pushes the trainer group's weights into the rollout group's engines, versioned."""

    def __init__(self, trainers: WorkerGroup, engines: WorkerGroup, timeout_s: float,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, transport: str = "object_store"):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown weight-sync transport {transport!r} (known: {', '.join(TRANSPORTS)})")
        self.trainers, self.engines = trainers, engines
        self.timeout_s, self.bucket_bytes, self.transport = timeout_s, bucket_bytes, transport
        self.version = 0  # the engines start with the stage's input model: version 0
        self._layouts: list[BucketLayout] | None = None
        if transport == "nccl":
            self._guarded(0, self._connect)

    def _guarded(self, version: int, fn):
        try:
            return fn()
        except WorkerError as exc:
            what = "weight-sync group setup" if version == 0 else f"weight sync to version {version}"
            raise WorkerError(exc.actor_name, f"{what}: {exc.detail}", exc.retryable) from exc

    def _together(self, calls: list[tuple[WorkerGroup, object]]) -> list[list]:
        """Start calls on several groups at once (collectives need every side in), then wait."""
        pending = [(group, {call(actor, rank): rank for rank, actor in enumerate(group.actors)})
                   for group, call in calls]
        deadline = time.monotonic() + self.timeout_s
        return [group.wait(refs, max(1.0, deadline - time.monotonic())) for group, refs in pending]

    def _connect(self) -> None:
        host, port = self.trainers.run(lambda a, r: a.free_address.remote(), self.timeout_s, ranks=[0])[0]
        world = 1 + len(self.engines)
        self._together([
            (self.trainers, lambda a, r: a.join_sync_group.remote(host, port, world) if r == 0 else a.ping.remote()),
            (self.engines, lambda a, r: a.join_sync_group.remote(host, port, 1 + r, world)),
        ])

    def sync(self, version: int | None = None) -> SyncStats:
        """Export, transfer and load the current policy as ``version`` (default: the last one + 1;
        asynchronous RL names the policy's own, which may skip versions); raise on a timeout."""
        version = self.version + 1 if version is None else version
        started = time.monotonic()
        n_buckets, loaded = self._guarded(version, lambda: getattr(self, f"_sync_{self.transport}")(version))
        self.version = version
        return SyncStats(version, time.monotonic() - started, n_buckets, loaded, self.transport)

    def _sync_object_store(self, version: int) -> tuple[int, int]:
        refs = self.trainers.run(lambda a, r: a.export_weights.remote("object_store", self.bucket_bytes), self.timeout_s)[0]
        # A list of refs is passed unresolved (Ray only resolves top-level refs), so each engine
        # fetches one bucket at a time.
        loaded = self.engines.run(lambda a, r: a.update_weights.remote("object_store", refs, version), self.timeout_s)
        return len(refs), loaded[0]

    def _sync_cuda_ipc(self, version: int) -> tuple[int, int]:
        handles = self.trainers.run(lambda a, r: a.export_weights.remote("cuda_ipc", self.bucket_bytes), self.timeout_s)[0]
        try:
            loaded = self.engines.run(lambda a, r: a.update_weights.remote("cuda_ipc", handles, version), self.timeout_s)
        finally:
            self.trainers.run(lambda a, r: a.release_exported.remote(), self.timeout_s)
        return len(handles), loaded[0]

    def _sync_nccl(self, version: int) -> tuple[int, int]:
        if self._layouts is None:  # shapes never change: learn them once
            self._layouts = self.trainers.run(lambda a, r: a.weights_layout.remote(self.bucket_bytes), self.timeout_s)[0]
        layouts = self._layouts
        _, loaded = self._together([
            (self.trainers, lambda a, r: a.export_weights.remote("nccl", self.bucket_bytes)),
            (self.engines, lambda a, r: a.update_weights.remote("nccl", layouts, version)),
        ])
        return len(layouts), loaded[0]
