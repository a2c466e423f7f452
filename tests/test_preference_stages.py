"""The dpo stage with the reference-free losses (SimPO, ORPO) and the kto stage, without Ray: the
stage's own ``run`` with the trainer group and the reference workers stood in for, so what is
checked is what the stage decides (which roles it reserves, what its rows hold) and that the
objective it hands the trainers computes a loss with gradients on those rows.

The reference workers' code path (``reference_logps``) and the trainers' run under Ray in
test_dpo_reference.py, test_loss_contract.py (a reference-free loss end to end) and the slow
test at the end of this file.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import rayalign_dpo.stage
from rayalign.config import RunConfig
from rayalign.errors import DataError
from rayalign.plugins import get_plugin_manager
from rayalign.stage import Artifacts
from rayalign.training.losses import IGNORE_INDEX
from rayalign_dpo.kto_stage import KTOStage, prompt_length
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


def test_the_kto_stage_packs_each_example_with_a_mismatched_sequence_and_trains(tiny_model_path, tmp_path,
                                                                                 monkeypatch):
    stage, run = prepared(KTOStage, {}, tiny_model_path)  # data.unpaired null: the synthetic pairs, unpaired
    labels = [r["label"] for r in stage.train]
    assert True in labels and False in labels
    rows = stage._batches(stage.train)
    assert sum(len(b["desirable"]) for b in rows) == len(stage.train)
    by_tokens = {tuple(r.tokens.input_ids): r for r in stage.train}
    for b in rows:
        ids, seq = b["input_ids"][0], b["sequence_ids"][0]
        seqs = [ids[seq == k].tolist() for k in range(b["num_sequences"])]
        examples, kl = seqs[0::2], seqs[1::2]
        assert len(examples) > 1  # a row of several examples: the KL pairs differ from the examples
        for j, (example, mixed) in enumerate(zip(examples, kl)):
            record, donor = by_tokens[tuple(example)], by_tokens[tuple(examples[j - 1])]
            assert b["desirable"][j].item() == record["label"]
            p, q = prompt_length(record.tokens), prompt_length(donor.tokens)
            assert mixed == example[:p] + donor.tokens.input_ids[q:].tolist()  # its prompt, the previous one's completion

    stage.train, stage.eval = stage.train[:12], stage.eval[:4]  # enough to run on, in a few seconds
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    result, seen, calls, reserved = run_without_workers(stage, run, tiny_model_path, tmp_path, monkeypatch,
                                                        reference=reference)
    assert calls == [len(seen["train"]) + len(seen["held"])] and reserved == [("kto", ["trainer"])]
    first = seen["train"][0]
    assert first["ref_logps"].shape == first["ref_kl_logps"].shape == first["desirable"].shape
    # Policy == reference before training: every log-ratio is 0, so the KL estimate is too.
    assert seen["metrics"]["kl"].item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(seen["loss"]) and seen["grad"] > 0
    assert result.metrics["train_examples"] == len(stage.train) and "label_accuracy" in result.metrics


def test_kto_refuses_a_dataset_of_one_training_example(tiny_model_path, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "Name a colour.", "completion": "Blue.", "label": True}) + "\n")
    with pytest.raises(DataError, match=r"kto needs at least 2 training examples, got 1: its KL reference point"):
        prepared(KTOStage, {"eval_fraction": 0}, tiny_model_path, data={"unpaired": str(path)})


def test_a_bad_label_stops_a_fail_run_naming_file_line_and_field(tiny_model_path, tmp_path):
    from rayalign.pipeline import run_pipeline

    path = tmp_path / "kto.jsonl"
    good = [{"prompt": f"Name colour {i}.", "completion": "Blue.", "label": i % 2 == 0} for i in range(4)]
    lines = [json.dumps(r) for r in good[:2]] + ['{"prompt": "x", "completion": "y", "label": "good"}']
    path.write_text("\n".join(lines + [json.dumps(r) for r in good[2:]]) + "\n")
    out = tmp_path / "run"
    cfg = RunConfig.model_validate({"model": tiny_model_path, "output_dir": str(out), "stages": [{"kto": {}}],
                                    "data": {"unpaired": str(path), "bad_records": "fail"}})
    with pytest.raises(DataError) as exc:
        run_pipeline(cfg)
    assert str(exc.value) == (f"data error: {path}:3: field 'label': expected true (desirable) or false, got 'good' "
                              "(data.bad_records=fail)")
    assert not out.exists()  # refused in prepare, before any output or worker


@pytest.mark.slow
def test_the_kto_stage_trains_through_the_pipeline(tmp_path):
    from rayalign.testing import run_stage

    run = run_stage("kto", {"epochs": 1, "max_length": 128, "bf16": False, "lr": 1e-4,
                            "max_tokens_per_micro_batch": 256}, tmp_path=tmp_path)
    cached = torch.load(run.dir / "reference_logps.pt")
    assert sum(len(c) for c, _ in cached) == run.metrics["train_examples"] + run.metrics["eval_examples"]
    assert run.metrics["steps"] > 0 and all(torch.isfinite(torch.tensor(m["loss"])) for m in run.metrics["history"])
    assert run.metrics["label_accuracy"] > run.metrics["label_accuracy_before"]
