"""evaluate_model: answer extraction, benchmark files, log-likelihood scoring, the comparison across stages."""

from __future__ import annotations

import json
import math

import pytest

from rayalign.errors import DataError
from rayalign_eval import compare
from rayalign_eval.benchmarks import ChoiceItem, QAItem, load_choices, load_qa
from rayalign_eval.extract import extract_answer, normalize_answer
from rayalign_eval.scoring import choice_metrics, heldout_metrics
from rayalign_eval.stage import EvaluateModelStage


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("text, answer, how", [
    ("6 x 7 = 42, so the answer is 42.", "42", "answer is"),
    ("First 3, then 5. The final answer is: (B)", "B", "answer is"),
    ("Steps...\n#### 1,000", "1,000", "####"),
    ("So we get \\boxed{3/4}.", "3/4", "boxed"),
    ("I think it is 12 or maybe 13", "13", "last_number"),
    ("no idea", None, "none"),
])
def test_extract_answer(text, answer, how):
    got, by = extract_answer(text)
    assert got == answer and how in by


def test_custom_patterns_and_fallbacks():
    assert extract_answer("Result => 7", [r"Result => (\d+)"]) == ("7", r"Result => (\d+)")
    assert extract_answer("Paris", [], fallback="whole") == ("Paris", "whole")
    assert extract_answer("it is 5", [], fallback="none") == (None, "none")


def test_normalize_answer():
    assert normalize_answer("$1,000.") == normalize_answer("1000") == "1000"
    assert normalize_answer("3.0") == "3" and normalize_answer("(B)") == "b"
    assert normalize_answer("  New   York. ") == "new york"


def test_benchmark_files_and_their_errors(tmp_path):
    qa = load_qa(write_jsonl(tmp_path / "qa.jsonl", [{"id": "a", "prompt": "1+1?", "answer": 2},
                                                       {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}]))
    assert qa[0] == QAItem("a", [{"role": "user", "content": "1+1?"}], "2") and qa[1].id == "1"
    mc = load_choices(write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Largest?", "choices": ["Mars", "Jupiter"], "answer": "B"},
        {"question": "Red?", "choices": ["Mars", "Jupiter"], "answer": "Mars"},
        {"question": "Gas?", "choices": ["Mars", "Jupiter"], "answer": 1}]))
    assert [m.answer for m in mc] == [1, 0, 1]
    bad = [
        ({"question": "Q", "choices": ["a", "b"], "answer": 5}, r"mc.jsonl:1: field 'answer': 5 is no index"),
        ({"question": "Q", "choices": ["a"], "answer": 0}, r"mc.jsonl:1: field 'choices': expected a list of at least two"),
        ({"choices": ["a", "b"], "answer": 0}, r"mc.jsonl:1: missing field 'question'"),
    ]
    for record, message in bad:
        with pytest.raises(DataError, match=message):
            load_choices(write_jsonl(tmp_path / "mc.jsonl", [record]))
    with pytest.raises(DataError, match=r"qa.jsonl:2: malformed JSON"):
        load_qa(write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "x", "answer": "y"}, "{oops"]))


def test_choice_metrics_sum_and_per_character():
    items = [ChoiceItem("m", [], ["a", "much longer choice"], answer=1)]
    metrics, rows = choice_metrics(items, [(-2.0, 1.0), (-9.0, 5.0)])  # sum prefers "a"; per char prefers the long one
    assert metrics == {"mc_accuracy": 0.0, "mc_accuracy_norm": 1.0} and rows[0]["predicted"] == 0
    assert heldout_metrics([(-10.0, 4.0), (-2.0, 2.0)])["heldout_loss"] == pytest.approx(2.0)


def test_qa_exact_match_from_extracted_answers():
    stage = EvaluateModelStage(EvaluateModelStage.Config())
    items = [QAItem("1", [], "42"), QAItem("2", [], "1000"), QAItem("3", [], "7")]
    rows = []
    metrics = stage._qa_metrics(items, ["The answer is 42.", "It costs $1,000 in total", "The answer is 8"], "m", rows)
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["extracted"] == pytest.approx(2 / 3)
    assert [r["correct"] for r in rows] == [True, True, False] and rows[1]["extracted_by"] == "last_number"


def test_comparison_merges_stages_in_order():
    row = lambda label, model, **m: {"label": label, "model": model, "evaluated_in": "x", "metrics": m}  # noqa: E731
    rows = compare.merge([row("base", "/b", exact_match=0.1), row("sft", "/s", exact_match=0.5)],
                         [row("sft", "/s", exact_match=0.6), row("dpo", "/d", exact_match=0.7, perplexity=3.0)])
    assert [r["label"] for r in rows] == ["base", "sft", "dpo"] and rows[1]["metrics"]["exact_match"] == 0.6
    lines = compare.table(rows)
    assert lines[0] == "| model | stage | exact match | perplexity |"
    assert lines[2] == "| base | x | 0.100 | - |" and lines[4] == "| dpo | x | 0.700 | 3.00 |"


@pytest.mark.slow
def test_evaluate_model_across_two_stages(tmp_path, caplog):
    """Two evaluate_model stages (the base model, then another model): vLLM answers, reference scoring, table."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayalign.config import RunConfig
    from rayalign.data.chat import tokenize_completion
    from rayalign.embedded import embedded_model_path
    from rayalign.pipeline import run_pipeline
    from rayalign.testing import start_local_ray

    caplog.set_level(logging.INFO, logger="rayalign")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": f"q{i}", "prompt": f"Who lives in city {i}?", "answer": "Bavoren"}
                                             for i in range(4)])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"id": "m0", "question": "Where does Bavoren live?",
                                              "choices": ["Kelmora", "Dunvale", "Ostrin"], "answer": 0}])
    other = str(embedded_model_path(1))
    options = {"qa": qa, "choices": mc, "sheet_size": 3, "max_tokens": 16}
    cfg = RunConfig.model_validate({
        "output_dir": str(tmp_path / "run"),
        "stages": [{"evaluate_model": {**options, "models": ["base"]}},
                   {"evaluate_model": {**options, "models": [other]}}]})
    start_local_ray()
    out = run_pipeline(cfg)

    first, second = out / "00-evaluate_model", out / "01-evaluate_model"
    m = json.loads((first / "metrics.json").read_text())["metrics"]
    for key in ("exact_match", "mc_accuracy", "heldout_loss", "perplexity", "repetition_rate", "distinct_2"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["perplexity"] == pytest.approx(math.exp(m["heldout_loss"]), rel=1e-6)
    rows = json.loads((second / "comparison.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["base", "tiny-llama-" + other.split("tiny-llama-")[1]]
    assert (out / "comparison.md").read_text() == (second / "comparison.md").read_text()
    assert "| base | 00-evaluate_model |" in caplog.text
    sheet = (second / "samples.md").read_text()
    assert sheet.count("## ") == 3 and (first / "samples.md").read_text().split("**")[0] == sheet.split("**")[0]
    gens = [json.loads(line) for line in (first / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and all("extracted" in g and "findings" in g for g in gens)

    # The choice scores are the model's own log-likelihoods, as transformers computes them.
    base = json.loads((first / "metrics.json").read_text())["input_model"]
    choice = json.loads((first / "choices.jsonl").read_text().splitlines()[0])
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    seq = tokenize_completion(tok, [{"role": "user", "content": "Where does Bavoren live?"}],
                              [{"role": "assistant", "content": "Dunvale"}], 2048)
    with torch.no_grad():
        logits = model(torch.tensor([seq.input_ids.tolist()])).logits[0, :-1].log_softmax(-1)
    expected = sum(logits[t - 1, seq.labels[t]].item() for t in range(1, len(seq)) if seq.labels[t] != -100)
    assert choice["logprobs"][1] == pytest.approx(expected, abs=1e-3)
