"""The RL pieces without Ray: advantages, rewards, packing of episodes, losses, the task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayalign.data.arithmetic import ArithmeticTask, final_number, place_values, worked_answer
from rayalign.training.losses import IGNORE_INDEX
from rayalign_rl import advantages as adv
from rayalign_rl.episodes import Episode, gather, pack, scatter
from rayalign_rl.losses import ClippedPolicyLoss, ClippedValueLoss, kl_k3
from rayalign_rl.rewards import exact_match, format_check, length_penalty

FINAL = r"最终结果是\s*(-?\d+)"


# -- the embedded task ----------------------------------------------------------------------------

def test_worked_answer_is_correct_and_its_final_number_is_read_back():
    text = worked_answer(47, 6)
    assert text.endswith("最终结果是282")
    assert "40*6=240,7*6=42" in text and "240+42=282" in text
    assert final_number(text) == "282"
    assert final_number("no answer here") is None
    assert place_values(305) == [300, 5] and place_values(40) == [40]


def test_task_is_seeded_and_its_parts_are_disjoint():
    a, b = ArithmeticTask(0), ArithmeticTask(0)
    assert a.records("prompts") == b.records("prompts")
    rl_q = {r["prompt"] for r in a.records("prompts")}
    eval_q = {r["prompt"] for r in a.records("eval")}
    sft_q = {r["messages"][0]["content"] for r in a.records("sft")}
    assert len(rl_q) > 100 and len(eval_q) == 64 and len(sft_q) == 320
    assert rl_q.isdisjoint(eval_q) and sft_q.isdisjoint(eval_q) and sft_q.isdisjoint(rl_q)
    for r in a.records("preference")[:50]:
        assert final_number(r["chosen"]) != final_number(r["rejected"])


# -- rewards --------------------------------------------------------------------------------------

def test_exact_match_reads_the_configured_final_answer():
    ok = worked_answer(12, 3)
    assert exact_match("q", ok, reference="36", pattern=FINAL) == 1.0
    assert exact_match("q", worked_answer(12, 3, final=37), reference="36", pattern=FINAL) == 0.0
    # A right number elsewhere in the answer is not the final answer.
    assert exact_match("q", "36 ... 最终结果是35", reference="36", pattern=FINAL) == 0.0
    assert exact_match("q", "the answer is 36", reference="36") == 1.0  # default: the last number
    assert exact_match("q", "the answer is 36", reference=None) == 0.0
    assert format_check("q", ok, pattern=FINAL) == 1.0 and format_check("q", "36", pattern=FINAL) == 0.0
    assert length_penalty("q", "x" * 10, max_chars=10) == 0.0
    assert length_penalty("q", "x" * 15, max_chars=10) == -0.5
    assert length_penalty("q", "x" * 50, max_chars=10) == -1.0


# -- advantages -----------------------------------------------------------------------------------

def test_grpo_advantages_are_group_normalised_like_trl():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = adv.grpo(rewards)
    t = torch.tensor(rewards)
    expected = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)  # unbiased std, TRL's nanstd
    np.testing.assert_allclose(a, expected.numpy(), atol=1e-12)
    assert np.all(a[1] == 0)  # an all-equal group teaches nothing
    np.testing.assert_allclose(adv.grpo(rewards, scale=False), rewards - rewards.mean(1, keepdims=True))


def test_rloo_uses_the_mean_of_the_other_answers():
    rewards = np.array([[1.0, 0.0, 2.0]])
    np.testing.assert_allclose(adv.rloo(rewards), [[1.0 - 1.0, 0.0 - 1.5, 2.0 - 0.5]])
    with pytest.raises(ValueError):
        adv.rloo(np.array([[1.0]]))


def test_gae_matches_a_hand_computation():
    r, v, gamma, lam = np.array([0.1, -0.2, 1.0]), np.array([0.5, 0.4, 0.3]), 0.9, 0.8
    a, ret = adv.gae(r, v, gamma, lam)
    d2 = 1.0 + 0.0 - 0.3
    d1 = -0.2 + 0.9 * 0.3 - 0.4
    d0 = 0.1 + 0.9 * 0.4 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    np.testing.assert_allclose(a, [d0 + 0.72 * a1, a1, a2], atol=1e-12)
    np.testing.assert_allclose(ret, a + v)
    # gamma = lam = 1: the advantage is the return to go minus the value.
    a, _ = adv.gae(r, v, 1.0, 1.0)
    np.testing.assert_allclose(a, np.cumsum(r[::-1])[::-1] - v, atol=1e-12)


def test_whiten_gives_zero_mean_unit_variance_over_all_tokens():
    arrays = [np.array([1.0, 2.0]), np.array([3.0, 4.0, 10.0])]
    out = np.concatenate(adv.whiten(arrays))
    assert abs(out.mean()) < 1e-9 and abs(out.std(ddof=1) - 1) < 1e-6
    kept = np.concatenate(adv.whiten(arrays, shift_mean=False))
    assert abs(kept.mean() - np.concatenate(arrays).mean()) < 1e-9


# -- episodes in packed rows ----------------------------------------------------------------------

def _episode(prompt_len: int, answer_len: int, start: int = 0) -> Episode:
    return Episode(0, list(range(start, start + prompt_len)), list(range(100 + start, 100 + start + answer_len)),
                   "", "stop", 0, np.zeros(answer_len, dtype=np.float32))


def test_scatter_and_gather_put_values_on_the_answer_tokens_only():
    episodes = [_episode(3, 2), _episode(2, 4, start=10), _episode(4, 1, start=20)]
    rows = pack(episodes, max_tokens=100, seed=0)
    assert len(rows) == 1
    row = rows[0]
    values = [np.arange(len(episodes[i].completion_ids), dtype=np.float32) + 1 + 10 * i for i in row.episodes]
    full = scatter(row, values)
    labels = row.batch["labels"]
    # Every answer token, and nothing else, carries a value; and its label is the answer's token.
    assert torch.equal(full[0] != 0, labels[0] != IGNORE_INDEX)
    for i, pos in zip(row.episodes, row.positions):
        assert labels[0, pos].tolist() == episodes[i].completion_ids
    # A model's shifted output at position t-1 belongs to label t: gather reads it back.
    back = gather(row, full[:, 1:])
    for got, want in zip(back, values):
        np.testing.assert_array_equal(got, want)


def test_pack_respects_the_token_budget():
    episodes = [_episode(5, 5, start=i) for i in range(7)]
    rows = pack(episodes, max_tokens=25, seed=1)
    assert sorted(i for r in rows for i in r.episodes) == list(range(7))
    assert all(r.batch["input_ids"].shape[1] <= 25 for r in rows)


# -- losses ---------------------------------------------------------------------------------------

def test_clipped_policy_loss_clips_only_in_the_direction_that_would_overshoot():
    loss = ClippedPolicyLoss(clip_low=0.2, clip_high=0.2)
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))  # ratios 1.5, 1.5, 0.5, 0.5
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    value, m = loss(logps, old, advantages, mask)
    # min(r*A, clip(r)*A): 1.2, -1.5, 0.5, -0.8 -> loss = -mean
    assert abs(value.item() - -(1.2 - 1.5 + 0.5 - 0.8) / 4) < 1e-6
    assert m["clip_fraction"] == 0.5  # the ratio 1.5 with A>0 and 0.5 with A<0


def test_sequence_mean_weights_each_answer_equally():
    token, seq = ClippedPolicyLoss(aggregation="token_mean"), ClippedPolicyLoss(aggregation="sequence_mean")
    logps = old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, 1.0, 4.0]])  # answer 0: three tokens of 1; answer 1: one token of 4
    mask = torch.ones(1, 4, dtype=torch.bool)
    ids = torch.tensor([[0, 0, 0, 1]])
    assert abs(token(logps, old, advantages, mask)[0].item() - -7 / 4) < 1e-6
    assert abs(seq(logps, old, advantages, mask, sequence_ids=ids)[0].item() - -(1 + 4) / 2) < 1e-6


def test_kl_term_is_k3_and_zero_at_the_reference():
    logps = torch.tensor([[-1.0, -2.0]])
    assert torch.allclose(kl_k3(logps, logps), torch.zeros(1, 2))
    ref = torch.tensor([[-1.5, -1.0]])
    r = ref - logps
    assert torch.allclose(kl_k3(logps, ref), torch.exp(r) - r - 1)
    assert (kl_k3(logps, ref) > 0).all()
    loss = ClippedPolicyLoss(kl_coef=0.5)
    zero_adv = torch.zeros(1, 2)
    value, m = loss(logps, logps.detach(), zero_adv, torch.ones(1, 2, dtype=torch.bool), ref)
    assert abs(value.item() - 0.5 * kl_k3(logps, ref).mean().item()) < 1e-6 and m["kl_ref"] > 0


def test_clipped_value_loss_takes_the_worse_of_clipped_and_unclipped():
    loss = ClippedValueLoss(clip=0.2)
    old, returns, mask = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)
    values = torch.tensor([[0.5, 1.0]])  # clipped to 0.2 and 0.2
    value, _ = loss(values, old, returns, mask)
    expected = 0.5 * ((max(0.25, 0.64) + max(0.0, 0.64)) / 2)
    assert abs(value.item() - expected) < 1e-6


def test_stale_answers_are_counted_and_dropped_with_their_whole_group():
    from rayalign.rollout.vllm_engine import Completion
    from rayalign_rl.episodes import current_episodes

    def answer(version, tokens=(5, 6)):
        return Completion(0, list(tokens), "x", [-0.1] * len(tokens), "stop", weights_version=version)

    prompts = [[1, 2], [3, 4], [7, 8]]
    grouped = [[answer(3), answer(3)], [answer(3), answer(2)], [answer(3), answer(3, tokens=())]]
    episodes, stale = current_episodes(prompts, grouped, version=3)
    assert stale == 2  # prompt 1's group had an answer from version 2: both are dropped
    assert [e.prompt_index for e in episodes] == [0, 0, 2, 2]  # an empty answer keeps its group whole
    assert all(e.weights_version == 3 for e in episodes)
    assert current_episodes(prompts, grouped, version=4)[1] == 6


def test_an_empty_answer_counts_in_its_groups_baseline_and_trains_no_token():
    from rayalign.training.advantages import AdvantageBatch
    from rayalign_rl.advantages import GAE, GRPO, GAEConfig, GRPOConfig

    kl = [np.zeros(2, np.float32), np.zeros(0, np.float32), np.zeros(3, np.float32), np.zeros(1, np.float32)]
    batch = AdvantageBatch(rewards=[1.0, 0.0, 1.0, 1.0], kl=kl, kl_coef=0.1, group_size=2,
                           values=[np.zeros(len(k), np.float32) for k in kl])
    grpo = GRPO(GRPOConfig()).estimate(batch).advantages
    assert [len(a) for a in grpo] == [2, 0, 3, 1]
    assert grpo[0][0] > 0  # its group-mate's reward of 0 (the empty answer) is in the baseline
    assert np.allclose(grpo[2], 0) and np.allclose(grpo[3], 0)  # an all-equal group
    gae = GAE(GAEConfig()).estimate(batch).advantages
    assert [len(a) for a in gae] == [2, 0, 3, 1]
