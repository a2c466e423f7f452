"""The reference-model actor: a frozen copy of the incoming model that scores batches once."""

from __future__ import annotations

from typing import Any, Callable

from rayalign.workers.base import Worker, pick_device


class ReferenceWorker(Worker):
    def __init__(self, model_path: str, num_threads: int = 1):
        super().__init__(num_threads)
        import torch
        from transformers import AutoModelForCausalLM

        self.device = pick_device()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()

    def score(self, fn: Callable[[Any, dict], Any], batches: list[dict]) -> list[Any]:
        """``fn(model, batch)`` for every batch, without gradients, results moved to CPU."""
        import torch

        out = []
        with torch.no_grad():
            for batch in batches:
                result = fn(self.model, {k: v.to(self.device) for k, v in batch.items()})
                out.append(tuple(t.float().cpu() for t in result))
        return out
