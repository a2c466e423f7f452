"""The demo's data (rayalign.data.declining) as the recipe's stages load it: held out where it says.

No Ray: the stages' `prepare` loads and splits the data; the recipe run itself is in
test_recipe_e2e.py.
"""

import json

import pytest

from rayalign.config import load_config, validate_stages
from rayalign.data.declining import DECLINE, DecliningTask
from rayalign.plugins import get_plugin_manager
from rayalign.stage import Artifacts

from conftest import REPO

CONFIG = REPO / "recipes" / "configs" / "sft_then_dpo.yaml"


def base_model() -> str:
    from rayalign.models import resolve_model

    return resolve_model(load_config(CONFIG))


def prepared(overrides=()):
    """The recipe's stages, prepared as the pipeline prepares them before any work."""
    cfg = load_config(CONFIG, list(overrides))
    pm = get_plugin_manager()
    entries = validate_stages(cfg, pm.stages)
    artifacts = Artifacts(model=base_model())
    stages = [pm.stages.get(e.name, where=str(i))(e.config) for i, e in enumerate(entries)]
    for i, stage in enumerate(stages):
        stage.prepare(cfg, pm, artifacts, i)
    return stages


@pytest.fixture(scope="module")
def stages():
    return prepared()


def text(messages) -> str:
    return " ".join(m["content"] for m in messages) if isinstance(messages, list) else messages


def who(prompt: str) -> str:
    """The person a question is about: "Where does Perazi's teacher live?" -> "Perazi's teacher"."""
    for head, tail in (("Where does ", " live?"), ("What is the job of ", "?"), ("What is the favorite color of ", "?")):
        if prompt.startswith(head) and prompt.endswith(tail):
            return prompt[len(head) : -len(tail)]
    raise AssertionError(prompt)


def test_dpo_holds_out_pairs_by_prompt(stages):
    dpo = stages[2]
    train, held = list(dpo.train), list(dpo.eval)
    assert len(held) == 12 and len(train) == 108
    trained_prompts = {text(r["prompt"]) for r in train}
    trained_chosen = {text(r["chosen"]) for r in train}
    for r in held:
        assert text(r["prompt"]) not in trained_prompts
        assert text(r["chosen"]) not in trained_chosen
    # A held-out stranger is asked about in no training pair at all.
    held_strangers = {who(text(r["prompt"])) for r in held if "'s " in text(r["prompt"])}
    assert held_strangers
    assert not any(s in text(r["prompt"]) + text(r["chosen"]) + text(r["rejected"]) for s in held_strangers for r in train)
    # Both kinds of pair are held out, so the "before" is neither 0 nor 1 by construction.
    assert {DECLINE.format(e=who(text(r["prompt"]))) == text(r["chosen"]) for r in held} == {True, False}


def test_pairs_sharing_a_prompt_stay_on_one_side(tmp_path):
    # 10 prompts, 3 pairs each (as when every fact yields a pair per kind of wrong answer).
    rows = [{"prompt": f"Where does P{i // 3} live?", "chosen": f"In C{i // 3}.", "rejected": f"In D{i}."}
            for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo = prepared([f"data.preference={tmp_path / 'pairs.jsonl'}", "data.eval_fraction=0.2"])[2]
    held = {text(r["prompt"]) for r in dpo.eval}
    assert len(held) == 2 and len(dpo.eval) == 6  # eval_fraction counts prompts
    assert held.isdisjoint(text(r["prompt"]) for r in dpo.train)


def test_a_split_without_key_is_the_per_record_one():
    from rayalign.data.datasets import split

    records = [{"n": i} for i in range(30)]
    assert split(records, 0.2, 0) == split(records, 0.2, 0, key=lambda r: r["n"])
    assert len(split(records, 0.2, 0)[1]) == 6


def test_sampled_prompts_are_held_out_from_every_training_stage(stages):
    sft, generate, dpo = stages[0], stages[1], stages[2]
    assert generate.source == "synthetic:declining/prompts"
    prompts = [(text(p["prompt"]), p["reference"]) for p in generate.prompts]
    assert len(prompts) == 16
    pair_text = [text(r["prompt"]) + " " + text(r["chosen"]) + " " + text(r["rejected"]) for r in dpo.train + dpo.eval]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model())
    trained = [tok.decode(t.input_ids) for t in sft.train]  # as the chat template renders them
    sft_text = trained + [tok.decode(t.input_ids) for t in sft.eval]
    strangers = [(q, ref) for q, ref in prompts if "'s " in q]
    assert len(strangers) == 8
    for question, reference in strangers:
        assert reference == DECLINE.format(e=who(question))
        assert not any(who(question) in t for t in pair_text + sft_text)  # met nowhere else
    for question, reference in prompts:
        if (question, reference) in strangers:
            continue
        assert not any(question in t for t in pair_text)  # no preference pair asks it
        assert any(f"{question}<|end|><|assistant|>\n{reference}<|end|>" in t for t in trained)  # SFT taught it


def test_a_users_sft_data_brings_its_own_held_out_prompts(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(20)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate = prepared([f"data.sft={tmp_path / 'sft.jsonl'}"])[1]
    # data.prompts unset: the held-out split of the user's SFT data, not the demo's questions.
    assert generate.source == str(tmp_path / "sft.jsonl")
    assert all(text(p["prompt"]).startswith("Say ") for p in generate.prompts)


def test_the_task_is_one_seeded_world():
    a, b = DecliningTask(0), DecliningTask(0)
    assert all(a.records(p) == b.records(p) for p in ("sft", "preference", "prompts"))
    assert DecliningTask(1).records("prompts") != a.records("prompts")
