"""Opt-in Triton kernels from liger-kernel (Hsu et al. 2024): ``kernels: liger`` and SFT ``logits: fused``.

``kernels: liger`` swaps the decoder's RMSNorm, SwiGLU MLP and rotary embedding for Liger's fused
kernels in the trainer's model (``apply_liger_kernels``); the attention and the loss stay ours.
SFT's ``logits: fused`` computes the cross-entropy with Liger's fused linear cross-entropy on the
hidden states of the labelled positions (``fused_nll_sum``), with our label mask and our
token-weighted normalisation (a sum here; the objective divides by the trained tokens, and the
trainer weighs micro-batches by them).

Triton kernels need a CUDA GPU, so both refuse to start on CPU, or without liger-kernel, with one
line that says which. tests/test_fast_paths.py compares them with the reference path on a GPU.
"""

from __future__ import annotations

import inspect

import torch

from rayalign.errors import ConfigError
from rayalign.training.losses import IGNORE_INDEX
from rayalign.training.output_head import SplitModel
from rayalign.training.scores import hf_model


def liger_unavailable(device_type: str) -> str | None:
    """Why liger's kernels cannot run here, or None when they can."""
    if device_type != "cuda":
        return f"liger kernels are Triton kernels and need a CUDA GPU; this trainer runs on {device_type}"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def require_liger(device_type: str, where: str) -> None:
    reason = liger_unavailable(device_type)
    if reason:
        raise ConfigError(where, reason)


def apply_liger_kernels(model, device_type: str, where: str = "kernels") -> None:
    """Liger's RMSNorm, SwiGLU and RoPE in ``model`` (a transformers model, or one PEFT wraps)."""
    require_liger(device_type, where)
    model = hf_model(model)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(where, f"liger-kernel has no kernels for model type {model_type!r}")
    # Its cross-entropy patches replace the model's forward; our losses take the logits (or the
    # hidden states) themselves, so only the layer kernels are applied.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def fused_nll_sum(split: SplitModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ``targets`` ([N], ``IGNORE_INDEX`` where not trained) under ``split.head`` at
    ``hidden`` ([N, H]), by Liger's fused linear cross-entropy (logits never materialised)."""
    require_liger(hidden.device.type, "logits")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    options = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters:
        options["accum_dtype"] = torch.float32  # the head's gradient summed over chunks in fp32, as ours
    loss = LigerFusedLinearCrossEntropyLoss(**options)
    return loss(split.head.weight, hidden, targets, split.head.bias).float()
