"""distill: few-shot prompts from example pairs, a teacher answering through the rollout workers, provenance."""

from __future__ import annotations

import json

import pytest

from rayalign_distill.prompts import Shot, chat_prompt, cut_at_next_question, pick_shots, shots_from_chat, text_prompt

SHOTS = [Shot("a", "What is 1+1?", "2"), Shot("b", "What is 2+2?", "4"), Shot("c", "What is 3+3?", "6")]


def test_shots_never_include_the_question_and_random_is_seeded():
    assert [s.id for s in pick_shots(SHOTS, "What is 2+2?", 3, "first", 0, 0)] == ["a", "c"]
    one = pick_shots(SHOTS, "What is 9+9?", 2, "random", 0, 5)
    assert one == pick_shots(SHOTS, "What is 9+9?", 2, "random", 0, 5) and len(set(one)) == 2
    picks = {tuple(s.id for s in pick_shots(SHOTS, "q", 2, "random", 0, i)) for i in range(10)}
    assert len(picks) > 1  # a different sample per question


def test_chat_and_text_prompts():
    msgs = chat_prompt("What is 5+5?", SHOTS[:2], "Answer with a number.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "What is 5+5?" and msgs[2]["content"] == "2"
    text = text_prompt("What is 5+5?", SHOTS[:1], "Q: {question}\nA: {answer}", None)
    assert text == "Q: What is 1+1?\nA: 2\n\nQ: What is 5+5?\nA:"
    assert cut_at_next_question(" 10\n\nQ: What is 6+6?\nA: 12", "Q: {question}\nA: {answer}") == "10"
    records = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                             {"role": "assistant", "content": "x"}, {"role": "user", "content": "u2"},
                             {"role": "assistant", "content": "y"}]}]
    assert shots_from_chat(records) == [Shot("0", "u", "y")]


@pytest.mark.slow
def test_teacher_writes_the_dataset(tmp_path):
    """Two tiny models of different seeds: the teacher's answers are its own, not the student's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayalign.config import RunConfig
    from rayalign.data.datasets import load_records
    from rayalign.embedded import embedded_model_path
    from rayalign.pipeline import run_pipeline
    from rayalign.plugins import get_plugin_manager
    from rayalign.testing import start_local_ray

    teacher, student = str(embedded_model_path(1)), str(embedded_model_path(0))
    cfg = RunConfig.model_validate({
        "model": student, "output_dir": str(tmp_path / "run"),
        "resources": {"rollout": {"dtype": "float32"}},  # as transformers computes, for the greedy check below
        "stages": [{"distill": {"teacher": teacher, "limit": 6, "shots": 2, "temperature": 0.0, "max_tokens": 24,
                                "drop_truncated": False, "system": "Answer briefly."}}]})
    start_local_ray()
    out = run_pipeline(cfg)
    stage = out / "00-distill"
    record = json.loads((stage / "metrics.json").read_text())
    assert record["datasets"]["distilled"].endswith("distilled.jsonl") and record["metrics"]["answers"] == 6
    rows, _ = load_records(record["datasets"]["distilled"], "chat", get_plugin_manager().formats, 0)
    assert len(rows) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    raw = [json.loads(line) for line in (stage / "distilled.jsonl").read_text().splitlines()]
    provenance = json.loads((stage / "provenance.json").read_text())
    assert provenance["teacher"] == teacher and provenance["sampling"]["temperature"] == 0.0
    for row in raw:
        p = row["provenance"]
        assert p["teacher"] == teacher and len(p["shots"]) == 2
        assert p["prompt"].index("Answer briefly.") < p["prompt"].rindex(row["messages"][-2]["content"])
        assert row["messages"][-2]["content"] not in p["prompt"][: p["prompt"].index("Answer briefly.")]

    def greedy(model_dir, row, n=8):  # what the model itself says first, given the same few-shot prompt
        tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
        ids = tok(row["provenance"]["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    for row in raw[:3]:
        assert row["messages"][-1]["content"].startswith(greedy(teacher, row))
    assert any(not r["messages"][-1]["content"].startswith(greedy(student, r)) for r in raw[:3])
