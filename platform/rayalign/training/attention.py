"""Which attention kernel a trainer loads its model with (``attn_implementation: auto``).

Every training row is packed: several sequences, position ids restarting at 0, no attention mask.
transformers detects that from the position ids. With ``sdpa`` it then builds a dense
[tokens x tokens] block-diagonal mask per row, and SDPA with an arbitrary mask falls back to
kernels that materialise the scores: the whole row squared, in time and memory. So on CUDA
``auto`` is ``rayalign_packed`` (training/packed_attention.py): torch's variable-length flash
attention over the row's sequences, no mask at all, no compilation.

flex_attention (a document block mask) was the other candidate: it compiles per row shape, and
in a probe inside the DeepSpeed trainer on one H200 it did not complete the steps the SDPA side
finished (docs/performance.md, "Where the speed comes from").

On CPU ``auto`` stays ``sdpa``: varlen flash attention is a CUDA kernel, and the tiny models the
tests train are faster through one masked SDPA call than through one call per sequence.
"""

from __future__ import annotations

AUTO = "auto"
PACKED = "rayalign_packed"
CHOICES = ("auto", "sdpa", PACKED, "flex_attention", "eager", "flash_attention_2", "flash_attention_3")


def resolve_attention(requested: str, device_type: str, model_path: str | None = None) -> str:
    """The implementation to load: ``requested`` unless it is ``auto``, which is decided above.

    ``auto`` falls back to sdpa for a model family that cannot take a registered attention
    function (its ``_supports_attention_backend`` is false), so it never turns a working config
    into a failing one.
    """
    resolved = requested
    if requested == AUTO:
        cuda = device_type == "cuda" and _varlen_available()
        supported = model_path is None or _model_supports_custom_attention(model_path)
        resolved = PACKED if cuda and supported else "sdpa"
    if resolved == PACKED:
        import rayalign.training.packed_attention  # noqa: F401  (registers the name with transformers, per process)
    return resolved


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return True


def _model_supports_custom_attention(model_path: str) -> bool:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(model_path)
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return False
    if getattr(config, "use_sliding_window", False):
        return False  # packed_attention hands sliding windows to sdpa, with the dense mask: no gain
    return bool(getattr(cls, "_supports_attention_backend", False))
