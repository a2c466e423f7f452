"""Opt-in ``compile: true``: each decoder layer of the trainers' model through ``torch.compile``.

At small hidden sizes (the 0.5B shape's 896) a layer's matmuls are short, and the elementwise work
between them (RMSNorm, the rotary embedding, SiLU-and-multiply, residual adds, dtype casts) runs as
separate kernels, each a launch and a trip through memory. Compiling a layer fuses that work, as
Liger's hand-written kernels do for a fixed list of operations.

Only the decoder layers are compiled: the output head and the loss keep their chunked paths
(training/linear_cross_entropy.py), which never hold a row's logits. Packed rows vary in length,
so shapes are dynamic: one compilation serves every row length, and every layer. (Without a KV
cache, which the trainer turns off, nothing the compiled code reads differs between layers; were
each compiled apart, torch's recompile limit would leave the layers past the eighth eager.) The
packed attention runs eagerly inside a compiled layer (training/packed_attention.py: its
conversation boundaries are host values, and the varlen kernel is one call already). The first
steps pay the compilation.
"""

from __future__ import annotations

from rayalign.errors import ConfigError
from rayalign.training.scores import hf_model


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (or one PEFT or DeepSpeed wraps): the modules of
    the classes its ``_no_split_modules`` names (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...)."""
    model = hf_model(model)
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_decoder_layers(model, where: str = "compile") -> int:
    """Compile each decoder layer of ``model`` in place (lazily: on its first call); how many."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(where, f"found no decoder layers to compile in {type(hf_model(model)).__name__} "
                                 "(its _no_split_modules names none)")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
