"""Summed next-token NLL straight from hidden states: head, log-softmax and their gradients in chunks.

The plain way (logits, then cross-entropy) keeps [tokens x vocabulary] logits, their fp32 copy and
the log-softmax for backward: at Qwen2's 152k vocabulary that outweighs a small model's layers.
Checkpointing the head per chunk keeps none of it but runs the head twice. Here, as in Liger's
fused linear cross-entropy (Hsu et al. 2024), each chunk's gradients are taken in the forward pass
already: the gradient of a summed NLL with respect to the logits is ``softmax - onehot`` whatever
comes after, so backward only scales what forward stored (the hidden states' gradient, [N x H],
and the head's, [V x H] in fp32). Same FLOPs as the plain way, no logits kept, no recompute.

Only for a loss that is a plain sum (or mean) of token NLLs, like SFT's; a loss that weighs each
token's log-prob by something computed later (DPO) uses ``labelled_logps`` instead. Works in fp32
and bf16 on any device; tests/test_fast_paths.py checks it against the plain way.
"""

from __future__ import annotations

import torch

from rayalign.training.losses import IGNORE_INDEX

# Logit entries per chunk (2^28: 1 GiB per fp32 temporary), so the chunk height adapts to the
# vocabulary: about 1.8k positions at 152k entries, matmuls still large enough to run at speed.
CHUNK_ELEMENTS = 1 << 28


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // max(1, vocab))


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, grads):
        need_h, need_w, need_b = grads
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = h.to(weight.dtype) @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.float()  # log-softmax in fp32, as the plain path upcasts
            valid = t != IGNORE_INDEX
            safe = t.masked_fill(~valid, 0).unsqueeze(-1)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, safe).squeeze(-1)
            total += ((lse - picked) * valid).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum NLL)/d(logits) = softmax - onehot on counted rows, 0 on ignored ones. The rows
            # are zeroed on the [rows x H] side of each product, not on the [rows x V] logits.
            probs = logits.sub_(lse.unsqueeze(-1)).exp_()
            probs.scatter_add_(-1, safe, torch.full_like(picked, -1.0).unsqueeze(-1))
            g = probs.to(weight.dtype)
            keep = valid.unsqueeze(-1)
            if need_h:
                grad_h[start:start + rows] = (g @ weight).float() * keep
            if need_w:
                grad_w += (g.t() @ (h * keep).to(weight.dtype)).float()
            if need_b:
                grad_b += valid.float() @ probs
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (grad_h, grad_w, grad_b)))
        ctx.grads, ctx.dtypes = grads, (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.grads
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_total.float()
        return ((grad_h * scale).to(h_dtype) if need_h else None,
                (grad_w * scale).to(w_dtype) if need_w else None,
                (grad_b * scale).to(w_dtype) if need_b else None,
                None, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T + bias, targets))`` over targets that are not
    ``IGNORE_INDEX``, as an fp32 scalar; ``hidden`` is [N, H], ``targets`` [N]."""
    rows = rows or chunk_rows(weight.shape[0])
    on = torch.is_grad_enabled()
    grads = (on and hidden.requires_grad, on and weight.requires_grad, on and bias is not None and bias.requires_grad)
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, rows, grads)
