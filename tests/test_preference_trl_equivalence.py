"""TRL is the oracle for the preference losses beyond DPO: ORPO, SimPO and KTO equal TRL 1.16's
on the same tiny model and batch, loss and every parameter's gradient, within 1e-5 in fp32 on CPU.

What TRL 1.16 computes, as read from ``trl/experimental/orpo/orpo_trainer.py``,
``trl/experimental/cpo/cpo_trainer.py`` and ``trl/trainer/kto_trainer.py``:

* ORPO (``ORPOTrainer.get_batch_loss_metrics``): per-answer *mean* log-probs ``pc``, ``pr`` over the
  completion tokens; ``log_odds = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr))``;
  ``loss = nll - mean(beta * logsigmoid(log_odds))`` where ``nll`` is one cross-entropy mean over
  every non-pad token of the chosen rows after the shift, prompt included ("orpo chosen nll loss is
  computed over the full prompt and response"). No reference model.
* SimPO (``CPOTrainer`` with ``loss_type="simpo"``): mean log-probs; ``-logsigmoid(beta * (pc - pr)
  - simpo_gamma)`` (its ``label_smoothing`` 0), mean over pairs, plus ``cpo_alpha * nll`` with ``nll``
  one cross-entropy mean over the chosen answers' tokens (SimPO as published has none: 0; our
  ``sft_weight`` is that term). No reference model.
* KTO (``KTOTrainer._compute_loss``): per-example *summed* completion log-probs of policy and
  reference; the KL estimate is ``mean(policy - reference)`` on the batch's mismatched sequences
  (prompt i with completion i-1, cyclically), detached and clamped at 0; desirable examples lose
  ``1 - sigmoid(beta * (ratio - kl))``, undesirable ones ``1 - sigmoid(beta * (kl - ratio))``, each
  times its weight, and the loss is their mean over the batch.

ORPO and SimPO take TRL's own padded batch built from our tokenization (they need string prompts
to tokenize themselves) and run TRL's methods on a trainer object holding only the attributes
those methods read; KTO builds the real ``KTOTrainer``, whose tokenization is checked against ours.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer
from trl import KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from rayalign.data.chat import tokenize_completion
from rayalign.data.packing import collate_packed
from rayalign.embedded import embedded_model_path
from rayalign.training.losses import IGNORE_INDEX
from rayalign_dpo.kto import KTOLoss
from rayalign_dpo.kto_stage import KTOObjective, mismatched
from rayalign_dpo.orpo import ORPOLoss
from rayalign_dpo.simpo import SimPOLoss
from rayalign_dpo.stage import DPOObjective, with_chosen_prompts
from test_rl_trl_equivalence import _assert_same_gradients, _gradients
from test_trl_equivalence import MAX_LENGTH, load_model, preference_examples

TOL = 1e-5


@pytest.fixture(scope="module")
def model_path():
    return embedded_model_path(seed=0)


@pytest.fixture(scope="module")
def pairs():
    from rayalign.data.synthetic import SyntheticWorld

    return preference_examples(SyntheticWorld(seed=0), n=4)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


def trl_pair_batch(tokenizer, pairs) -> dict[str, torch.Tensor]:
    """ORPO's and CPO's padded batch (``tokenize_row`` then their collator) from our tokenization."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [tokenize_completion(tokenizer, p["prompt"], p[side], MAX_LENGTH) for p in pairs]
        batch[f"{side}_input_ids"] = _pad([s.input_ids for s in seqs], tokenizer.pad_token_id)
        batch[f"{side}_attention_mask"] = _pad([[1] * len(s) for s in seqs], 0)
        batch[f"{side}_labels"] = _pad([s.labels for s in seqs], IGNORE_INDEX)
    return batch


def our_pair_row(tokenizer, pairs, chosen_prompts: bool) -> dict[str, torch.Tensor]:
    """Every pair in one packed row, chosen then rejected, as the dpo stage packs it."""
    seqs = [tokenize_completion(tokenizer, p["prompt"], p[side], MAX_LENGTH) for p in pairs
            for side in ("chosen", "rejected")]
    row = collate_packed(seqs)
    row["num_sequences"] = len(seqs)
    if chosen_prompts:
        row.update(with_chosen_prompts(seqs))
    row["ref_chosen"] = row["ref_rejected"] = torch.zeros(len(pairs))  # a reference-free loss gets zeros
    return row


def bare_trainer(cls, **attrs):
    """A ``cls`` object on which only ``attrs`` are set (``__init__`` not run): enough for the loss
    methods, which read just these, without the trainer's own tokenization of string prompts."""
    trainer = cls.__new__(cls)
    defaults = dict(is_encoder_decoder=False, aux_loss_enabled=False, accelerator=Accelerator(cpu=True))
    for name, value in {**defaults, **attrs}.items():
        setattr(trainer, name, value)
    return trainer


def loss_and_gradients(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = _gradients(model)
    model.zero_grad()
    return loss.detach(), grads


def ours_with_gradients(model, objective, row) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Our objective on ``row``: the loss, every parameter's gradient, and the loss's metrics."""
    metrics = {}

    def compute():
        loss, m = objective(model, row)
        metrics.update(m)
        return loss

    return (*loss_and_gradients(model, compute), metrics)


@pytest.mark.parametrize("prompt_nll", [True, False])
def test_orpo_matches_trl(model_path, pairs, prompt_nll):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    policy = load_model(model_path, noise=0.02)
    beta = 0.25
    trainer = bare_trainer(ORPOTrainer, beta=beta, padding_value=tokenizer.pad_token_id)
    batch = trl_pair_batch(tokenizer, pairs)
    expected, grad_trl = loss_and_gradients(policy, lambda: trainer.get_batch_loss_metrics(policy, dict(batch))[0])

    objective = DPOObjective(ORPOLoss(beta=beta, prompt_nll=prompt_nll), logits="full")
    row = our_pair_row(tokenizer, pairs, chosen_prompts=prompt_nll)
    loss, grad_ours, metrics = ours_with_gradients(policy, objective, row)
    if prompt_nll:  # TRL's loss, term for term
        assert abs(loss.item() - expected.item()) < TOL, (loss.item(), expected.item())
        _assert_same_gradients(grad_ours, grad_trl)
    else:  # the answers-only NLL TRL does not offer: its loss with the NLL over the answer tokens instead
        with torch.no_grad():
            chosen_nll_trl = trainer.concatenated_forward(policy, dict(batch))[4]
            logits = policy(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
            answers = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["chosen_labels"][:, 1:].flatten())
        assert abs(loss.item() - (expected - chosen_nll_trl + answers).item()) < TOL
        assert abs(chosen_nll_trl.item() - answers.item()) > 1e-2  # the two NLLs differ measurably here
    assert metrics["odds_ratio_loss"] > 0 and metrics["orpo_nll"] > 0


@pytest.mark.parametrize("cpo_alpha", [0.0, 0.5])  # SimPO as published; with CPO's NLL, our sft_weight
def test_simpo_matches_trl_cpo(model_path, pairs, cpo_alpha):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    policy = load_model(model_path, noise=0.02)
    beta, gamma = 2.0, 0.8
    trainer = bare_trainer(CPOTrainer, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=0.0,
                           alpha=0.0, cpo_alpha=cpo_alpha, pad_token_id=tokenizer.pad_token_id)
    batch = trl_pair_batch(tokenizer, pairs)
    expected, grad_trl = loss_and_gradients(policy, lambda: trainer.get_batch_loss_metrics(policy, dict(batch))[0])

    objective = DPOObjective(SimPOLoss(beta=beta, gamma=gamma), logits="full", sft_weight=cpo_alpha)
    row = our_pair_row(tokenizer, pairs, chosen_prompts=False)
    loss, grad_ours, _ = ours_with_gradients(policy, objective, row)
    assert abs(loss.item() - expected.item()) < TOL, (loss.item(), expected.item())
    _assert_same_gradients(grad_ours, grad_trl)
    # gamma matters: without it the loss is another number.
    no_margin, _ = DPOObjective(SimPOLoss(beta=beta, gamma=0.0), logits="full")(policy, row)
    assert abs(no_margin.item() - expected.item()) > 1e-2


def unpaired_examples(pairs) -> list[dict]:
    """Each pair as a desirable and an undesirable example, interleaved so both labels share a batch."""
    return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


def test_kto_matches_trl(model_path, pairs, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = unpaired_examples(pairs)[:5]  # 3 desirable, 2 undesirable: the weights do not cancel
    beta, desirable_weight, undesirable_weight = 0.5, 1.3, 0.7
    # The reference perturbed (seed 3): its mismatched log-probs fall below the policy's on average,
    # so the KL estimate is positive (0.34 here) and the clamp leaves it; the ratios take both signs.
    policy, ref = load_model(model_path), load_model(model_path, noise=0.02, seed=3)

    # Ours first: the trainer patches the models' forward (its fused LM head) when it is built.
    seqs = [tokenize_completion(tokenizer, e["prompt"], e["completion"], MAX_LENGTH) for e in examples]
    # TRL's rotation: example i is scored beside its prompt with completion i-1 (cyclically).
    row = collate_packed([s for i, seq in enumerate(seqs) for s in (seq, mismatched(seq, seqs[i - 1]))])
    row["num_sequences"] = 2 * len(seqs)
    row["desirable"] = torch.tensor([e["label"] for e in examples])
    loss_fn = KTOLoss(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    objective = KTOObjective(loss_fn, logits="full")
    with torch.no_grad():
        row["ref_logps"], row["ref_kl_logps"] = objective.logps(ref, row)
    loss, grad_ours, metrics = ours_with_gradients(policy, objective, row)

    args = KTOConfig(output_dir=str(tmp_path / "kto"), report_to=[], use_cpu=True, bf16=False, beta=beta,
                     desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                     max_length=MAX_LENGTH, per_device_train_batch_size=len(examples))
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(examples))
    ds = trainer.train_dataset
    features = [{k: ds[i][k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")}
                for i in range(len(ds))]
    for seq, f, g in zip(seqs, features, features[-1:] + features[:-1]):  # same tokens, same rotation
        assert seq.input_ids.tolist() == f["prompt_ids"] + f["completion_ids"]
        assert seq.labels.tolist() == [IGNORE_INDEX] * len(f["prompt_ids"]) + f["completion_ids"]
        assert f["KL_completion_ids"] == g["completion_ids"]
    batch = trainer.data_collator(features)
    expected, grad_trl = loss_and_gradients(policy, lambda: trainer._compute_loss(policy, dict(batch), False))

    assert abs(loss.item() - expected.item()) < TOL, (loss.item(), expected.item())
    # KTO's ratios are whole-sequence log-prob sums less a batch KL estimate of the same size, so
    # fp32 rounding weighs more here: 1.0e-5 of the norm measured on one 2-core host, past the other
    # losses' bound. 1e-4 is the bound the fast paths' gradients are held to.
    _assert_same_gradients(grad_ours, grad_trl, of_norm=1e-4)
    assert abs(metrics["kl"].item() - trainer._metrics["eval"]["kl"][-1]) < TOL
    assert metrics["kl"] > 0  # the reference point is exercised, not clamped away
