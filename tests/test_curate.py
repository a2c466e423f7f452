"""Data curation: formats, filters, MinHash dedup across splits, mixture weights, the report."""

from __future__ import annotations

import json
import logging
import random

import pytest

from rayalign.data.filters import Example, build_filters
from rayalign.errors import ConfigError, DataError
from rayalign.plugins import PluginManager
from rayalign.testing import run_stage
from rayalign_curate.dedup import Deduplicator, jaccard, lsh_params, shingles
from rayalign_curate.filters import CharRatioFilter, LengthFilter, RefusalFilter
from rayalign_curate.formats import alpaca, sharegpt
from rayalign_curate.mixture import mix, plan_mix
from rayalign_curate.report import histogram, refusal_warning


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# -- formats -------------------------------------------------------------------------------------

def test_alpaca_and_sharegpt_become_messages():
    assert alpaca({"instruction": "Add", "input": "1+1", "output": "2"})["messages"] == [
        {"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    assert alpaca({"instruction": "Hi", "input": "", "output": "Hello", "system": "Be brief"})["messages"][0] == {
        "role": "system", "content": "Be brief"}
    got = sharegpt({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                      {"from": "gpt", "value": "A"}]})
    assert [m["role"] for m in got["messages"]] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "no assistant"),
    ({"conversations": []}, "non-empty"),
])
def test_sharegpt_bad_records_name_the_field(record, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sharegpt(record)


def test_formats_are_registered_for_every_chat_loader():
    pm = PluginManager()
    assert {"alpaca_instruction", "sharegpt", "messages", "preference"} <= set(pm.formats)
    assert {"length", "refusal", "char_ratio"} <= set(pm.filters)


# -- filters -------------------------------------------------------------------------------------

def test_builtin_filters():
    ex = lambda q, a: Example.of(chat(q, a))  # noqa: E731
    length = LengthFilter(LengthFilter.Config(min_response_chars=5, max_prompt_chars=20))
    assert length.reject(ex("What is 2+2?", "4")) == "response shorter than 5 chars"
    assert length.reject(ex("x" * 21, "a fine answer")) == "prompt longer than 20 chars"
    assert length.reject(ex("What is 2+2?", "It is 4.")) is None
    refusal = RefusalFilter()
    assert refusal.reject(ex("Write a poem", "I'm sorry, but I can't help with that.")) == "refusal"
    assert refusal.reject(ex("Write a poem", "As an AI language model, I have no feelings.")) == "refusal"
    assert refusal.reject(ex("Can you help?", "Yes, I can help with that.")) is None
    chars = CharRatioFilter()
    assert chars.reject(ex("Decode", "=+=+=+=+=+/////***===")) == "letters and digits < 50%"
    assert chars.reject(ex("What is 16 plus 12?", "16 + 12 = 28.")) is None  # digits are content
    latin = CharRatioFilter(CharRatioFilter.Config(script="latin"))
    assert latin.reject(ex("Привет, как дела?", "Хорошо, спасибо.")) == "latin letters < 80%"
    assert latin.reject(ex("Hello, how are you?", "Fine, thanks.")) is None


def test_filter_options_are_validated_by_name():
    pm = PluginManager()
    with pytest.raises(ConfigError, match=r"stages\[0\].curate.filter_options.length.min_response_chars"):
        build_filters(pm.filters, ["length"], {"length": {"min_response_chars": -1}}, "stages[0].curate")
    with pytest.raises(ConfigError, match="options for filters not in `filters`: refusal"):
        build_filters(pm.filters, ["length"], {"refusal": {}}, "stages[0].curate")
    with pytest.raises(ConfigError, match="no plugin provides filter 'nope'"):
        build_filters(pm.filters, ["nope"], {}, "stages[0].curate")


# -- dedup ---------------------------------------------------------------------------------------

def test_lsh_bands_put_the_s_curve_at_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        knee = (1 / bands) ** (1 / rows)  # where the collision probability rises fastest
        assert abs(knee - threshold) < 0.1, (threshold, bands, rows, knee)


def test_near_duplicates_are_found_at_the_threshold_and_not_below():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    base = [" ".join(rng.choices(vocab, k=60)) for _ in range(200)]
    dedup = Deduplicator(threshold=0.7, num_perm=128, shingle=5)
    assert all(dedup.add(i, t) is None for i, t in enumerate(base))  # random texts: no false duplicates
    near, far = [], []
    for i, text in enumerate(base[:50]):
        words = text.split()
        variant = " ".join(words[:-3] + ["zz1", "zz2", "zz3"])  # ~95% of shingles shared
        other = " ".join(words[:20] + rng.choices(vocab, k=40))  # ~1/3 shared
        sim_near = jaccard(shingles(text, 5), shingles(variant, 5))
        sim_far = jaccard(shingles(text, 5), shingles(other, 5))
        assert sim_near > 0.8 and sim_far < 0.5
        near.append(dedup.add(1000 + i, variant))
        far.append(dedup.add(2000 + i, other))
    assert sum(d is not None and d.kind == "near" for d in near) >= 48  # LSH may miss a rare one
    assert all(d.of == i for i, d in enumerate(near) if d)
    assert all(d is None for d in far)
    assert dedup.add(3000, base[7].upper() + "!!").kind == "exact"  # case and punctuation do not count


# -- mixture and report --------------------------------------------------------------------------

def test_mixture_shares_and_replay_upsampling():
    plans = {p.source: p for p in plan_mix({"task": 100, "general": 1000}, {"task": 0.8, "general": 0.2}, None)}
    assert (plans["task"].taken, plans["general"].taken) == (100, 25)  # the task once, general data by its share
    plans = {p.source: p for p in plan_mix({"task": 90, "general": 5}, {"task": 0.9, "general": 0.1}, None)}
    assert (plans["task"].taken, plans["general"].taken) == (90, 10)  # a small replay set is repeated
    out, plans = mix({"task": list(range(10)), "replay": ["r1", "r2"]}, {"task": 0.5, "replay": 0.5}, 20, seed=0)
    assert len(out) == 20 and out.count("r1") == 5 and out.count("r2") == 5  # replay repeated whole
    assert sorted(x for x in out if isinstance(x, int)) == list(range(10))


def test_histogram_and_refusal_warning():
    assert histogram([0, 31, 32, 5000, 9000]) == {"0-31": 2, "32-63": 1, "64-127": 0, "128-255": 0, "256-511": 0,
                                                 "512-1023": 0, "1024-2047": 0, "2048-4095": 0, "4096-8191": 1,
                                                 "8192+": 1}
    assert refusal_warning(0.03, 0.02, 0.05) is None
    assert "above the target" in refusal_warning(0.30, 0.02, 0.05)


# -- the stage through the pipeline --------------------------------------------------------------

@pytest.mark.slow
def test_curate_stage_end_to_end(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rayalign")
    rng = random.Random(0)
    names = ["".join(rng.choices("bcdfghklmnprstvz", k=5)) + "ia" for _ in range(40)]
    task = [chat(f"What is the capital of {n}?", f"The capital of {n} is {n.title()}ville.") for n in names]
    task.append(chat(f"What is the capital of {names[3]}?", "It is elsewhere."))  # exact prompt duplicate
    task.append(chat(f"what is the Capital of {names[5]} ?", "Somewhere."))  # exact after normalising
    task.append(chat(f"What is the capital of {names[7]}, please?", "Somewhere."))  # near duplicate (J 0.79)
    task.append(chat("Write a poem about war.", "I'm sorry, but I can't help with that."))  # refusal
    alpaca_rows = [{"instruction": f"Translate word {i} to French", "input": f"word{i}", "output": f"mot{i}"}
                   for i in range(20)]
    sharegpt_rows = [{"conversations": [{"from": "human", "value": f"Tell me fact {i} about owls."},
                                        {"from": "gpt", "value": f"Owl fact {i}: owls can turn their heads."},
                                        {"from": "human", "value": "And another?"},
                                        {"from": "gpt", "value": "They fly silently."}]} for i in range(10)]
    sharegpt_rows.append({"conversations": [{"from": "human", "value": "Symbols?"},
                                            {"from": "gpt", "value": "#$%^&*()_+=-{}[]|\\<>/~`"}]})
    test_rows = [chat(f"Tell me: what is the capital of {names[12]}?", "Unknown."),  # leaks into task (J 0.76)
                 chat("Unrelated held-out question about rivers?", "The Nile.")]
    run = run_stage(
        "curate",
        {"sources": [
            {"path": write_jsonl(tmp_path / "task.jsonl", task), "weight": 0.6},
            {"path": write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows), "name": "translate", "weight": 0.2},
            {"path": write_jsonl(tmp_path / "general.jsonl", sharegpt_rows), "name": "replay", "weight": 0.2},
            {"path": write_jsonl(tmp_path / "test.jsonl", test_rows), "split": "test"},
        ], "threshold": 0.7, "mix_size": 50, "refusal_target": 0.5, "refusal_tolerance": 0.1},
        tmp_path=tmp_path,
    )
    report = json.loads((run.dir / "report.json").read_text())
    rows = {r["source"]: r for r in report["sources"]}
    assert rows["task"]["read"] == 44 and rows["task"]["exact_duplicates"] == 2
    assert rows["task"]["near_duplicates"] == 1 and rows["task"]["leaked"] == 1
    assert rows["replay"]["filtered_by"] == {"char_ratio: letters and digits < 50%": 1}
    assert (rows["task"]["in_mix"], rows["translate"]["in_mix"], rows["replay"]["in_mix"]) == (30, 10, 10)
    curated = [json.loads(line) for line in (run.dir / "curated.jsonl").read_text().splitlines()]
    assert len(curated) == 50 and all("messages" in r for r in curated)
    prompts = {r["messages"][0]["content"] for r in curated}
    assert f"What is the capital of {names[12]}?" not in prompts  # no test item in training
    assert {r["source"] for r in curated} == {"task", "translate", "replay"}
    assert report["mix"]["turns"]["2"] == 10 and report["mix"]["messages_per_role"]["user"] == 60
    assert run.record["datasets"]["curated_test"].endswith("curated_test.jsonl")
    dropped = [json.loads(line) for line in (run.dir / "dropped.jsonl").read_text().splitlines()]
    assert any("near duplicate" in d["reason"] for d in dropped)
    assert "refusal share" in caplog.text and "below the target" in caplog.text
    assert "| task | train | 44 |" in caplog.text


def test_a_source_emptied_by_filters_stops_the_stage(tmp_path):
    from rayalign.config import RunConfig
    from rayalign.stage import Artifacts
    from rayalign_curate.stage import CurateStage

    path = write_jsonl(tmp_path / "refusals.jsonl", [chat(f"q{i}", "I cannot help with that.") for i in range(3)])
    with pytest.raises(Exception, match="two sources are labelled 'refusals'"):
        CurateStage.Config.model_validate({"sources": [{"path": path}, {"path": path}]})
    cfg = CurateStage.Config.model_validate({"sources": [{"path": path}], "filters": ["refusal"]})
    stage = CurateStage(cfg)
    stage.prepare(RunConfig(), PluginManager(), Artifacts(), 0)
    ctx = type("Ctx", (), {"run": RunConfig(), "artifacts": Artifacts(), "index": 0, "work_dir": tmp_path})()
    with pytest.raises(DataError, match="refusals: no examples left after filtering"):
        stage.run(ctx)


@pytest.mark.slow
def test_sft_trains_on_the_curated_dataset_and_its_validation_split(tmp_path):
    from rayalign.config import RunConfig
    from rayalign.pipeline import run_pipeline
    from rayalign.testing import start_local_ray

    held = write_jsonl(tmp_path / "val.jsonl", [chat(f"Held-out question number {w}?", f"Answer {w}.")
                                                for w in ("one", "two", "three", "four")])
    cfg = RunConfig.model_validate({
        "output_dir": str(tmp_path / "run"),
        "stages": [{"curate": {"sources": [{"path": "sft", "name": "synthetic"}, {"path": held, "split": "validation"}],
                               "length_unit": "words"}},
                   {"sft": {"dataset": "curated", "eval_dataset": "curated_validation", "epochs": 1}}]})
    start_local_ray()
    out = run_pipeline(cfg)
    curate = json.loads((out / "00-curate" / "metrics.json").read_text())
    sft = json.loads((out / "01-sft" / "metrics.json").read_text())["metrics"]
    assert sft["train_examples"] == curate["metrics"]["examples"] and sft["eval_examples"] == 4
    assert sft["eval_loss"] < sft["eval_loss_before"]


def test_validation_fraction_holds_out_after_dedup(tmp_path):
    import types

    from rayalign.config import RunConfig
    from rayalign.stage import Artifacts
    from rayalign_curate.stage import CurateStage

    rows = [chat(f"Question {w} about {w}?", f"Answer {w}.") for w in
            ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")]
    path = write_jsonl(tmp_path / "task.jsonl", rows + rows[:3])  # three exact duplicates
    stage = CurateStage(CurateStage.Config.model_validate({"sources": [{"path": path}], "validation_fraction": 0.2,
                                                            "length_unit": "words"}))
    stage.prepare(RunConfig(), PluginManager(), Artifacts(), 0)
    ctx = types.SimpleNamespace(run=RunConfig(), artifacts=Artifacts(), index=0, name="curate", work_dir=tmp_path,
                                log=logging.getLogger("test"))
    result = stage.run(ctx)
    train = [json.loads(line) for line in (tmp_path / "curated.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "curated_validation.jsonl").read_text().splitlines()]
    assert (len(train), len(held)) == (8, 2) and result.datasets["curated_validation"] == "curated_validation.jsonl"
    questions = lambda rs: {r["messages"][0]["content"] for r in rs}  # noqa: E731
    assert not questions(train) & questions(held)  # a duplicate cannot sit on both sides
    assert json.loads((tmp_path / "report.json").read_text())["sources"][0]["held_out"] == 2


def test_preference_pairs_are_curated_and_load_as_pairs(tmp_path):
    import types

    from rayalign.config import RunConfig
    from rayalign.data.datasets import load_records
    from rayalign.stage import Artifacts
    from rayalign_curate.stage import CurateStage

    pairs = [{"prompt": f"Describe the colour {c}.", "chosen": f"{c.title()} is a colour of the spectrum.",
              "rejected": f"{c} {c} {c}"} for c in ("red", "green", "blue", "amber", "violet")]
    pairs.append({"prompt": [{"role": "user", "content": "Describe the colour red!"}], "chosen": "Warm.",
                  "rejected": "Cold."})  # the same prompt: a duplicate under dedup_on: prompt
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    stage = CurateStage(CurateStage.Config.model_validate({"kind": "preference", "sources": [{"path": path}],
                                                            "length_unit": "words"}))
    pm = PluginManager()
    stage.prepare(RunConfig(), pm, Artifacts(), 0)
    ctx = types.SimpleNamespace(run=RunConfig(), artifacts=Artifacts(), index=0, name="curate", work_dir=tmp_path,
                                log=logging.getLogger("test"))
    result = stage.run(ctx)
    assert result.metrics["exact_duplicates"] == 1 and result.metrics["examples"] == 5
    loaded, _ = load_records(str(tmp_path / "curated.jsonl"), "preference", pm.formats, 0)
    assert len(loaded) == 5 and all(r["chosen"][0]["role"] == "assistant" for r in loaded)
