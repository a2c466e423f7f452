"""QLoRA (Dettmers et al. 2023): a frozen 4-bit NF4 base model (bitsandbytes) with trainable LoRA adapters.

A training stage with ``qlora: {r: 16, ...}`` gets this instead of a full-precision base: linear
layers are stored in 4 bits with double-quantised scales and computed in bf16; embeddings, norms
and the LoRA adapters stay in higher precision, and DeepSpeed (ZeRO-2 at most: ZeRO-3 cannot shard
4-bit weights) trains the adapters only. The stage's output is

- ``model/adapter/``: the LoRA adapter (peft format; vLLM serves it with ``--enable-lora`` over the
  original base model), and
- ``model/``: a merged bf16 model, the adapter added to the *original* bf16 weights rather than to
  their 4-bit copy, so it carries no quantisation error; transformers, vLLM and later stages load it.

Only a GPU runs it: ``training.qlora_requirements.require_gpu_for_qlora`` stops a CPU run at
validation, before any work.
"""

from __future__ import annotations

import os

# The driver-side check lives in the training layer; re-exported here, where it used to be.
from rayalign.training.qlora_requirements import NEEDS_GPU, require_gpu_for_qlora  # noqa: F401


def quantization_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_qlora_model(spec, device):
    """The 4-bit base on ``device`` with LoRA adapters of ``spec.qlora``, ready for DeepSpeed."""
    import torch

    if device.type != "cuda":
        raise RuntimeError(f"{NEEDS_GPU}; this trainer has no CUDA device")
    try:
        import bitsandbytes  # noqa: F401  (transformers loads it; fail here with a message that says why)
    except ImportError:
        raise RuntimeError(f"{NEEDS_GPU}: bitsandbytes is not installed on the trainer (pip install bitsandbytes)") from None
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        spec.model_path, quantization_config=quantization_config(), dtype=torch.bfloat16,
        device_map={"": device.index if device.index is not None else torch.cuda.current_device()},
        attn_implementation=spec.attn_implementation,
    )
    # Norms and embeddings in fp32 for stable adapters; with checkpointing, inputs that require grad.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    lora = spec.qlora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def save_qlora(peft_model, spec, path: str) -> None:
    """The adapter under ``path/adapter`` and the adapter merged into the bf16 base under ``path``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayalign.training.saving import save_inference_model

    adapter = os.path.join(path, "adapter")
    peft_model.save_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.bfloat16)  # on CPU: no GPU memory
    save_inference_model(PeftModel.from_pretrained(base, adapter).merge_and_unload(), path, spec.model_path)
