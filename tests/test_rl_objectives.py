"""The RL passes on the labelled path (the output head only at answer tokens, in chunks) equal the
full-logits path: old log-probs, entropy and raw log-probs, the reference's log-probs, and the
policy loss with every parameter's gradient, in float32 on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayalign.data.chat import tokenize_prompt
from rayalign_rl.episodes import Episode, pack, scatter
from rayalign_rl.losses import ClippedPolicyLoss
from rayalign_rl.objectives import PolicyForward, PolicyObjective, TokenLogps, answer_mask

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def row(tokenizer):
    """One packed row of three episodes (prompt + answer), with what an update reads."""
    rng = np.random.default_rng(0)
    episodes = []
    for i, (question, answer) in enumerate([("What is 2 + 3?", "5"), ("Name a colour.", "Blue, mostly."),
                                             ("Count to three.", "one two three")]):
        prompt = tokenize_prompt(tokenizer, [{"role": "user", "content": question}])
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        episodes.append(Episode(i, list(prompt), answer_ids, answer, "stop", 0, np.zeros(len(answer_ids), np.float32)))
    (packed,) = pack(episodes, max_tokens=4096, seed=0)
    per_episode = lambda scale: [rng.normal(scale=scale, size=len(episodes[i].completion_ids)).astype(np.float32)
                                 for i in packed.episodes]
    packed.batch["old_logps"] = scatter(packed, [a - 3.0 for a in per_episode(0.5)])
    packed.batch["ref_logps"] = scatter(packed, [a - 3.0 for a in per_episode(0.5)])
    packed.batch["advantages"] = scatter(packed, per_episode(1.0))
    return packed


def _at_answers(tensor: torch.Tensor, batch: dict) -> torch.Tensor:
    return tensor[answer_mask(batch)]


def test_policy_forward_labelled_equals_full_at_every_answer_token(model, row):
    with torch.no_grad():
        full = PolicyForward(TEMPERATURE, logits="full")(model, row.batch)
        labelled = PolicyForward(TEMPERATURE, logits="labelled")(model, row.batch)
    for name, a, b in zip(("logps", "entropy", "raw_logps"), full, labelled):
        assert a.shape == b.shape, name
        diff = (_at_answers(a, row.batch) - _at_answers(b, row.batch)).abs().max().item()
        assert diff < 1e-5, (name, diff)
    # the tempered and raw log-probs really differ, so the check above compares two quantities
    assert (_at_answers(full[0], row.batch) - _at_answers(full[2], row.batch)).abs().max() > 1e-2


def test_reference_logps_labelled_equal_full(model, row):
    with torch.no_grad():
        (full,) = TokenLogps(TEMPERATURE, logits="full")(model, row.batch)
        (labelled,) = TokenLogps(TEMPERATURE, logits="labelled")(model, row.batch)
    assert (_at_answers(full, row.batch) - _at_answers(labelled, row.batch)).abs().max() < 1e-5


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_policy_loss_and_every_gradient_labelled_equal_full(model, row, aggregation):
    loss = ClippedPolicyLoss(clip_low=0.2, clip_high=0.28, kl_coef=0.04, aggregation=aggregation)
    results = {}
    for mode in ("full", "labelled"):
        model.zero_grad(set_to_none=True)
        value, metrics = PolicyObjective(loss, kl_in_loss=True, temperature=TEMPERATURE, logits=mode)(model, row.batch)
        value.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (value.item(), {k: float(v) for k, v in metrics.items()}, grads)
    model.zero_grad(set_to_none=True)
    (full_loss, full_metrics, full_grads), (lab_loss, lab_metrics, lab_grads) = results["full"], results["labelled"]
    assert abs(full_loss - lab_loss) < 1e-5
    assert full_metrics.keys() == lab_metrics.keys()
    for key in full_metrics:
        assert abs(full_metrics[key] - lab_metrics[key]) < 1e-5, key
    # every trainable parameter gets a gradient on both paths, and the same one
    assert full_grads.keys() == lab_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    worst = max((full_grads[n] - lab_grads[n]).abs().max().item() for n in full_grads)
    assert worst < 1e-4, worst


def test_auto_means_full_on_cpu_rows(model, row):
    """``auto`` picks the labelled path only for rows on a GPU; on CPU it is the full path, the one
    the TRL-equivalence tests check."""
    calls = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, inp, out: calls.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    try:
        with torch.no_grad():
            TokenLogps(TEMPERATURE, logits="auto")(model, row.batch)
            TokenLogps(TEMPERATURE, logits="labelled")(model, row.batch)
    finally:
        hook.remove()
    tokens = row.batch["input_ids"].shape[1]
    answers = int(answer_mask(row.batch).sum())
    assert calls[0] == tokens  # full: the head at every position
    assert sum(calls[1:]) == answers < tokens  # labelled: only where an answer token follows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: CI is CPU-only (run on the GPU machine, docs/performance.md)")
def test_on_a_gpu_auto_takes_the_labelled_path_with_the_full_paths_loss_and_gradients(model, row):
    """On CUDA rows ``auto`` is the labelled path (what the GPU runs by default): the same loss and
    gradients as the full logits there (fp32, TF32 off)."""
    import copy

    torch.backends.cuda.matmul.allow_tf32 = False
    gpu_model = copy.deepcopy(model).cuda()
    batch = {k: v.cuda() for k, v in row.batch.items()}
    loss = ClippedPolicyLoss(clip_low=0.2, clip_high=0.28, kl_coef=0.04)
    out = {}
    for mode in ("full", "auto"):
        gpu_model.zero_grad(set_to_none=True)
        value, _ = PolicyObjective(loss, kl_in_loss=True, temperature=TEMPERATURE, logits=mode)(gpu_model, batch)
        value.backward()
        out[mode] = (value.item(), {n: p.grad.detach().clone() for n, p in gpu_model.named_parameters()})
    assert abs(out["full"][0] - out["auto"][0]) < 1e-4
    worst = max((out["full"][1][n] - out["auto"][1][n]).abs().max().item() for n in out["full"][1])
    assert worst < 1e-3, worst
    with torch.no_grad():
        full, auto = PolicyForward(TEMPERATURE, "full")(gpu_model, batch), PolicyForward(TEMPERATURE, "auto")(gpu_model, batch)
    mask = answer_mask(batch)
    for a, b in zip(full, auto):
        assert (a[mask] - b[mask]).abs().max().item() < 1e-4
