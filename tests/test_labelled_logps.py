"""``logits: labelled`` (training/labelled_logps.py): the head runs only where a label follows, the
log-softmax in checkpointed chunks, and SFT and DPO get the same losses and gradients as on the
full logits."""

from __future__ import annotations

import pytest
import torch

from rayalign.data.chat import tokenize_completion, tokenize_conversation
from rayalign.data.packing import collate_packed
from rayalign.data.synthetic import SyntheticWorld
from rayalign.training.labelled_logps import labelled_sequence_logps, labelled_token_logps, token_logps_of
from rayalign.training.losses import IGNORE_INDEX, sequence_logps, shifted_token_logps
from rayalign_dpo.losses import SigmoidDPOLoss
from rayalign_dpo.orpo import ORPOLoss
from rayalign_dpo.stage import DPOObjective, with_chosen_prompts
from rayalign_sft.loss import CrossEntropyLoss
from rayalign_sft.stage import SFTObjective


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def sft_batch(tokenizer) -> dict:
    examples = SyntheticWorld(0).chat_examples()[:6]
    return collate_packed([tokenize_conversation(tokenizer, e["messages"], 256) for e in examples])


@pytest.fixture(scope="module")
def dpo_sequences(tokenizer) -> list:
    pairs = SyntheticWorld(0).preference_pairs()[:3]
    seqs = []
    for p in pairs:
        prompt = [{"role": "user", "content": p["prompt"]}]
        for answer in (p["chosen"], p["rejected"]):
            seqs.append(tokenize_completion(tokenizer, prompt, [{"role": "assistant", "content": answer}], None))
    return seqs


@pytest.fixture(scope="module")
def dpo_batch(dpo_sequences) -> dict:
    return collate_packed(dpo_sequences)


def _head_positions(m, inp, out) -> int:
    """Positions the output head ran at: its input is [B, T, H] from the model, [N, H] in chunks."""
    return inp[0].reshape(-1, inp[0].shape[-1]).shape[0]


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _same_grads(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst < atol, worst


def test_token_logps_equal_the_full_log_softmax_at_the_labelled_positions(model, sft_batch):
    with torch.no_grad():
        full_logits = model(input_ids=sft_batch["input_ids"], position_ids=sft_batch["position_ids"], use_cache=False).logits
        full, mask = shifted_token_logps(full_logits, sft_batch["labels"])
        scored = labelled_token_logps(model, sft_batch, chunk=7)  # chunks that do not divide the row
    assert scored.positions.tolist() == mask[0].nonzero().squeeze(-1).tolist()
    assert 0 < scored.positions.numel() < mask.shape[1]  # prompts are skipped, answers kept
    assert torch.equal(scored.mask, mask[:, scored.positions])
    assert torch.allclose(scored.logps, full[:, scored.positions], atol=1e-6)


def test_the_head_runs_only_where_a_label_follows(model, sft_batch):
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: seen.append(_head_positions(*a)))
    try:
        with torch.no_grad():
            scored = labelled_token_logps(model, sft_batch)
    finally:
        hook.remove()
    assert seen == [scored.positions.numel()]
    assert seen[0] < sft_batch["input_ids"].shape[1]


def test_rows_with_different_labels_share_positions_and_mask_the_rest(model, tokenizer):
    examples = SyntheticWorld(0).chat_examples()[:2]
    a, b = (tokenize_conversation(tokenizer, e["messages"], 256) for e in examples)
    assert len(a) != len(b)
    width = max(len(a), len(b))

    def row(t):  # right-padded rows: a plain (not packed) batch of two
        pad = width - len(t)
        return t.input_ids.tolist() + [0] * pad, t.labels.tolist() + [IGNORE_INDEX] * pad

    ids, labels = zip(*(row(t) for t in (a, b)))
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
             "position_ids": torch.arange(width).expand(2, width)}
    with torch.no_grad():
        full, mask = shifted_token_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        scored = labelled_token_logps(model, batch)
    assert torch.equal(scored.mask, mask[:, scored.positions])
    assert torch.allclose(scored.logps, full[:, scored.positions], atol=1e-6)
    assert torch.allclose(scored.logps.sum(1), full.sum(1), atol=1e-5)


def test_a_model_without_logits_to_keep_gives_the_same_log_probs(model, sft_batch):
    class Plain(torch.nn.Module):  # a forward with no logits_to_keep parameter
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, use_cache):
            return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)

    with torch.no_grad():
        assert torch.allclose(labelled_token_logps(Plain(model), sft_batch).logps,
                              labelled_token_logps(model, sft_batch).logps, atol=1e-6)


def test_chunked_checkpointed_logps_have_the_gradient_of_the_plain_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    token_logps_of(logits, targets, chunk=8).sum().backward()
    chunked = logits.grad.clone()
    logits.grad = None
    torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).sum().backward()
    assert torch.allclose(chunked.float(), logits.grad.float(), atol=1e-2)  # bf16 gradients
    assert token_logps_of(logits[:0], targets[:0]).shape == (0,)


def test_sft_loss_and_gradients_match_the_full_logits(model, sft_batch):
    loss_full, m_full = SFTObjective(CrossEntropyLoss())(model, sft_batch)
    loss_full.backward()
    full = _grads(model)
    loss_lab, m_lab = SFTObjective(CrossEntropyLoss(), labelled=True)(model, sft_batch)
    loss_lab.backward()
    assert abs(loss_lab.item() - loss_full.item()) < 1e-6 and m_lab["count"] == m_full["count"]
    _same_grads(_grads(model), full, 1e-6)


def test_dpo_loss_gradients_and_reference_logps_match_the_full_logits(model, dpo_batch):
    num = int(dpo_batch["sequence_ids"].max()) + 1
    with torch.no_grad():
        logits = model(input_ids=dpo_batch["input_ids"], position_ids=dpo_batch["position_ids"], use_cache=False).logits
        want = sequence_logps(logits, dpo_batch["labels"], dpo_batch["sequence_ids"], num)
        got = labelled_sequence_logps(model, dpo_batch, num)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])
        ref = DPOObjective(SigmoidDPOLoss(beta=0.1), labelled=True).logps(model, dpo_batch)
    batch = {**dpo_batch, "ref_chosen": ref[0] + 0.3, "ref_rejected": ref[1] - 0.2}  # a non-zero margin
    results = []
    for labelled in (False, True):
        loss, metrics = DPOObjective(SigmoidDPOLoss(beta=0.1), sft_weight=0.5, labelled=labelled)(model, batch)
        loss.backward()
        results.append((loss.item(), metrics["chosen_nll"], _grads(model)))
    (loss_f, nll_f, g_f), (loss_l, nll_l, g_l) = results
    assert abs(loss_f - loss_l) < 1e-6 and abs(nll_f - nll_l) < 1e-6
    _same_grads(g_l, g_f, 1e-6)


def test_orpo_with_the_chosen_prompts_nll_matches_the_full_logits(model, dpo_sequences):
    # ORPO's rows also label the chosen prompts (with_chosen_prompts): the labelled path scores them too.
    zeros = torch.zeros(len(dpo_sequences) // 2)
    row = {**collate_packed(dpo_sequences), **with_chosen_prompts(dpo_sequences), "ref_chosen": zeros,
           "ref_rejected": zeros}
    results = []
    for labelled in (False, True):
        loss, metrics = DPOObjective(ORPOLoss(beta=0.1), labelled=labelled)(model, row)
        loss.backward()
        results.append((loss.item(), metrics["orpo_nll"].item(), _grads(model)))
    (loss_f, nll_f, g_f), (loss_l, nll_l, g_l) = results
    assert abs(loss_f - loss_l) < 1e-6 and abs(nll_f - nll_l) < 1e-6
    _same_grads(g_l, g_f, 1e-6)


def test_configs_that_need_the_logits_refuse_labelled(tiny_model_path):
    from rayalign.config import RunConfig
    from rayalign.errors import ConfigError
    from rayalign.plugins import get_plugin_manager
    from rayalign_dpo.stage import DPOStage
    from rayalign_sft.stage import SFTStage
    from rayalign.stage import Artifacts

    class NeedsLogits(CrossEntropyLoss):
        name = "needs_logits"
        needs_logits = True

    plugins = get_plugin_manager()
    run = RunConfig.model_validate({"model": tiny_model_path, "stages": [{"sft": {}}]})
    sft = SFTStage(SFTStage.Config(loss="sft", logits="labelled"))
    plugins.losses.add("needs_logits", NeedsLogits, "test")
    try:
        sft.config = SFTStage.Config(loss="needs_logits", logits="labelled")
        with pytest.raises(ConfigError, match=r"stages\[0\]\.sft\.logits: 'labelled' needs a loss"):
            sft.prepare(run, plugins, Artifacts(model=tiny_model_path), 0)
    finally:
        plugins.losses.drop_plugin("test")
    dpo = DPOStage(DPOStage.Config(unlikelihood=1.0, logits="labelled"))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.dpo\.logits: 'labelled' cannot serve unlikelihood"):
        dpo.prepare(run, plugins, Artifacts(model=tiny_model_path), 1)


@pytest.mark.slow
def test_an_sft_stage_on_deepspeed_takes_the_same_first_step_either_way(tmp_path):
    """Through the real pipeline (DeepSpeed ZeRO-2 trainer actor, fp32 on CPU): the engine passes
    ``logits_to_keep`` through, and the first step's loss is the full-logits one."""
    from rayalign.testing import run_stage, start_local_ray

    start_local_ray()
    options = {"epochs": 1, "max_length": 128, "bf16": False}
    full = run_stage("sft", options, tmp_path=tmp_path / "full")
    labelled = run_stage("sft", {**options, "logits": "labelled"}, tmp_path=tmp_path / "labelled")
    first_full, first_lab = full.metrics["history"][0]["loss"], labelled.metrics["history"][0]["loss"]
    assert abs(first_full - first_lab) < 1e-5, (first_full, first_lab)
    assert len(labelled.metrics["history"]) == len(full.metrics["history"])
    assert abs(labelled.metrics["eval_loss"] - full.metrics["eval_loss"]) < 1e-3


def test_a_lora_model_passes_logits_to_keep_through_peft(tiny_model_path, sft_batch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    seen = []
    hook = lora.get_output_embeddings().register_forward_hook(lambda *a: seen.append(_head_positions(*a)))
    try:
        full, _ = SFTObjective(CrossEntropyLoss())(lora, sft_batch)
        scored = labelled_token_logps(lora, sft_batch)
    finally:
        hook.remove()
    assert seen[1] < seen[0] == sft_batch["input_ids"].shape[1]  # the PEFT wrapper kept the head's input short
    assert abs(full.item() + scored.logps.sum().item() / scored.mask.sum().item()) < 1e-6
    # The SFT loss itself takes the head's weight straight from under the PEFT wrapper.
    labelled, _ = SFTObjective(CrossEntropyLoss(), labelled=True)(lora, sft_batch)
    assert abs(full.item() - labelled.item()) < 1e-6
