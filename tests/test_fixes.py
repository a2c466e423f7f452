"""The repetition/hallucination fix without Ray: text measures, detectors, negative builders, bad input.

Every assertion is on a concrete input whose right answer can be checked by hand.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types

import pytest

from rayalign.data.knowledge import DECLINE_WHO, KnowledgeTask
from rayalign.errors import DataError, PluginError
from rayalign.evaluation.detectors import Detector, Finding, LoadedDetector, Sample, run_detectors
from rayalign.evaluation.references import RefPrompt, load_knowledge, load_prompt_set
from rayalign.evaluation.text import declines, distinct_n, find_loop, rep_n, words
from rayalign.hookspecs import hookimpl
from rayalign.plugins import PluginManager
from rayalign.stage import Artifacts, Produces
from rayalign_fixes.builders import borrow_answer, borrow_decline, loop_span, swap_values
from rayalign_fixes.detectors import ContradictionDetector, RepetitionDetector, UnanswerableDetector

from conftest import REPO

# What the mine and detect stages before a negatives stage declare they produce.
DETECTIONS_DECLARED = Artifacts(will_produce=Produces(datasets=["samples", "knowledge", "detections"]))

KB_ROWS = [
    {"id": "bavoren", "name": "Bavoren", "attributes": {"city": "Kelmora", "age": 34, "pet": "owl",
                                                         "journey": ["Dunvale", "Parvel", "Ostrin"]}},
    {"id": "kelrato", "name": "Kelrato", "attributes": {"city": "Dunvale", "age": 51}},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def kb(tmp_path):
    return load_knowledge(write_jsonl(tmp_path / "kb.jsonl", KB_ROWS))


def sample(completion, *, id="q", reference="", unanswerable=False, entity=None, attribute=None, facts=(),
           prompt="?", finish_reason="stop"):
    return Sample(id, [{"role": "user", "content": prompt}], completion, reference, unanswerable, entity, attribute,
                  list(facts), finish_reason=finish_reason)


# -- text measures -------------------------------------------------------------------------------

def test_rep_n_and_distinct_n():
    assert rep_n(words("a b c d"), 2) == 0.0
    assert rep_n(words("a b a b a b"), 2) == pytest.approx(1 - 2 / 5)  # ab, ba, ab, ba, ab: 2 unique of 5
    assert distinct_n(["a b", "a b", "c d"], 2) == pytest.approx(2 / 3)


def test_find_loop_finds_the_longest_back_to_back_block():
    loop = find_loop(words("X went to A. X went to B. X went to B. X went to B. Done"))
    assert (loop.period, loop.repeats) == (4, 3) and loop.start == 4
    assert find_loop(words("X went to A. X went to B. X went to A.")) is None  # revisits are not a loop


def test_declines():
    assert declines("I don't know who Zitanmo is.") and declines("I'm not sure.")
    assert not declines("Zitanmo lives in Kelmora.")


# -- detectors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, finish, rule", [
    ("Bav went to Ostrin. Bav went to Ostrin. Bav went to Ostrin.", "stop", "loop: 'bav went to ostrin' x3"),
    ("Bav went to Dunvale. Bav went to Ostrin. Bav went to Dunvale. Bav went to Ostrin.", "length",
     "loop at the token limit"),
    ("Renvovovovovovo lives in Kelmora.", "stop", "stutter: 'vovovovovovo'"),
])
def test_repetition_detector_rules(text, finish, rule):
    finding = RepetitionDetector().check(text, finish)
    assert finding is not None and finding.rule.startswith(rule), finding


@pytest.mark.parametrize("text, finish", [
    ("Bav went to Dunvale. Bav went to Ostrin. Bav went to Dunvale. Bav went to Ostrin.", "stop"),  # 2 copies, ended
    ("Pepepe lives in Kelmora. Count: 1, 2, 3, 4, 5, 6.", "stop"),
])
def test_repetition_detector_leaves_clean_text_alone(text, finish):
    assert RepetitionDetector().check(text, finish) is None


def test_no_reference_of_the_embedded_task_is_flagged():
    kb = load_knowledge("synthetic:knowledge")
    prompts = load_prompt_set("synthetic:knowledge/mine", kb) + load_prompt_set("synthetic:knowledge/eval", kb)
    samples = [Sample(p.id, p.prompt, p.reference, p.reference, p.unanswerable, p.entity, p.attribute, p.facts)
               for p in prompts]
    detectors = [LoadedDetector(d.name, "fixes", d()) for d in
                 (RepetitionDetector, ContradictionDetector, UnanswerableDetector)]
    assert samples and all(not f for f in run_detectors(detectors, samples, kb))


def test_embedded_task_splits():
    task = KnowledgeTask(0)
    mine, held = task.records("mine"), task.records("eval")
    assert not {r["id"] for r in mine} & {r["id"] for r in held}  # evaluation never sees mined prompts
    sft_questions = {r["messages"][0]["content"] for r in task.records("sft")}
    unanswerable = [r for r in mine + held if r["unanswerable"]]
    assert unanswerable and not any(r["prompt"] in sft_questions for r in unanswerable)
    assert all(r["prompt"] in sft_questions for r in mine + held if not r["unanswerable"])
    # The forgetting check is on general questions neither SFT nor the fix (which replays the general
    # prompts SFT trained on) ever saw.
    general = {r["messages"][0]["content"] for r in task.records("general")}
    assert general and not general & sft_questions and not general & {r["prompt"] for r in mine}
    replayed = {r["prompt"] for r in mine if r["id"].startswith("general.")}
    assert replayed and replayed <= sft_questions
    assert KnowledgeTask(0).records("sft") == task.records("sft")  # seeded


@pytest.mark.parametrize("answer, rule", [
    ("Bavoren lives in Dunvale.", "says Dunvale for city; the reference says Kelmora"),  # on her journey, not home
    ("Bavoren lives in Tessan.", None),  # Tessan is no value in the knowledge base: nothing to check it against
    ("Kelrato lives in Kelmora.", "states Kelrato"),  # another entity's name
    ("Bavoren lives in Kelmora. Bavoren is 35 years old.", "states 35"),  # a number that is none of hers
    ("Bavoren lives in Kelmora and has a pet owl.", None),  # her own values
    ("I don't know where Bavoren lives.", None),  # a decline is a miss, not a contradiction
])
def test_contradiction_detector(kb, answer, rule):
    s = sample(answer, entity="bavoren", attribute="city", facts=["Kelmora"], prompt="Where does Bavoren live?")
    (finding,) = ContradictionDetector().detect([s], kb)
    if rule is None:
        assert finding is None
    else:
        assert finding is not None and finding.rule.startswith(rule), finding


def test_contradiction_detector_without_a_knowledge_base_uses_the_facts_of_every_prompt():
    a = sample("It is Paris.", id="a", reference="Paris.", facts=["Paris"])
    b = sample("It is Rome, in 1990.", id="b", reference="Rome.", facts=["Rome"])
    c = sample("It is Paris.", id="c", reference="Rome.", facts=["Rome"])
    found = ContradictionDetector().detect([a, b, c], None)
    assert found[0] is None and "1990" in found[1].rule and "Paris" in found[2].rule


def test_unanswerable_detector(kb):
    det = UnanswerableDetector()
    invented = sample("Zitanmo lives in Kelmora.", unanswerable=True)
    declined = sample(DECLINE_WHO.format(e="Zitanmo"), unanswerable=True)
    answerable = sample("Zitanmo lives in Kelmora.")
    found = det.detect([invented, declined, answerable], kb)
    assert found[0].details["invented"] == ["Kelmora"] and found[1] is None and found[2] is None


# -- negative builders ---------------------------------------------------------------------------

def ref(reference, **kw) -> RefPrompt:
    return RefPrompt(kw.pop("id", "q"), [{"role": "user", "content": kw.pop("prompt", "?")}], reference, **kw)


def test_loop_span_loops_a_sentence_so_the_detector_flags_it():
    p = ref("Bav went to Dunvale. Bav went to Parvel. Bav went to Ostrin.")
    text, rule = loop_span(p, random.Random(0))
    assert RepetitionDetector().check(text) is not None and "looped x5" in rule
    assert text.startswith("Bav went to Dunvale.")
    short, _ = loop_span(ref("Bavoren lives in Kelmora."), random.Random(0))
    assert short == " ".join(["Bavoren lives in Kelmora."] * 5)
    words_only, rule = loop_span(ref("red, green, blue, amber"), random.Random(0))  # no sentence end
    assert words_only == "red, green, blue, amber" + " green, blue, amber" * 4 and rule.startswith("last 3 words")


def test_swap_values_draws_a_wrong_value_of_the_same_attribute(kb):
    p = ref("Bavoren lives in Kelmora.", entity="bavoren", attribute="city", facts=["Kelmora"])
    text, rule = swap_values(p, random.Random(0), knowledge=kb)
    assert text == "Bavoren lives in Dunvale." and rule == "swapped Kelmora -> Dunvale"
    s = sample(text, entity="bavoren", attribute="city", facts=["Kelmora"])
    assert ContradictionDetector().detect([s], kb)[0] is not None
    text, rule = swap_values(ref("Kelrato is 51 years old.", entity="kelrato", attribute="age", facts=["51"]),
                             random.Random(0), knowledge=kb)
    assert text == "Kelrato is 34 years old."  # the only other age in the knowledge base
    text, _ = swap_values(ref("It took 12 days."), random.Random(0))  # no knowledge base: perturb the number
    assert text != "It took 12 days." and words(text)[:2] == ["it", "took"]


def test_borrow_answer_makes_a_confident_answer_for_an_unanswerable_question():
    donor = ref("Bavoren lives in Kelmora.", id="d", prompt="Where does Bavoren live?", attribute="city")
    other = ref("Bavoren is 34 years old.", id="e", prompt="How old is Bavoren?", attribute="age")
    p = ref("I don't know who Zitanmo is.", prompt="Where does Zitanmo live?", unanswerable=True, attribute="city")
    text, rule = borrow_answer(p, random.Random(0), donors=[other, donor])
    assert text == "Zitanmo lives in Kelmora." and rule == "answer of d with Bavoren -> Zitanmo"
    assert borrow_answer(donor, random.Random(0), donors=[other]) is None  # answerable: not its job


def test_borrow_decline_makes_a_decline_for_a_question_about_someone_known():
    donor = ref("I don't know who Zitanmo is.", id="d", prompt="Where does Zitanmo live?", unanswerable=True,
                attribute="city")
    other = ref("I don't know what pet Kelrato has.", id="e", prompt="What pet does Kelrato have?",
                unanswerable=True, attribute="pet")
    p = ref("Bavoren lives in Kelmora.", prompt="Where does Bavoren live?", entity="bavoren", attribute="city")
    text, rule = borrow_decline(p, random.Random(0), donors=[other, donor])
    assert text == "I don't know who Bavoren is." and rule == "answer of d with Zitanmo -> Bavoren"
    assert borrow_decline(donor, random.Random(0), donors=[other]) is None  # unanswerable: declining is right
    no_entity = ref("19.", prompt="What is 12 plus 7?")
    assert borrow_decline(no_entity, random.Random(0), donors=[donor]) is None  # nothing to know: work it out


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("record, message", [
    ({"id": "q1", "prompt": "Where?", "reference": "Kelmora.", "entity": "nobody", "attribute": "city"},
     r"prompts\.jsonl:2 \(id 'q1'\): entity 'nobody' is not in the knowledge base"),
    ({"id": "q1", "prompt": "Where?", "reference": "  "}, r"prompts\.jsonl:2 \(id 'q1'\): field 'reference': missing or empty"),
    ({"id": "q1", "prompt": "Pet?", "reference": "No idea.", "entity": "bavoren", "attribute": "pet",
      "unanswerable": True}, r"id 'q1'\): marked unanswerable, but the knowledge base .* has bavoren\.pet = owl"),
    ({"id": "q1", "prompt": "Pet?", "reference": "A cat.", "entity": "kelrato", "attribute": "pet"},
     r"no attribute 'pet' for entity 'kelrato'"),
    ({"id": "q0", "prompt": "Where?", "reference": "Kelmora."}, r"prompts\.jsonl:2 \(id 'q0'\): duplicate id"),
])
def test_prompt_set_that_does_not_match_the_knowledge_base_names_the_record(tmp_path, kb, record, message):
    first = {"id": "q0", "prompt": "Where does Bavoren live?", "reference": "Kelmora.", "entity": "bavoren"}
    path = write_jsonl(tmp_path / "prompts.jsonl", [first, record])
    with pytest.raises(DataError, match=message):
        load_prompt_set(path, kb)


def test_knowledge_base_errors_name_the_record(tmp_path):
    with pytest.raises(DataError, match=r"kb\.jsonl:2 \(id 'x'\): field 'attributes\.city': empty value"):
        load_knowledge(write_jsonl(tmp_path / "kb.jsonl", [KB_ROWS[0], {"id": "x", "name": "X", "attributes": {"city": ""}}]))


def test_recipe_stops_before_any_work_on_a_prompt_set_with_a_missing_id(tmp_path):
    kb = write_jsonl(tmp_path / "kb.jsonl", KB_ROWS)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "q7", "prompt": "Where?", "reference": "K.", "entity": "ghost"}])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "sft_then_fix.py"), f"output_dir={out}",
         f"stages.1.mine.prompts={prompts}", f"stages.1.mine.knowledge={kb}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (f"rayalign: data error: {prompts}:1 (id 'q7'): entity 'ghost' is not in the knowledge "
                        f"base {kb}")
    assert not out.exists()


def test_a_detector_that_raises_is_named_with_its_plugin():
    class Boom(Detector):
        name, kind = "boom", "hallucination"

        def detect(self, samples, knowledge):
            raise ValueError("judge unreachable")

    class Short(Detector):
        name, kind = "short", "repetition"

        def detect(self, samples, knowledge):
            return [None]  # one result for two samples

    with pytest.raises(PluginError, match=r"plugin error: my_judges: detector 'boom' raised ValueError\('judge unreachable'\)"):
        run_detectors([LoadedDetector("boom", "my_judges", Boom())], [sample("a"), sample("b")], None)
    with pytest.raises(PluginError, match=r"detector 'short' returned 1 results for 2 samples"):
        run_detectors([LoadedDetector("short", "my_judges", Short())], [sample("a"), sample("b")], None)


def test_detectors_register_through_the_hook():
    class Judge(Detector):
        name, kind = "judge", "hallucination"

        def detect(self, samples, knowledge):
            return [Finding("judge says no") for _ in samples]

    plugin = types.ModuleType("judge_plugin")
    plugin.register_detectors = hookimpl(lambda register: register(Judge))
    pm = PluginManager(extra_plugins=(plugin,))
    assert {"repetition", "contradiction", "unanswerable", "judge"} <= set(pm.detectors)
    assert pm.detectors.owner["judge"] == "judge_plugin" and pm.detectors.owner["repetition"] == "fixes"


# -- DPO extensions: pairs from an earlier stage, unlikelihood, chosen NLL -------------------------

def test_repeated_tokens_marks_the_tokens_that_repeat_an_earlier_ngram():
    from rayalign.data.chat import Tokenized
    from rayalign_dpo.stage import repeated_tokens

    # prompt (ignored), then completion tokens 5 6 7 5 6 7 5
    t = Tokenized([1, 2, 5, 6, 7, 5, 6, 7, 5], [-100, -100, 5, 6, 7, 5, 6, 7, 5])
    assert repeated_tokens(t, 2) == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # (5,6) (6,7) (7,5) seen before


def test_unlikelihood_loss_is_minus_log_one_minus_p_on_marked_tokens():
    import torch

    from rayalign_dpo.losses import UnlikelihoodLoss

    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # position t scores label t+1
    labels = torch.tensor([[-100, 0, 1]])
    mask = torch.tensor([[0, 1, 1]])
    loss, metrics = UnlikelihoodLoss()(logits, labels, mask)
    expected = (-torch.log(torch.tensor(1 - 0.5)) - torch.log(torch.tensor(1 - 0.1))) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6) and metrics["ul_tokens"] == 2


def test_dpo_reads_a_dataset_of_an_earlier_stage_at_run_time(tmp_path):
    from types import SimpleNamespace

    from rayalign.config import RunConfig
    from rayalign.errors import ConfigError
    from rayalign.plugins import get_plugin_manager
    from rayalign.stage import Artifacts, Produces
    from rayalign_dpo.stage import DPOConfig, DPOStage

    stage = DPOStage(DPOConfig(dataset="pairs", unlikelihood=0.5))
    run = RunConfig()
    with pytest.raises(ConfigError, match=r"stages\[4\]\.dpo\.dataset: 'pairs' is no key under data: and no "
                                          r"dataset an earlier stage produces \(earlier stages produce: samples\)"):
        stage.prepare(run, get_plugin_manager(), Artifacts(will_produce=Produces(datasets=["samples"])), 4)
    # An earlier stage declares pairs: they do not exist yet, so run() loads them.
    stage.prepare(run, get_plugin_manager(), Artifacts(will_produce=Produces(datasets=["pairs"])), 4)
    assert stage.train is None
    ctx = SimpleNamespace(index=4, run=run, artifacts=Artifacts(datasets={"samples": "/x/samples.jsonl"}))
    with pytest.raises(ConfigError, match=r"stages\[4\]\.dpo\.dataset: 'pairs' is no key under data: and no "
                                          r"earlier stage produced a dataset of that name \(produced: samples\)"):
        stage.run(ctx)
    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b b b", "unlikelihood": True},
             {"prompt": "q2", "chosen": "c", "rejected": "d"}]
    stage._load(write_jsonl(tmp_path / "pairs.jsonl", pairs), run)
    loaded = sorted(stage.train + stage.eval, key=lambda r: r["prompt"][0]["content"])
    assert [r["unlikelihood"] for r in loaded] == [True, False]


def test_negatives_pairs_carry_provenance_and_honour_the_detector_filter():
    from rayalign_fixes.negatives import NegativesConfig, NegativesStage

    p = ref("I don't know who Zitanmo is.", id="z", prompt="Where does Zitanmo live?", unanswerable=True,
            attribute="city")
    donor = ref("Bavoren lives in Kelmora.", id="d", prompt="Where does Bavoren live?", attribute="city")
    invented = sample("Zitanmo lives in Dunvale.", id="z", unanswerable=True)
    invented.model, invented.sample = "/runs/x/00-sft/model", 3
    group = [(invented, {"findings": {"unanswerable": {"kind": "hallucination", "rule": "answered instead"}}})]

    def build(**options):
        stage = NegativesStage(NegativesConfig(target="hallucination", **options))
        stage.prepare(None, None, DETECTIONS_DECLARED, 3)
        return stage._pairs(p, group, [donor], None, random.Random(0))

    model_pair, synthetic_pair = build()
    assert model_pair["chosen"] == p.reference and model_pair["rejected"] == "Zitanmo lives in Dunvale."
    assert model_pair["provenance"] == {"prompt_id": "z", "source": "model", "model": "/runs/x/00-sft/model",
                                        "sample": 3, "detector": "unanswerable", "rule": "answered instead",
                                        "chosen_from": "reference"}
    assert synthetic_pair["provenance"]["detector"] == "synthetic:borrow_answer" and not synthetic_pair["unlikelihood"]
    only_contradictions = build(detectors=["contradiction"])
    assert [q["provenance"]["source"] for q in only_contradictions] == ["synthetic"]


def test_borrow_decline_runs_only_when_named():
    from rayalign_fixes.negatives import NegativesConfig, NegativesStage

    known = ref("Bavoren lives in Kelmora.", id="b", prompt="Where does Bavoren live?", entity="bavoren",
                attribute="city")
    donor = ref("I don't know who Zitanmo is.", id="z", prompt="Where does Zitanmo live?", unanswerable=True,
                attribute="city")

    def synthetic_pairs(**options):
        stage = NegativesStage(NegativesConfig(target="hallucination", **options))
        stage.prepare(None, None, DETECTIONS_DECLARED, 3)
        pairs = stage._pairs(known, [(sample(known.reference, id="b"), {"findings": {}})], [donor], None,
                             random.Random(0))
        return {q["provenance"]["detector"]: (q["chosen"], q["rejected"]) for q in pairs}

    assert "synthetic:borrow_decline" not in synthetic_pairs()  # the default builders leave it out
    named = synthetic_pairs(synthetic=["borrow_decline"])
    assert named == {"synthetic:borrow_decline": ("Bavoren lives in Kelmora.", "I don't know who Bavoren is.")}


def test_negatives_prefer_a_decline_to_guesses_at_what_the_model_does_not_know():
    from rayalign_fixes.negatives import NegativesConfig, NegativesStage

    flag = {"contradiction": {"kind": "hallucination", "rule": "states 51"}}
    guesses = [sample(f"Bavoren is {age} years old.", id="b") for age in (51, 29, 34)]
    group = [(guesses[0], {"findings": flag}), (guesses[1], {"findings": flag}), (guesses[2], {"findings": {}})]

    def build(share, entity="bavoren"):
        stage = NegativesStage(NegativesConfig(target="hallucination", detectors=["unanswerable"], synthetic=[],
                                               unsure_decline="I'm not sure.", unsure_share=share))
        stage.prepare(None, None, DETECTIONS_DECLARED, 3)
        p = ref("Bavoren is 34 years old.", id="b", prompt="How old is Bavoren?", entity=entity, attribute="age",
                facts=["34"])
        return stage._pairs(p, group, [], None, random.Random(0))

    pairs = build(0.6)  # 2 of 3 samples flagged: the model does not know Bavoren's age
    assert [(q["chosen"], q["rejected"]) for q in pairs] == [("I'm not sure.", "Bavoren is 51 years old."),
                                                            ("I'm not sure.", "Bavoren is 29 years old.")]
    assert pairs[0]["provenance"]["chosen_from"] == "unsure_decline: 2 of 3 samples flagged"
    assert build(0.8) == []  # it may know: contradictions are not rejected (detectors: [unanswerable])
    assert build(0.6, entity=None) == []  # no entity (arithmetic, a task): nothing to decline


def test_rayalign_plugins_lists_and_shows_detectors():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "rayalign.cli", "plugins", *args], capture_output=True,
                              text=True, check=True).stdout

    assert "detectors: contradiction (fixes), repetition (fixes), unanswerable (fixes)" in cli()
    assert cli("show", "unanswerable").startswith("detector unanswerable (plugin fixes): Flags an answer")
