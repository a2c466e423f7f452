"""What a worker process holds on its GPU, and giving back what it does not use.

Two views, because neither sees everything: torch's allocator statistics (this process's tensors
and the cached blocks it keeps for reuse), and the device's used memory (every process on the
GPU, including vLLM's sleep-mode pool, which maps memory outside torch's allocator). The device
view is polled on a background thread, so a phase's peak is the highest reading between two calls
(a spike shorter than the poll interval can slip between readings).
"""

from __future__ import annotations

import gc
import threading

POLL_INTERVAL_S = 0.02


def cuda_in_use() -> bool:
    """Whether this process has set up CUDA (only then is there anything to release or measure; a
    CPU worker on a GPU node must not create a CUDA context just to ask)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def release_cached_blocks() -> int:
    """Hand the blocks torch's caching allocator keeps but no tensor uses back to the device, so
    another process on the GPU (a waking vLLM engine) can have them. Returns the bytes this process
    still reserves (0 without CUDA)."""
    import torch

    gc.collect()  # tensors only reachable through reference cycles still hold their blocks
    if not cuda_in_use():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


class DeviceUsedSampler:
    """Polls ``total - free`` of this process's GPU and keeps the highest reading since ``take``."""

    def __init__(self, interval_s: float = POLL_INTERVAL_S):
        import torch

        self.device = torch.cuda.current_device()
        self.interval_s = interval_s
        self._peak = self._used()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="device-memory-sampler", daemon=True)
        self._thread.start()

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            used = self._used()
            with self._lock:
                self._peak = max(self._peak, used)

    def take(self) -> int:
        """The peak since the last call (now included), and start a new one from now."""
        used = self._used()
        with self._lock:
            peak, self._peak = max(self._peak, used), used
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def take_peaks(sampler: DeviceUsedSampler | None) -> dict[str, float]:
    """Bytes at their peak since the last call, and reset: this process's torch reserved and
    allocated memory, and (with a sampler) the whole device's used memory."""
    import torch

    if not cuda_in_use():
        return {}
    out = {"reserved": float(torch.cuda.max_memory_reserved()), "allocated": float(torch.cuda.max_memory_allocated())}
    torch.cuda.reset_peak_memory_stats()
    if sampler is not None:
        out["device_used"] = float(sampler.take())
    return out
