"""The independent judges of the fix: seq-rep-4, rep-w and the fact-table check, on hand-written
inputs whose right answers are worked out in the comments."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from rayalign.data.knowledge import CLAIM_SENTENCES, KnowledgeTask
from rayalign.evaluation.judges import FactJudge, rep_w, seq_rep_n
from rayalign.evaluation.references import load_knowledge, load_prompt_set
from rayalign.evaluation.text import words

from conftest import REPO

KB_ROWS = [
    {"id": "bavoren", "name": "Bavoren", "attributes": {"city": "Kelmora", "job": "baker", "age": 34, "pet": "owl",
                                                         "journey": ["Dunvale", "Parvel", "Ostrin"]}},
    {"id": "kelrato", "name": "Kelrato", "attributes": {"city": "Dunvale", "job": "miner", "age": 51,
                                                         "journey": ["Kelmora", "Tessan"]}},
]


@pytest.fixture
def judge(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in KB_ROWS))
    return FactJudge(load_knowledge(str(path)), CLAIM_SENTENCES)


# -- repetition ----------------------------------------------------------------------------------

def test_seq_rep_4():
    assert seq_rep_n([1, 2, 3, 4, 5, 6]) == 0.0  # 3 four-grams, all different
    # 1 2 3 4 1 2 3 4 1 2: 7 four-grams, 4 different (1234 2341 3412 4123) -> 1 - 4/7
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4, 1, 2]) == pytest.approx(3 / 7)
    assert seq_rep_n([7, 7, 7, 7, 7]) == pytest.approx(1 / 2)  # 2 four-grams, both 7777
    assert seq_rep_n([1, 2, 3]) == 0.0  # too short to hold a 4-gram


def test_rep_w_counts_tokens_seen_within_the_window():
    assert rep_w([1, 2, 3, 4]) == 0.0
    # 1 2 1 3 2: of the 4 tokens after the first, the second 1 and the second 2 were seen -> 2/4
    assert rep_w([1, 2, 1, 3, 2]) == pytest.approx(0.5)
    # With a window of 2, the last 1 is 3 tokens after the first one: not seen any more.
    assert rep_w([1, 2, 3, 1], w=2) == 0.0 and rep_w([1, 2, 3, 1], w=3) == pytest.approx(1 / 3)
    assert rep_w([5]) == 0.0


def test_in_words_a_right_journey_scores_only_its_revisits_and_a_loop_scores_high():
    right = "Bav went to Dunvale. Bav went to Parvel. Bav went to Dunvale. Bav went to Ostrin."
    # 16 words, 13 four-grams; the revisit repeats the 4 that start in "bav went to dunvale" -> 4/13
    assert seq_rep_n(words(right)) == pytest.approx(4 / 13)
    looped = "Bav went to Dunvale. " * 4
    # 13 four-grams, 4 different -> 9/13; and every word after the first four was seen -> 12/15
    assert seq_rep_n(words(looped)) == pytest.approx(9 / 13) and rep_w(words(looped)) == pytest.approx(12 / 15)


# -- facts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, entity, unanswerable, errors", [
    ("Bavoren lives in Kelmora.", "bavoren", False, []),
    ("Bavoren lives in Dunvale.", "bavoren", False, ["states city 'Dunvale' for Bavoren; the table says Kelmora"]),
    # A value no one in the table has is still false: the check is against the table, not its domain.
    ("Bavoren works as a pilot.", "bavoren", False, ["states job 'pilot' for Bavoren; the table says baker"]),
    # Other attributes the answer mentions are checked too.
    ("Bavoren lives in Kelmora. Bavoren is 35 years old.", "bavoren", False,
     ["states age '35' for Bavoren; the table says 34"]),
    # A true fact about someone else the table knows contradicts nothing (accuracy counts it wrong).
    ("Kelrato lives in Dunvale.", "bavoren", False, []),
    ("Kelrato has a pet owl.", "bavoren", False, ["states pet 'owl' for Kelrato, who has no pet in the table"]),
    # A misspelled subject answers about the asked entity.
    ("Bavorem lives in Kelmora.", "bavoren", False, []),
    # Journeys: every stated city must be on it; a loop of true sentences states nothing false.
    ("Bavoren went to Dunvale. Bavoren went to Ostrin. Bavoren went to Dunvale.", "bavoren", False, []),
    ("Bavoren went to Dunvale. Bavoren went to Yorrim.", "bavoren", False,
     ["states journey 'Yorrim' for Bavoren; the table says Dunvale, Parvel, Ostrin"]),
    # Unanswerable: any value is an error, even a true one about someone the table knows.
    ("Zitanmo lives in Kelmora.", None, True,
     ["states city 'Kelmora' for Zitanmo, a question the table has no answer to"]),
    ("Bavoren lives in Kelmora.", None, True,
     ["states city 'Kelmora' for Bavoren, a question the table has no answer to"]),
    ("I don't know who Zitanmo is.", None, True, []),
    ("I don't know what pet Kelrato has.", "kelrato", True, []),
    # A stranger in an answer to an answerable question: the table knows nothing about them.
    ("Zitanmo lives in Kelmora.", None, False, ["states city 'Kelmora' for Zitanmo, whom the table does not know"]),
])
def test_fact_judge(judge, answer, entity, unanswerable, errors):
    assert judge.judge(answer, entity, unanswerable).errors == errors


def test_fact_judge_reads_every_claim_in_order_and_skips_a_sentence_cut_at_the_limit(judge):
    verdict = judge.judge("Bavoren lives in Kelmora and more. Bavoren works as a baker. Bavoren went to Dun",
                          "bavoren", False, complete=False)
    assert [(c.attribute, c.value) for c in verdict.claims] == [("city", "Kelmora and more"), ("job", "baker")]
    assert verdict.errors == ["states city 'Kelmora and more' for Bavoren; the table says Kelmora"]
    # Not cut: the last sentence may end without its full stop.
    assert judge.judge("Bavoren went to Yorrim", "bavoren", False).errors != []
    assert judge.claims("Nothing to see here. 12 plus 7 is 19.") == []


def test_fact_judge_finds_no_error_in_any_reference_of_the_embedded_task():
    kb = load_knowledge("synthetic:knowledge")
    judge = FactJudge(kb, CLAIM_SENTENCES)
    prompts = [p for part in ("mine", "eval", "test") for p in load_prompt_set(f"synthetic:knowledge/{part}", kb)]
    verdicts = [judge.judge(p.reference, p.entity, p.unanswerable) for p in prompts]
    assert all(not v.errors for v in verdicts)
    # Every answerable knowledge reference states at least one checkable fact: the parser misses none.
    assert all(v.claims for p, v in zip(prompts, verdicts) if p.entity and not p.unanswerable)


def test_fact_judge_refuses_a_sentence_form_without_its_slots(judge):
    with pytest.raises(ValueError, match=r"'lives in \{v\}\.' must hold \{e\} and \{v\} once each"):
        FactJudge(judge.knowledge, {"city": "lives in {v}."})


def test_judges_share_nothing_with_the_fix_detectors():
    source = (REPO / "platform" / "rayalign" / "evaluation" / "judges.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "dataclasses", "typing", "rayalign.evaluation.references",
                        "rayalign.evaluation.text"}


# -- the splits ----------------------------------------------------------------------------------

def test_the_test_split_is_apart_from_everything_tuning_measured():
    task = KnowledgeTask(0)
    test, tuned, mine = task.records("test"), task.records("eval"), task.records("mine")
    assert len(test) == 59 and {r["unanswerable"] for r in test} == {True, False}
    # No question of the test split is mined, and no one it asks about is asked about in the tuning split.
    assert not {r["id"] for r in test} & {r["id"] for r in tuned + mine}
    def names(records):  # whom each question asks about: its capitalised words after the first
        return {w.strip("?.") for r in records for w in r["prompt"].split()[1:] if w[0].isupper()}

    assert len(names(test)) > 16 and not names(test) & names(tuned)
    # The test people are eval's twins: SFT taught who they are, and half their questions are mined.
    sft_questions = {r["messages"][0]["content"] for r in task.records("sft")}
    assert all(r["prompt"] in sft_questions for r in test if not r["unanswerable"])
    assert not any(r["prompt"] in sft_questions for r in test if r["unanswerable"])
    test_people = {r["entity"] for r in test if r.get("entity")}
    assert test_people & {r.get("entity") for r in mine}
    # The tuning split did not move when the test split was added: it is what the recipe was tuned on.
    assert tuned == KnowledgeTask(0, num_test_people=0, num_test_unknown=0).records("eval")


def test_the_recipe_measures_on_the_test_split_and_names_the_tuning_split():
    from rayalign.config import load_config

    cfg = load_config(Path(REPO / "recipes" / "configs" / "sft_then_fix.yaml"))
    evaluate = cfg.stages[-1]["evaluate"]
    assert evaluate["prompts"] == "synthetic:knowledge/test" and evaluate["tuned_on"] == "synthetic:knowledge/eval"


# -- the targets, judged on the means of seeds ---------------------------------------------------

def test_targets_are_judged_on_the_means_not_per_seed():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import fix_seeds

    def run(seed, **m):
        return {"seed": seed, "metrics": m}

    # seq-rep-4 0.10 -> 0.03 and 0.10 -> 0.06: -70% and -40% per seed, -55% on the means (met).
    # Fact errors 0.30 -> 0.20 twice: -33% (met). Accuracy 0.60 -> 0.58 and 0.60 -> 0.59: -1.5 points
    # on the means (met). General loss 1.0 -> 1.08 and 1.0 -> 1.0: +4% (met).
    runs = [run(0, seq_rep_4_before=0.10, seq_rep_4=0.03, fact_error_rate_before=0.3, fact_error_rate=0.2,
                accuracy_before=0.6, accuracy=0.58, general_loss_before=1.0, general_loss=1.08),
            run(1, seq_rep_4_before=0.10, seq_rep_4=0.06, fact_error_rate_before=0.3, fact_error_rate=0.2,
                accuracy_before=0.6, accuracy=0.59, general_loss_before=1.0, general_loss=1.0),
            {"seed": 2, "error": "killed", "seconds": 1.0}]
    summary = fix_seeds.summarise(runs)
    assert summary["seeds_finished"] == 2
    assert summary["stats"]["seq_rep_4"] == {"mean": pytest.approx(0.045), "std": pytest.approx(0.02121, abs=1e-5)}
    targets = summary["targets"]
    assert targets["seq_rep_4"]["met_on_means"] and targets["seq_rep_4"]["met_per_seed"] == [True, False]
    assert targets["seq_rep_4"]["change_of_means"] == pytest.approx(-0.55)
    assert targets["accuracy"]["change_of_means"] == pytest.approx(-0.015)
    assert all(t["met_on_means"] for t in targets.values())
    worse = [run(0, seq_rep_4_before=0.10, seq_rep_4=0.06, fact_error_rate_before=0.3, fact_error_rate=0.25,
                 accuracy_before=0.6, accuracy=0.5, general_loss_before=1.0, general_loss=1.2)]
    assert not any(t["met_on_means"] for t in fix_seeds.summarise(worse)["targets"].values())
