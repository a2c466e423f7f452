"""The reference-model actor: a frozen copy of the incoming model that scores batches once."""

from __future__ import annotations

from typing import Any, Callable

from rayalign.workers.base import Worker, pick_device


class ReferenceWorker(Worker):
    def __init__(self, model_path: str, num_threads: int = 1):
        super().__init__(num_threads)
        import torch
        from transformers import AutoModelForCausalLM

        from rayalign.training.attention import resolve_attention

        self.device = pick_device()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # Packed rows, as the trainers: flex_attention's document mask on a GPU (training/attention.py).
        attn = resolve_attention("auto", self.device.type, model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
        self.model = self.model.to(self.device).eval()

    def score(self, fn: Callable[[Any, dict], Any], batches: list[dict]) -> list[Any]:
        """``fn(model, batch)`` for every batch, without gradients, results moved to CPU (the copies
        queued as each batch finishes, one wait at the end: the GPU never idles between batches)."""
        import torch

        from rayalign.workers.device_batch import batch_to_device, host_ready, to_host

        with torch.no_grad():
            out = [to_host(fn(self.model, batch_to_device(batch, self.device))) for batch in batches]
        host_ready(self.device)
        return out
