"""The dpo stage with the reference-free losses (SimPO, ORPO), without Ray: the
stage's own ``run`` with the trainer group and the reference workers stood in for, so what is
checked is what the stage decides (which roles it reserves, what its rows hold) and that the
objective it hands the trainers computes a loss with gradients on those rows.

The reference workers' code path (``reference_logps``) and the trainers' run under Ray in
test_dpo_reference.py and test_loss_contract.py (a reference-free loss end to end).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import rayalign_dpo.stage
from rayalign.config import RunConfig
from rayalign.plugins import get_plugin_manager
from rayalign.stage import Artifacts
from rayalign.training.losses import IGNORE_INDEX
from rayalign_dpo.stage import DPOStage


class StandInCluster:
    """Records the roles a stage reserves; hands out no real placement."""

    def __init__(self):
        self.reserved: list[tuple[str, list[str]]] = []

    @contextmanager
    def reserve(self, name, roles):
        self.reserved.append((name, list(roles)))
        yield {role: None for role in roles}


def stand_in_session(model, seen: dict):
    """A TrainerSession that runs the stage's objective once on its first training row, backward too."""

    class Session:
        reliability: dict = {}

        def __init__(self, ctx, placement, cfg, objective, train, held):
            seen.update(objective=objective, train=train, held=held)

        def train_and_save(self, path):
            model.zero_grad()
            loss, metrics = seen["objective"](model, seen["train"][0])
            loss.backward()
            seen.update(loss=loss.detach(), metrics=metrics,
                        grad=sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None))
            return metrics, [{"loss": loss.item()}], metrics

    return Session


def prepared(stage_cls, options: dict, model_path: str, data: dict | None = None):
    run = RunConfig.model_validate({"model": model_path, "data": data or {}, "stages": [{stage_cls.name: options}]})
    stage = stage_cls(stage_cls.Config(max_tokens_per_micro_batch=256, max_length=128, **options))
    stage.prepare(run, get_plugin_manager(), Artifacts(model=model_path), 0)
    return stage, run


def run_without_workers(stage, run, model_path, tmp_path, monkeypatch, reference=None):
    """``stage.run`` with stand-ins; ``reference`` scores the reference pass in this process (None: it must not run)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    seen, calls = {}, []

    def reference_logps(ctx, fn, batches):
        calls.append(len(batches))
        assert reference is not None, "a reference-free loss started the reference pass"
        with torch.no_grad():
            return [fn(reference, b) for b in batches]

    monkeypatch.setattr(rayalign_dpo.stage, "reference_logps", reference_logps)
    monkeypatch.setattr(rayalign_dpo.stage, "TrainerSession", stand_in_session(model, seen))
    ctx = SimpleNamespace(run=run, name=stage.name, index=0, work_dir=tmp_path, cluster=StandInCluster(),
                          artifacts=Artifacts(model=model_path), log=logging.getLogger("rayalign"))
    result = stage.run(ctx)
    return result, seen, calls, ctx.cluster.reserved


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_a_reference_free_loss_reserves_no_reference_role(tiny_model_path, tmp_path, monkeypatch, loss):
    stage, run = prepared(DPOStage, {"loss": loss}, tiny_model_path)
    assert not stage.loss.needs_reference
    result, seen, calls, reserved = run_without_workers(stage, run, tiny_model_path, tmp_path, monkeypatch)
    assert calls == [] and reserved == [("dpo", ["trainer"])]  # the trainers' placement only
    rows = seen["train"] + seen["held"]
    assert all(not b["ref_chosen"].any() and not b["ref_rejected"].any() for b in rows)
    assert not any(c.any() for c, _ in torch.load(tmp_path / "reference_logps.pt"))
    # ORPO's rows also label the chosen prompts, summed apart; SimPO's carry nothing extra.
    assert all(("nll_labels" in b) == (loss == "orpo") for b in rows)
    assert torch.isfinite(seen["loss"]) and seen["grad"] > 0
    if loss == "orpo":
        assert seen["metrics"]["orpo_nll"] > 0 and seen["metrics"]["odds_ratio_loss"] > 0
    assert result.metrics["train_pairs"] == len(stage.train)


def test_orpo_rows_label_each_chosen_prompt_in_a_bucket_of_its_own(tiny_model_path):
    stage, _ = prepared(DPOStage, {"loss": "orpo"}, tiny_model_path)
    row = stage._batches(stage.train)[0]
    n = row["num_sequences"]
    labels, nll_labels = row["labels"][0], row["nll_labels"][0]
    ids, buckets = row["sequence_ids"][0], row["nll_sequence_ids"][0]
    for k in range(n):
        mine = ids == k
        starts = int(mine.nonzero()[0])
        if k % 2:  # a rejected answer: as in the plain rows
            assert torch.equal(nll_labels[mine], labels[mine]) and (buckets[mine] == k).all()
            continue
        # A chosen sequence: every token but its first labelled, the prompt's counted in bucket n + k.
        assert nll_labels[starts] == IGNORE_INDEX
        assert torch.equal(nll_labels[mine][1:], row["input_ids"][0][mine][1:])
        answer = labels[mine] != IGNORE_INDEX
        assert (buckets[mine][answer] == k).all() and (buckets[mine][~answer] == n + k).all()
