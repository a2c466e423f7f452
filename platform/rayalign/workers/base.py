"""What every worker actor shares: thread limits, device choice, metric averaging."""

from __future__ import annotations

import math


class Worker:
    """Base of worker actors. Torch threads are capped to the CPUs Ray gave the actor, so
    several actors on one node do not fight over cores."""

    def __init__(self, num_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, num_threads))

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        """The actor's process id (what an operator, or a fault test, sends signals to)."""
        import os

        return os.getpid()

    def device_memory(self) -> tuple[int, int]:
        """(free, total) bytes of this worker's GPU, as the driver sees it; (0, 0) on CPU."""
        import torch

        return torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)

    def release_memory(self) -> int:
        """Give the GPU blocks this process caches but does not use back to the device (a colocated
        engine is about to wake and map its share); the bytes still reserved, 0 on CPU."""
        from rayalign.workers.device_memory import release_cached_blocks

        return release_cached_blocks()

    def memory_peaks(self) -> dict[str, float]:
        """Peak bytes since the previous call (the first call starts the count): this process's
        torch ``reserved``/``allocated`` and the device's ``device_used`` (every process, vLLM's
        sleep pool included). Empty on CPU."""
        from rayalign.workers import device_memory as dm

        if not dm.cuda_in_use():
            return {}
        if getattr(self, "_device_sampler", None) is None:
            self._device_sampler = dm.DeviceUsedSampler()
        return dm.take_peaks(self._device_sampler)

    def shutdown(self) -> None:
        """Release what the worker holds before the group kills it."""


def pick_device():
    """The GPU Ray gave this worker, else the CPU. A worker of a CPU role on a GPU node can still
    see the node's GPUs; it must not use them (its DeepSpeed and collectives are set up for CPU)."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray

    if ray.is_initialized():
        context = ray.get_runtime_context()
        if context.get_actor_id() is not None and not context.get_accelerator_ids().get("GPU"):
            return torch.device("cpu")
    return torch.device("cuda", 0)


def weighted_mean(metrics: list[dict[str, float]], weight: str = "count") -> dict[str, float]:
    """Average dicts of metrics, weighting by ``weight`` where present (summed, not averaged)."""
    if not metrics:
        return {}
    weights = [m.get(weight, 1.0) for m in metrics]
    out = {}
    for key in metrics[0]:
        if key == weight:
            out[key] = float(sum(weights))
        else:
            vals = [(m[key], w) for m, w in zip(metrics, weights) if key in m and not math.isnan(m[key])]
            out[key] = sum(v * w for v, w in vals) / (sum(w for _, w in vals) or 1.0) if vals else float("nan")
    return out
