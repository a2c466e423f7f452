"""Micro-batches onto a worker's device, and results back, without making the host wait.

On CUDA each array is staged in pinned host memory and copied with ``non_blocking``: the host
queues the forward pass behind the copy instead of waiting for it (a copy from pageable memory
would block the host). Results come back the same way into pinned memory, with one wait at the end.
"""

from __future__ import annotations


def to_device(value, device):
    """``value`` as a tensor on ``device``; a Python scalar (a row's sequence count, read on the host
    without asking the device) stays what it is."""
    import numpy as np
    import torch

    if isinstance(value, (int, float, str)):
        return value
    if not isinstance(value, torch.Tensor):
        if device.type != "cuda" or not isinstance(value, np.ndarray):
            return torch.tensor(value).to(device)  # a copy: the object store's arrays are read-only
        staged = torch.empty(value.shape, dtype=torch.from_numpy(np.empty(0, value.dtype)).dtype, pin_memory=True)
        staged.numpy()[...] = value
        return staged.to(device, non_blocking=True)
    if device.type == "cuda" and value.device.type == "cpu":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


def batch_to_device(batch: dict, device) -> dict:
    return {k: to_device(v, device) for k, v in batch.items()}


def to_host(result: tuple) -> tuple:
    """A result's tensors as float32 CPU tensors, the copies only queued: call ``host_ready`` before use."""
    return tuple(t.float().to("cpu", non_blocking=True) for t in result)


def host_ready(device) -> None:
    """Wait until every copy ``to_host`` queued on ``device`` has landed."""
    import torch

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
