"""TRL is the oracle: our SFT and DPO losses equal TRL's on the same tiny model and batch (1e-4).

What TRL 1.16 does, as read from ``trl/trainer/sft_trainer.py`` and ``dpo_trainer.py``:

* SFT (``SFTTrainer.compute_loss``): the model runs with a fused LM head that returns the log-prob
  of each shifted label; the loss is ``-sum(log_probs) / num_tokens`` where ``num_tokens`` is the
  number of trained (label != -100, after the shift) tokens in the micro-batch, or, inside
  ``Trainer.training_step``, ``num_items_in_batch``: the trained tokens of *all* micro-batches of
  the optimizer step (and of all ranks, with ``average_tokens_across_devices``). So it is one
  token-level mean over the whole step, not a mean of per-sequence or per-micro-batch means.
* SFT masks: with ``assistant_only_loss=True`` on conversational data TRL asks the tokenizer for
  ``assistant_masks``, which needs ``{% generation %}`` markers in the chat template. Our template
  has none, and TRL only knows how to patch a fixed list of hub templates, so it raises
  ("not training-compatible"). We hand TRL our template with markers added (rendering the exact
  same text, checked below), so TRL derives its mask independently of ``tokenize_conversation``.
  Its padding-free collator also sets the label at every sequence start (position 0) to -100.
* DPO (``DPOTrainer._compute_loss``): per-sequence log-probs are *sums* over completion tokens
  (prompt = chat template with the generation prompt, completion = the rest, ``<|end|>`` included);
  sigmoid is ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))``, mean over pairs. IPO divides each
  policy/ref log-ratio by its completion length, i.e. ``((pc - rc)/nc - (pr - rr)/nr - 1/(2 beta))^2``,
  which is our IPO margin on mean log-probs.

Packed forwards must pass ``use_cache=False``: with the config's default ``use_cache=True``,
transformers creates a ``DynamicCache`` and then skips the packed-sequence detection from
``position_ids`` (``masking_utils._preprocess_mask_arguments`` only looks when
``past_key_values is None``), so sequences in one row silently attend to each other.
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from rayalign.data.chat import Tokenized, tokenize_completion, tokenize_conversation
from rayalign.data.formats import as_messages
from rayalign.data.packing import collate_packed
from rayalign.data.synthetic import SyntheticWorld
from rayalign.embedded import CHAT_TEMPLATE, embedded_model_path
from rayalign.training.losses import IGNORE_INDEX, sequence_logps
from rayalign_dpo.losses import IPOLoss, SigmoidDPOLoss
from rayalign_sft.loss import CrossEntropyLoss

TOL = 1e-4
BETA = 0.1
MAX_LENGTH = 1024

# Our CHAT_TEMPLATE with {% generation %} around what the assistant produces: its content and
# <|end|> (the "<|assistant|>\n" header is the generation prompt, so it is context, as in ours).
MARKED_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

datasets.disable_progress_bars()


# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def model_path():
    return embedded_model_path(seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture
def world():
    # Function-scoped on purpose: chat_examples() and preference_pairs() draw from the world's one
    # rng, so a second call on the same instance returns different data.
    return SyntheticWorld(seed=0)


def load_model(path, noise: float = 0.0, seed: int = 1, attn: str = "sdpa"):
    """The tiny model in eval mode; ``noise`` perturbs every weight so a policy differs from its reference."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model


def packed_logits(model, row: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our padding-free forward: one row, position ids restarting per sequence, no attention mask.

    ``use_cache=False`` is load-bearing, see the module docstring.
    """
    with torch.no_grad():
        return model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits


def sft_batch_examples(world, n_single: int = 3, n_multi: int = 3) -> list[dict]:
    """A batch mixing one-turn and two-turn conversations (two assistant spans to mask)."""
    examples = world.chat_examples()
    single = [e for e in examples if len(e["messages"]) == 2][:n_single]
    multi = [e for e in examples if len(e["messages"]) == 4][:n_multi]
    return single + multi


def trl_sft_trainer(model_path, model, examples, tmp_path) -> SFTTrainer:
    """TRL's SFTTrainer with assistant-only loss, on our template with generation markers."""
    trl_tokenizer = AutoTokenizer.from_pretrained(model_path)
    trl_tokenizer.chat_template = MARKED_TEMPLATE
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        report_to=[],
        use_cpu=True,
        push_to_hub=False,
        bf16=False,  # TRL configs default to bf16=True, which autocasts even on CPU
        assistant_only_loss=True,
        max_length=MAX_LENGTH,
        shuffle_dataset=False,
        per_device_train_batch_size=len(examples),
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(examples), processing_class=trl_tokenizer
    )


def trl_sft_features(trainer: SFTTrainer) -> list[dict]:
    """TRL's tokenized examples, in dataset order: ``input_ids`` and ``labels`` (-100 off the assistant)."""
    ds = trainer.train_dataset
    return [{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in range(len(ds))]


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal-LM loss is taken on: labels after the one-step shift that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def trl_loss(trainer, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch), **kwargs)  # it mutates its inputs


def preference_examples(world, n: int = 4) -> list[dict]:
    """Synthetic pairs in the canonical preference form (strings -> one user / one assistant message)."""
    pairs = world.preference_pairs()[:n]
    return [
        {
            "prompt": as_messages(p["prompt"], "prompt", "user"),
            "chosen": as_messages(p["chosen"], "chosen", "assistant"),
            "rejected": as_messages(p["rejected"], "rejected", "assistant"),
        }
        for p in pairs
    ]


def our_pair_logps(model, tokenizer, pair: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Our DPO forward for one pair: chosen and rejected packed into one row -> (sums[2], counts[2])."""
    chosen = tokenize_completion(tokenizer, pair["prompt"], pair["chosen"], MAX_LENGTH)
    rejected = tokenize_completion(tokenizer, pair["prompt"], pair["rejected"], MAX_LENGTH)
    row = collate_packed([chosen, rejected])
    return sequence_logps(packed_logits(model, row), row["labels"], row["sequence_ids"], 2)


# ----------------------------------------------------------------------------------------------
# SFT


def test_marked_template_renders_exactly_like_ours(tokenizer, world):
    # Otherwise TRL's mask would be computed on different text and comparing masks would be moot.
    for example in world.chat_examples():
        for add_generation_prompt in (False, True):
            kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
            ours = tokenizer.apply_chat_template(example["messages"], chat_template=CHAT_TEMPLATE, **kwargs)
            marked = tokenizer.apply_chat_template(example["messages"], chat_template=MARKED_TEMPLATE, **kwargs)
            assert marked == ours


def test_trl_without_generation_markers_cannot_mask_our_template(model_path, world, tmp_path):
    # Why the test above exists: TRL refuses assistant_only_loss on our plain template.
    model = load_model(model_path)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True, bf16=False, assistant_only_loss=True)
    with pytest.raises(ValueError, match="not training-compatible"):
        SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(world.chat_examples()[:2]),
            processing_class=AutoTokenizer.from_pretrained(model_path),
        )


def test_trl_trains_on_exactly_our_assistant_tokens(model_path, tokenizer, world, tmp_path):
    examples = world.chat_examples()  # every conversation, one- and two-turn
    trainer = trl_sft_trainer(model_path, load_model(model_path), examples, tmp_path)
    features = trl_sft_features(trainer)
    assert len(features) == len(examples)
    for example, theirs in zip(examples, features):
        ours = tokenize_conversation(tokenizer, example["messages"], MAX_LENGTH)
        assert theirs["input_ids"] == ours.input_ids.tolist()
        assert theirs["labels"] == ours.labels.tolist()  # token by token, -100 on everything but assistant turns


def test_sft_loss_matches_trl_padded_and_packed(model_path, tokenizer, world, tmp_path):
    examples = sft_batch_examples(world)
    model = load_model(model_path)
    trainer = trl_sft_trainer(model_path, model, examples, tmp_path)
    features = trl_sft_features(trainer)
    padded = trainer.data_collator(features)  # right-padded, attention_mask, labels -100 on padding
    assert "attention_mask" in padded
    expected = trl_loss(trainer, padded)

    loss_fn = CrossEntropyLoss()
    # (a) the same padded batch through our loss.
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    padded_loss, _ = loss_fn(logits, padded["labels"])
    assert abs(padded_loss.item() - expected.item()) < TOL

    # (b) our packed row of the same sequences.
    ours = [tokenize_conversation(tokenizer, e["messages"], MAX_LENGTH) for e in examples]
    row = collate_packed(ours)
    packed_loss, _ = loss_fn(packed_logits(model, row), row["labels"])
    assert trained_tokens(row["labels"]) == sum(t.num_trained for t in ours) == trained_tokens(padded["labels"])
    assert abs(packed_loss.item() - expected.item()) < TOL

    # TRL's own padding-free collator builds the same row (labels at sequence starts included).
    trl_row = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features)
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(trl_row[key], row[key]), key
    assert abs(trl_loss(trainer, trl_row).item() - expected.item()) < TOL

    # The batch discriminates: a mean of per-sequence means (the usual mistake) is measurably off.
    per_sequence = [loss_fn(packed_logits(model, collate_packed([t])), collate_packed([t])["labels"])[0] for t in ours]
    assert abs(torch.stack(per_sequence).mean().item() - expected.item()) > 1e-3


def test_sft_normalises_by_tokens_of_the_whole_step(model_path, tokenizer, world, tmp_path):
    # With gradient accumulation TRL divides every micro-batch's summed NLL by num_items_in_batch,
    # the trained tokens of the whole step; the step's loss is the sum over micro-batches. Our
    # per-micro-batch mean must be re-weighted by its num_tokens to reproduce it.
    examples = sft_batch_examples(world, n_single=1, n_multi=3)
    model = load_model(model_path)
    trainer = trl_sft_trainer(model_path, model, examples, tmp_path)
    features = trl_sft_features(trainer)
    micro = [features[:1], features[1:]]  # very different token counts
    batches = [trainer.data_collator(m) for m in micro]
    num_items = sum(trained_tokens(b["labels"]) for b in batches)
    trl_step = sum(trl_loss(trainer, b, num_items_in_batch=num_items).item() for b in batches)
    assert abs(trl_step - trl_loss(trainer, trainer.data_collator(features)).item()) < TOL

    loss_fn = CrossEntropyLoss()
    ours = [tokenize_conversation(tokenizer, e["messages"], MAX_LENGTH) for e in examples]
    rows = [collate_packed(ours[:1]), collate_packed(ours[1:])]
    losses = [loss_fn(packed_logits(model, r), r["labels"])[0].item() for r in rows]
    counts = [trained_tokens(r["labels"]) for r in rows]
    assert sum(counts) == num_items
    weighted = sum(loss * n for loss, n in zip(losses, counts)) / num_items
    assert abs(weighted - trl_step) < TOL
    naive = sum(losses) / len(losses)
    assert abs(naive - trl_step) > 1e-3  # averaging micro-batch means is not what TRL does


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_computes_each_sequence_alone(model_path, tokenizer, world, attn):
    # What (b) above and our DPO rows rely on: no attention across sequences of a packed row.
    model = load_model(model_path, attn=attn)
    examples = sft_batch_examples(world, n_single=2, n_multi=2)
    seqs: list[Tokenized] = [tokenize_conversation(tokenizer, e["messages"], MAX_LENGTH) for e in examples]
    packed = packed_logits(model, collate_packed(seqs))[0]
    start = 0
    for seq in seqs:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([seq.input_ids.tolist()]), use_cache=False).logits[0]
        assert (packed[start : start + len(seq)] - alone).abs().max().item() < TOL
        start += len(seq)


# ----------------------------------------------------------------------------------------------
# DPO


def trl_dpo_trainer(model_path, policy, ref, pairs, loss_type, tmp_path) -> DPOTrainer:
    args = DPOConfig(
        output_dir=str(tmp_path / f"dpo-{loss_type}"),
        report_to=[],
        use_cpu=True,
        push_to_hub=False,
        bf16=False,  # else compute_ref_log_probs runs under bf16 autocast (off by ~1e-2 per sequence)
        beta=BETA,
        loss_type=[loss_type],
        max_length=MAX_LENGTH,
        per_device_train_batch_size=len(pairs),
    )
    return DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=AutoTokenizer.from_pretrained(model_path),
    )


@pytest.mark.parametrize(
    "loss_type, our_loss", [("sigmoid", SigmoidDPOLoss(beta=BETA)), ("ipo", IPOLoss(beta=BETA))]
)
def test_dpo_loss_matches_trl(model_path, tokenizer, world, tmp_path, loss_type, our_loss):
    pairs = preference_examples(world)
    ref = load_model(model_path)
    policy = load_model(model_path, noise=0.02)  # policy != reference, so the loss is not log(2)
    trainer = trl_dpo_trainer(model_path, policy, ref, pairs, loss_type, tmp_path)
    ds = trainer.train_dataset
    features = [{k: ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(ds))]
    batch = trainer.data_collator(features)  # rows: all chosen, then all rejected; right-padded
    expected = trl_loss(trainer, batch)

    # Same tokens: TRL's prompt/completion split is our label mask.
    for pair, f in zip(pairs, features):
        for side in ("chosen", "rejected"):
            ours = tokenize_completion(tokenizer, pair["prompt"], pair[side], MAX_LENGTH)
            assert ours.input_ids.tolist() == f["prompt_ids"] + f[f"{side}_ids"]
            assert ours.labels.tolist() == [IGNORE_INDEX] * len(f["prompt_ids"]) + f[f"{side}_ids"]

    # Ours: each pair packed into one row, per-sequence sums, policy and frozen reference.
    policy_sums, counts, ref_sums = [], [], []
    for pair in pairs:
        sums, n = our_pair_logps(policy, tokenizer, pair)
        policy_sums.append(sums)
        counts.append(n)
        ref_sums.append(our_pair_logps(ref, tokenizer, pair)[0])
    policy_sums, counts, ref_sums = torch.stack(policy_sums), torch.stack(counts), torch.stack(ref_sums)

    # Per-sequence summed log-probs agree with TRL's (its reference forward, run on either model).
    with torch.no_grad():
        for model, ours in ((policy, policy_sums), (ref, ref_sums)):
            chosen, rejected = trainer.compute_ref_log_probs(model, dict(batch))
            assert torch.allclose(torch.stack([chosen, rejected], dim=1), ours, atol=1e-3, rtol=1e-5)

    if getattr(our_loss, "uses_mean_logps", False):  # IPO: the stage feeds per-token averages
        policy_sums, ref_sums = policy_sums / counts, ref_sums / counts
    loss, _ = our_loss(policy_sums[:, 0], policy_sums[:, 1], ref_sums[:, 0], ref_sums[:, 1])
    assert abs(loss.item() - expected.item()) < TOL
    if loss_type == "sigmoid":
        assert abs(expected.item() - math.log(2)) > 1e-2
