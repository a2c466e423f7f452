"""TRL is the oracle for the RL losses: the reward model's, and every policy loss (PPO/GRPO's clipped
surrogate, DAPO, GSPO, Dr. GRPO, CISPO).

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
* The other policy families are other ``loss_type`` values of the same function: ``dapo`` divides
  by the answer tokens of the whole generation batch (``num_items_in_batch``); ``dr_grpo`` by
  answers times ``max_completion_length``; ``cispo`` is ``-clamp(ratio, max=epsilon_high).detach() *
  A * logp``, token-level like ``dapo``; and ``importance_sampling_level="sequence"`` makes the
  ratio one per answer, ``exp`` of its tokens' mean log-ratio (GSPO, with ``loss_type="grpo"``).

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
from rayalign.plugins import get_plugin_manager
from rayalign_rl.config import GRPOConfig as StageConfig
from rayalign_rl.losses import ClippedPolicyLoss, rl_losses
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


def _assert_same_gradients(ours: dict[str, torch.Tensor], trl: dict[str, torch.Tensor], of_norm: float = 1e-5) -> None:
    assert ours.keys() == trl.keys()
    assert any(g.abs().max() > 0 for g in trl.values())  # the comparison is not of zeros
    # fp32 sums over packed and padded batches add up in different orders: the embedding's rows
    # gather many small terms, so allow 1e-5 absolute (the largest gradients are 0.3 to 5 here),
    # and require each parameter's whole gradient to agree to ``of_norm`` of its norm (measured:
    # 5e-7 to 2e-6 for every loss but KTO's, on 2-core CI hosts).
    for name in trl:
        torch.testing.assert_close(ours[name], trl[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert (ours[name] - trl[name]).norm() <= of_norm * trl[name].norm() + 1e-8, name


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


def _grpo_trainer(path, model, tmp_path, group: int, **loss_args) -> GRPOTrainer:
    """TRL's GRPO trainer on ``model``; ``loss_args`` are GRPOConfig's loss settings (``loss_type``,
    ``beta``, ``epsilon``, ...)."""
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=group, num_generations=group, max_completion_length=16,
                      **loss_args)
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


def _policy_batch(path, tmp_path, *, per_token: bool = False, temperature: float = 1.0, **loss_args):
    """A perturbed policy, TRL's trainer for it (``loss_args``: its loss settings), TRL's padded
    inputs for a group of 4 answers, and ``pack(indices)``: those answers as our packed row, the
    per-token inputs at their label positions."""
    group = 4
    tok = AutoTokenizer.from_pretrained(path)
    policy = _perturbed(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), 0.02, seed=1)
    trainer = _grpo_trainer(path, policy, tmp_path, group, temperature=temperature, **loss_args)
    prompt, completions = _rollouts(tok, group)
    width = max(map(len, completions))
    completion_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    prompt_ids = torch.tensor([prompt] * group)
    # Seed 1 and not 0: GSPO clips whole answers, and under seed 0 none of the four is clipped.
    g = torch.Generator().manual_seed(1)
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

    def pack(indices) -> dict:
        row = collate_packed([Tokenized(prompt + completions[k], [IGNORE_INDEX] * len(prompt) + completions[k])
                              for k in indices])
        for name, values in (("old_logps", old), ("ref_logps", ref), ("advantages", advantages)):
            full = torch.zeros(row["input_ids"].shape, dtype=torch.float32)
            start = 0
            for k in indices:
                begin, length = start + len(prompt), len(completions[k])
                full[0, begin : begin + length] = values[k, :length] if values.dim() == 2 else values[k]
                start += len(prompt) + length
            row[name] = full
        return row

    return policy, trainer, inputs, pack


def _trl_loss_and_gradients(policy, trainer, inputs):
    policy.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss, _gradients(policy)


@pytest.mark.parametrize("loss_type, aggregation, per_token, beta, kl_correction, temperature", [
    ("grpo", "sequence_mean", False, 0.04, True, 1.0),   # GRPO: sequence advantages, ratio-corrected KL
    ("grpo", "sequence_mean", False, 0.04, False, 1.0),  # GRPO as published (plain k3 KL)
    ("bnpo", "token_mean", False, 0.0, True, 0.7),       # token-level mean, tempered sampling
    ("bnpo", "token_mean", True, 0.0, True, 1.0),        # PPO: per-token (GAE) advantages
])
def test_clipped_policy_loss_matches_trl(arithmetic_model, tmp_path, loss_type, aggregation, per_token, beta,
                                         kl_correction, temperature):
    policy, trainer, inputs, pack = _policy_batch(
        arithmetic_model, tmp_path, per_token=per_token, temperature=temperature, loss_type=loss_type, beta=beta,
        epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=kl_correction)
    expected, grad_trl = _trl_loss_and_gradients(policy, trainer, inputs)

    # Ours: the group's sequences packed in one row.
    loss = ClippedPolicyLoss(clip_low=0.2, clip_high=0.28, kl_coef=beta, aggregation=aggregation,
                             kl_ratio_correction=kl_correction)
    objective = PolicyObjective(loss, kl_in_loss=beta > 0, temperature=temperature)
    policy.zero_grad()
    ours, metrics = objective(policy, pack(range(4)))
    ours.backward()
    assert abs(ours.item() - expected.item()) < TOL, (ours.item(), expected.item())
    assert 0 < metrics["clip_fraction"] < 1  # the clip was exercised
    # Same gradient too, in every parameter: the loss is the same function of the same parameters.
    _assert_same_gradients(_gradients(policy), grad_trl)


# Each policy family, built from its stage config as a run builds it, against TRL's loss_type for
# it with the settings its paper uses. TRL 1.16 has all four: GSPO is its `grpo` loss with
# sequence-level importance sampling, and its `cispo` cap (`epsilon_high`) is our 1 + clip_high.
@pytest.mark.parametrize("stage, trl", [
    ({"policy_loss": "dapo", "kl_coef": 0.0}, {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0}),
    ({"policy_loss": "gspo", "kl_coef": 0.04}, {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                                "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.04}),
    ({"policy_loss": "dr_grpo", "kl_coef": 0.0, "max_new_tokens": 16},
     {"loss_type": "dr_grpo", "epsilon": 0.2, "epsilon_high": 0.2, "beta": 0.0}),  # TRL: max_completion_length=16
    ({"policy_loss": "cispo", "kl_coef": 0.04, "clip_high": 0.2}, {"loss_type": "cispo", "epsilon_high": 1.2,
                                                                    "beta": 0.04}),
], ids=["dapo", "gspo", "dr_grpo", "cispo"])
def test_policy_loss_families_match_trl(arithmetic_model, tmp_path, stage, trl):
    cfg = StageConfig(**stage)
    loss, _ = rl_losses(get_plugin_manager().losses, cfg, "stages[0].grpo")
    policy, trainer, inputs, pack = _policy_batch(arithmetic_model, tmp_path, **trl)
    expected, grad_trl = _trl_loss_and_gradients(policy, trainer, inputs)

    # Ours: the group in two micro-batches, each weighed as the trainer weighs them in one optimizer
    # step (``split_step``: by answer tokens or by answers, the objective's ``weight``), so the
    # step-level normalisation of each family is checked too, not only its per-row arithmetic.
    objective = PolicyObjective(loss, kl_in_loss=cfg.kl_coef > 0)
    rows = [pack([0, 2]), pack([1, 3])]
    weights = [objective.weight(row) for row in rows]
    policy.zero_grad()
    parts = [objective(policy, row) for row in rows]
    ours = sum(w * part for w, (part, _) in zip(weights, parts)) / sum(weights)
    ours.backward()
    assert abs(ours.item() - expected.item()) < TOL, (ours.item(), expected.item())
    clip_fraction = sum(w * m["clip_fraction"] for w, (_, m) in zip(weights, parts)) / sum(weights)
    assert 0 < clip_fraction < 1  # the clip (or CISPO's cap) was exercised
    _assert_same_gradients(_gradients(policy), grad_trl)
