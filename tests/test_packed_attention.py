"""``attn_implementation="rayalign_packed"`` (training/packed_attention.py): packed rows attend per
conversation without a dense mask, and give what transformers' own SDPA path and unpacked
sequences give; padded batches fall through to SDPA unchanged."""

from __future__ import annotations

import pytest
import torch

from rayalign.data.chat import tokenize_conversation
from rayalign.data.packing import collate_packed
from rayalign.data.synthetic import SyntheticWorld
from rayalign.training import packed_attention
from rayalign_sft.loss import CrossEntropyLoss
from rayalign_sft.stage import SFTObjective


def _model(path: str, attn: str, device: str = "cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)


@pytest.fixture(scope="module")
def packed(tokenizer) -> dict:
    examples = SyntheticWorld(0).chat_examples()[:8]
    return collate_packed([tokenize_conversation(tokenizer, e["messages"], 256) for e in examples])


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    loss, _ = SFTObjective(CrossEntropyLoss())(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_packed_row_equals_the_dense_mask_path_in_loss_and_every_gradient(tiny_model_path, packed):
    assert int((packed["position_ids"] == 0).sum()) == 8  # eight conversations in one row
    ref_loss, ref_grads = _loss_and_grads(_model(tiny_model_path, "sdpa"), packed)
    loss, grads = _loss_and_grads(_model(tiny_model_path, packed_attention.NAME), packed)
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) < 1e-4


def test_packed_row_equals_each_conversation_run_alone(tiny_model_path, packed):
    model = _model(tiny_model_path, packed_attention.NAME)
    ids, pos = packed["input_ids"], packed["position_ids"]
    with torch.no_grad():
        whole = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        starts = torch.nonzero(pos[0] == 0).flatten().tolist() + [ids.shape[1]]
        alone = [model(input_ids=ids[:, a:b], use_cache=False).logits[0] for a, b in zip(starts, starts[1:])]
    assert (whole - torch.cat(alone)).abs().max().item() < 1e-5


def test_conversation_bounds_are_computed_once_per_forward(packed):
    pos = packed["position_ids"]
    bounds, longest, host = packed_attention.document_bounds(pos, 1)
    assert host[0] == 0 and host[-1] == pos.shape[1] and len(host) == 9
    assert longest == max(b - a for a, b in zip(host, host[1:]))
    assert bounds.dtype == torch.int32 and bounds.tolist() == host
    assert packed_attention.document_bounds(pos, 1)[0] is bounds  # kept on the tensor for the next layer


def test_padded_batches_go_through_sdpa_unchanged(tiny_model_path):
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 10:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    with torch.no_grad():
        ref = _model(tiny_model_path, "sdpa")(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = _model(tiny_model_path, packed_attention.NAME)(input_ids=ids, attention_mask=mask, use_cache=False).logits
        plain_ref = _model(tiny_model_path, "sdpa")(input_ids=ids, use_cache=False).logits
        plain = _model(tiny_model_path, packed_attention.NAME)(input_ids=ids, use_cache=False).logits
    keep = mask.bool()
    assert (ref[keep] - got[keep]).abs().max().item() < 1e-5
    assert (plain_ref - plain).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch's varlen flash attention runs only there")
def test_varlen_flash_path_matches_the_per_conversation_reference_on_gpu(tiny_model_path, packed):
    """bf16 varlen flash attention against the exact per-conversation SDPA path in fp32."""
    batch = {k: v.cuda() for k, v in packed.items()}
    fast = _model(tiny_model_path, packed_attention.NAME, "cuda", torch.bfloat16)
    exact = _model(tiny_model_path, packed_attention.NAME, "cuda", torch.float32)
    fast_loss, fast_grads = _loss_and_grads(fast, batch)
    ref_loss, ref_grads = _loss_and_grads(exact, batch)
    assert abs(fast_loss - ref_loss) < 2e-2 * abs(ref_loss)
    cos = [torch.nn.functional.cosine_similarity(fast_grads[n].float().flatten(), ref_grads[n].flatten(), dim=0).item()
           for n in ref_grads if ref_grads[n].norm() > 0]
    assert min(cos) > 0.99, min(cos)
