"""TRL is the oracle for the RL losses: reward model, GRPO and PPO's clipped policy loss.

What TRL 1.16 computes, as read from ``trl/trainer/reward_trainer.py`` and ``grpo_trainer.py``:

* ``RewardTrainer.compute_loss``: a sequence-classification model on a right-padded batch, all
  chosen rows then all rejected rows; the reward is the score at each row's last non-pad token;
  ``-logsigmoid(r_chosen - r_rejected).mean()``.
* ``GRPOTrainer._compute_loss``: per-token log-probs of the completion under ``logits / T``;
  ``ratio = exp(logp - old_logp)``; ``-min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A)``;
  plus ``beta * (exp(ref - logp) - (ref - logp) - 1)`` when ``beta > 0``. ``loss_type="grpo"``
  averages each sequence's tokens, then sequences; ``"bnpo"`` averages all tokens of the batch.
  Advantages may be per sequence [B] (GRPO) or per token [B, T], which is PPO's clipped loss with
  GAE advantages. (TRL 1.16 has no PPOTrainer; its GRPO loss with per-token advantages is the
  same clipped surrogate, so it is the oracle for our PPO policy loss.)

Ours runs on packed rows (``rayalign_rl.objectives``); TRL's on padded batches.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

from rayalign.data.chat import Tokenized, tokenize_completion
from rayalign.data.packing import collate_packed
from rayalign.training.losses import IGNORE_INDEX
from rayalign_rl.losses import ClippedPolicyLoss
from rayalign_rl.objectives import PolicyObjective
from rayalign_rm.loss import BradleyTerryLoss
from rayalign_rm.stage import RewardObjective

TOL = 1e-5


def _gradients(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient (a copy); a parameter the loss never reached fails."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    return {n: g.detach().clone() for n, g in grads.items()}


def _assert_same_gradients(ours: dict[str, torch.Tensor], trl: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == trl.keys()
    assert any(g.abs().max() > 0 for g in trl.values())  # the comparison is not of zeros
    # fp32 sums over packed and padded batches add up in different orders: the embedding's rows
    # gather many small terms, so allow 1e-5 absolute (the largest gradients are 0.3 to 5 here),
    # and require each parameter's whole gradient to agree to 1e-5 of its norm (measured: ~1e-6).
    for name in trl:
        torch.testing.assert_close(ours[name], trl[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert (ours[name] - trl[name]).norm() <= 1e-5 * trl[name].norm() + 1e-8, name


def _perturbed(model, scale: float = 0.02, seed: int = 3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _pairs():
    return [
        {"prompt": [{"role": "user", "content": "计算 47*6"}],
         "chosen": [{"role": "assistant", "content": "所以,最终结果是282"}],
         "rejected": [{"role": "assistant", "content": "所以,最终结果是292 很长的错误答案"}]},
        {"prompt": [{"role": "user", "content": "计算 12*3"}],
         "chosen": [{"role": "assistant", "content": "把 12 拆成 10+2。最终结果是36"}],
         "rejected": [{"role": "assistant", "content": "35"}]},
        {"prompt": [{"role": "user", "content": "计算 5*5"}],
         "chosen": [{"role": "assistant", "content": "25"}],
         "rejected": [{"role": "assistant", "content": "最终结果是52"}]},
    ]


@pytest.fixture(scope="module")
def arithmetic_model() -> str:
    from rayalign.embedded import embedded_model_path

    return str(embedded_model_path(0, "arithmetic"))


def test_reward_model_loss_matches_trl(arithmetic_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(arithmetic_model)
    model = AutoModelForSequenceClassification.from_pretrained(arithmetic_model, num_labels=1, dtype=torch.float32)
    _perturbed(model.score, scale=0.5)  # a fresh head scores ~0: make the rewards differ
    model.eval()
    pairs = _pairs()
    seqs = [(tokenize_completion(tok, p["prompt"], p["chosen"], None), tokenize_completion(tok, p["prompt"], p["rejected"], None))
            for p in pairs]
    features = [{"chosen_ids": c.input_ids.tolist(), "rejected_ids": r.input_ids.tolist()} for c, r in seqs]
    args = RewardConfig(output_dir=str(tmp_path / "rm"), report_to=[], use_cpu=True, bf16=False,
                        per_device_train_batch_size=len(pairs))
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(features))
    batch = trainer.data_collator(features)
    model.zero_grad()
    expected = trainer.compute_loss(model, dict(batch))
    expected.backward()
    grad_trl = _gradients(model)
    model.zero_grad()
    # Ours: each pair packed as two sequences of one row.
    ours = []
    objective = RewardObjective(BradleyTerryLoss())
    for c, r in seqs:
        row = collate_packed([c, r])
        ours.append(objective.scores(model, row))
    chosen = torch.cat([c for c, _ in ours])
    rejected = torch.cat([r for _, r in ours])
    loss, metrics = BradleyTerryLoss()(chosen, rejected)
    loss.backward()
    assert abs(loss.item() - expected.item()) < TOL, (loss.item(), expected.item())
    assert abs(expected.item() - 0.6931) > 1e-3  # the scores really differ
    # Same gradient in every parameter, the backbone's as well as the score head's.
    _assert_same_gradients(_gradients(model), grad_trl)


def _grpo_trainer(path, model, tmp_path, loss_type: str, beta: float, temperature: float, group: int,
                  kl_correction: bool = True) -> GRPOTrainer:
    args = GRPOConfig(output_dir=str(tmp_path / f"grpo-{loss_type}"), report_to=[], use_cpu=True, bf16=False,
                      use_bias_correction_kl=kl_correction,
                      per_device_train_batch_size=group, num_generations=group, beta=beta, loss_type=loss_type,
                      temperature=temperature, epsilon=0.2, epsilon_high=0.28, max_completion_length=16)
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                          train_dataset=datasets.Dataset.from_list([{"prompt": "计算 1*2"}] * group),
                          processing_class=AutoTokenizer.from_pretrained(path))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we do not run
    return trainer


def _rollouts(tok, group: int):
    """A prompt and ``group`` completions of different lengths, as token ids."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "计算 47*6"}], add_generation_prompt=True,
                                     return_dict=False)
    texts = ["所以,最终结果是282<|end|>", "最终结果是292<|end|>", "把 47 拆成 40+7,6 拆成 6。40*6=240<|end|>", "282<|end|>"]
    return prompt, [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:group]]


@pytest.mark.parametrize("loss_type, aggregation, per_token, beta, kl_correction, temperature", [
    ("grpo", "sequence_mean", False, 0.04, True, 1.0),   # GRPO: sequence advantages, ratio-corrected KL
    ("grpo", "sequence_mean", False, 0.04, False, 1.0),  # GRPO as published (plain k3 KL)
    ("bnpo", "token_mean", False, 0.0, True, 0.7),       # token-level mean, tempered sampling
    ("bnpo", "token_mean", True, 0.0, True, 1.0),        # PPO: per-token (GAE) advantages
])
def test_clipped_policy_loss_matches_trl(arithmetic_model, tmp_path, loss_type, aggregation, per_token, beta,
                                         kl_correction, temperature):
    group = 4
    tok = AutoTokenizer.from_pretrained(arithmetic_model)
    policy = _perturbed(AutoModelForCausalLM.from_pretrained(arithmetic_model, dtype=torch.float32), 0.02, seed=1)
    trainer = _grpo_trainer(arithmetic_model, policy, tmp_path, loss_type, beta, temperature, group, kl_correction)
    prompt, completions = _rollouts(tok, group)
    width = max(map(len, completions))
    completion_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    prompt_ids = torch.tensor([prompt] * group)
    g = torch.Generator().manual_seed(0)
    # "Old" and reference log-probs: the current ones moved by noise, so ratios differ from 1 and
    # some get clipped on either side.
    with torch.no_grad():
        logits = policy(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, len(prompt) - 1 : -1] / temperature
        current = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    old = current + 0.3 * torch.randn(current.shape, generator=g)
    ref = current + 0.2 * torch.randn(current.shape, generator=g)
    advantages = torch.randn((group, width) if per_token else (group,), generator=g)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    policy.train()
    expected = trainer._compute_loss(trainer.model, inputs)

    # Ours: the group's sequences packed in one row, per-token inputs at their label positions.
    seqs = [Tokenized(prompt + c, [IGNORE_INDEX] * len(prompt) + c) for c in completions]
    row = collate_packed(seqs)
    for name, values in (("old_logps", old), ("ref_logps", ref), ("advantages", advantages)):
        full = torch.zeros(row["input_ids"].shape, dtype=torch.float32)
        start = 0
        for k, c in enumerate(completions):
            begin = start + len(prompt)
            full[0, begin : begin + len(c)] = values[k, : len(c)] if values.dim() == 2 else values[k]
            start += len(prompt) + len(c)
        row[name] = full
    loss = ClippedPolicyLoss(clip_low=0.2, clip_high=0.28, kl_coef=beta, aggregation=aggregation,
                             kl_ratio_correction=kl_correction)
    objective = PolicyObjective(loss, kl_in_loss=beta > 0, temperature=temperature)
    ours, metrics = objective(policy, row)
    assert abs(ours.item() - expected.item()) < TOL, (ours.item(), expected.item())
    assert 0 < metrics["clip_fraction"] < 1  # the clip was exercised
    # Same gradient too, in every parameter: the loss is the same function of the same parameters.
    policy.zero_grad()
    ours.backward()
    grad_ours = _gradients(policy)
    policy.zero_grad()
    trainer._compute_loss(trainer.model, inputs).backward()
    _assert_same_gradients(grad_ours, _gradients(policy))
