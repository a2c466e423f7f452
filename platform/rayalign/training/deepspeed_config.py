"""The DeepSpeed config a trainer rank starts with, and the optimizer it wraps.

On CPU (tests, CI) it is DeepSpeed's defaults plus what training needs. On CUDA:

- ZeRO reduces gradients in buckets of ``BUCKET_ELEMENTS`` into one contiguous buffer
  (``contiguous_gradients``: no fragmentation as grads are freed). DeepSpeed's default bucket
  (5e8) holds a whole 0.5B model, so nothing could overlap; 2e8 leaves a few buckets to reduce
  while backward computes the next (``overlap_comm``, on with more than one rank: one GPU has
  nothing to overlap, and overlapping doubles the buckets' memory). The memory planner budgets
  DeepSpeed's default bucket twice, so this stays inside its promise.
- AdamW is torch's fused kernel (one launch for all parameters instead of several per tensor);
  under ZeRO it steps the fp32 master partitions, which live on the GPU.
"""

from __future__ import annotations

BUCKET_ELEMENTS = 200_000_000


def deepspeed_config(zero_stage: int, grad_accum: int, max_grad_norm: float, bf16: bool, world_size: int,
                     on_cuda: bool) -> dict:
    zero: dict = {"stage": zero_stage}
    if on_cuda:
        zero.update(contiguous_gradients=True, overlap_comm=world_size > 1,
                    reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
    return {
        "train_micro_batch_size_per_gpu": 1,  # one packed row per micro-batch
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def adamw(params, lr: float, weight_decay: float, on_cuda: bool):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if on_cuda else {}))
