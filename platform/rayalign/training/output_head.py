"""A causal LM taken apart at its output head: the decoder once, then the head where we choose.

``logits: labelled`` and the fused losses run the vocabulary projection themselves, a chunk of
labelled positions at a time, so the [tokens x vocabulary] logits never exist at once. That is
only the model's own answer when its logits are exactly ``lm_head(last_hidden_state)``: some
families scale or soft-cap them (Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``,
Granite ``logits_scaling``), so only families known to do neither are split; any other model
keeps the transformers forward with ``logits_to_keep`` (same values, less saving).

Under ZeRO-3 a weight exists only while its module's forward hooks have gathered it, and the
head's weight would be read outside that, so a ZeRO-3 engine is never split either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayalign.training.scores import hf_model

# Families whose causal-LM forward is ``lm_head(model(...).last_hidden_state)`` and nothing more.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2", "smollm3",
})


@dataclass
class SplitModel:
    backbone: torch.nn.Module  # returns ``last_hidden_state`` (after the final norm)
    head: torch.nn.Linear

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """[B, T, H] final hidden states of a (packed) batch."""
        return self.backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state


def split_output_head(model) -> SplitModel | None:
    """``model`` (a transformers causal LM, under a DeepSpeed engine and/or PEFT) as backbone and
    head, or None where that would not reproduce its logits exactly (see the module docstring)."""
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    if callable(partitioned) and partitioned():
        return None
    hf = hf_model(model)
    config = getattr(hf, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    backbone = getattr(hf, "base_model", None)
    # A head wrapped by PEFT (LoRA on lm_head) is no plain Linear: its own forward must run.
    if type(head) is not torch.nn.Linear or backbone is None or backbone is hf:
        return None
    return SplitModel(backbone, head)
