"""Attention over packed rows without a dense mask: ``attn_implementation="rayalign_packed"``.

A packed row holds several conversations one after another, their position ids restarting at 0.
Transformers' SDPA path turns that into a dense (T x T) block-diagonal mask, and SDPA with an
arbitrary mask falls back to kernels that materialise the scores: on a 16k-token row that is
most of a step's time and tens of GiB. Here each conversation attends only to itself, causally:

* on CUDA in bf16/fp16, one call of torch's variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``) over the whole row, no mask at all;
* elsewhere (CPU, fp32), one causal SDPA call per conversation. It is exact, and it is the
  reference the CUDA path is tested against.

Batches that carry a padding mask (``attention_mask`` with zeros) or have no position ids go
through transformers' own SDPA path unchanged, so one model serves packed and padded callers.
Importing this module registers the name with transformers (per process: trainer actors import
it before loading a model).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "rayalign_packed"


def document_bounds(position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, int, list[int]]:
    """Cumulative conversation boundaries (int32, ``[0, e1, e2, ..., B*T]``) of the ``rows`` rows flattened
    (a single row of position ids, as transformers makes when none are given, stands for every row),
    and the longest conversation. Computed once per forward pass and kept on the tensor, since
    every layer asks for it and the longest length costs a device-to-host copy."""
    cached = getattr(position_ids, "_rayalign_bounds", None)
    if cached is not None and cached[0] == rows:
        return cached[1]
    flat = position_ids.expand(rows, -1).reshape(-1)
    starts = torch.nonzero(flat == 0).flatten().tolist()
    host = ([0] if not starts or starts[0] != 0 else []) + starts + [flat.numel()]
    bounds = torch.tensor(host, dtype=torch.int32, device=flat.device)
    longest = max(b - a for a, b in zip(host, host[1:]))
    position_ids._rayalign_bounds = (rows, (bounds, longest, host))
    return bounds, longest, host


def _varlen():
    """torch's varlen flash attention, adapted to the signature of the installed version: torch
    2.10 takes ``is_causal``; 2.11+ take ``window_size=(-1, 0)`` and can share KV heads itself."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, **kwargs):
    """``query`` is (B, Hq, T, D), ``key``/``value`` (B, Hkv, T, D); returns (B, T, Hq, D), None."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or sliding_window is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    b, hq, t, d = query.shape
    groups = hq // key.shape[1]
    bounds, longest, host = document_bounds(position_ids, b)
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, -1, d)
    v = value.transpose(1, 2).reshape(b * t, -1, d)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0:
        varlen_attn, causal, gqa = _varlen()
        extra = {"enable_gqa": True} if gqa and groups > 1 else {}
        if not gqa:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, **causal, **extra)
    else:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        pieces = []
        for start, end in zip(host, host[1:]):
            # (L, H, D) -> (1, H, L, D) for SDPA, and back.
            sl = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
            o = F.scaled_dot_product_attention(*sl, is_causal=True, scale=scaling,
                                               dropout_p=dropout if module.training else 0.0)
            pieces.append(o[0].transpose(0, 1))
        out = torch.cat(pieces)
    return out.reshape(b, t, hq, d), None


def packed_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed or unpadded rows (the attention uses the position ids); transformers'
    SDPA mask where a padding mask is given, so padded batches keep working."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


# A compiled decoder layer (training/compiled_layers.py) calls it eagerly: the boundaries are host
# values, which would break the graph anyway, and each path is one kernel call per row or conversation.
AttentionInterface.register(NAME, torch.compiler.disable(packed_attention_forward))
AttentionMaskInterface.register(NAME, packed_mask)
