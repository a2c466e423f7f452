"""A trained model written as a Hugging Face directory that transformers and vLLM load."""

from __future__ import annotations

import os
import shutil


def save_inference_model(model, path: str, source_model_path: str, state_dict: dict | None = None) -> None:
    """``model`` (a transformers model, LoRA already merged) under ``path`` in safetensors, with the
    tokenizer and generation config of the model it was trained from."""
    from transformers import AutoTokenizer

    model.config.use_cache = True  # training switches it off for packed rows only
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    AutoTokenizer.from_pretrained(source_model_path).save_pretrained(path)
    src = os.path.join(source_model_path, "generation_config.json")
    if os.path.exists(src) and not os.path.exists(os.path.join(path, "generation_config.json")):
        shutil.copy(src, path)
