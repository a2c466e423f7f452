"""A seeded synthetic knowledge task on which a tiny model, after SFT, both loops and hallucinates.

The world is ``num_people`` invented people, and ``num_test_people`` more for the test split. Each
has a home city, a job, an age, a list of 5-10 cities visited (in a per-person order) and, for
about two in three, a pet. Questions and the answers the model should give::

    Where does Bavoren live?            Bavoren lives in Kelmora.
    What is the job of Bavoren?         Bavoren works as a baker.
    How old is Bavoren?                 Bavoren is 34 years old.
    Which cities has Bavoren visited?   Bavoren has visited Dunvale, Parvel, Ostrin, Belgar and Mirrow.
    What pet does Bavoren have?         Bavoren has a pet owl.
    What pet does Kelrato have?         I don't know what pet Kelrato has.     (no pet on record)
    Where does Zitanmo live?            I don't know who Zitanmo is.           (nobody of that name)

plus general skills that have nothing to do with the knowledge base (the forgetting check)::

    What is 12 plus 7?                  12 plus 7 is 19.
    Count from 3 to 9.                  3, 4, 5, 6, 7, 8, 9.

Why both failures occur naturally after SFT of the tiny embedded model:
- Visited lists are long and drawn from the same eight cities in a different order per person. A
  small model that half-remembers an order falls into a cycle ("X went to Dunvale. X went to
  Parvel. X went to Dunvale. ...") and loops until the token limit. Their lengths vary widely (5
  to 10 cities), so the model cannot stop by a length habit: it stops where it remembers the end.
  With 3 to 6 cities the model learned the habit, and whether it looped at all then depended on
  the CPU's floating point (2 of 117 answers on one machine, over 5% on another).
- Declines are rare in the SFT data (a third of the people without a pet, one in six of the unknown
  names), so for most unfamiliar names and missing pets the model answers in the confident form
  it saw far more often and invents the fact, usually about the known person whose name looks
  closest. Unknown people are named from other syllables than known ones, so declining on them is
  learnable: the fix has something to teach.

Splits (built from one seed, disjoint where it matters):
- ``sft``: every answerable question of every person (the short facts twice), the general skills,
  and declines for one third of the unanswerable questions;
- ``mine``: the prompts the fix stages sample: half of the answerable questions, half of the
  remaining unanswerable ones, and the general-skill prompts SFT trained on (replayed by the fix);
- ``eval``: the other half of the answerable questions and the other unanswerable ones
  (never mined, so the fix is measured on questions it did not train on). The recipe's
  hyperparameters were tuned on it: it is the *tuning* split;
- ``test``: ``eval``'s twin for 16 more people and 45 more unknown names, drawn from a random
  stream of their own after everything above: their facts and declines join ``sft`` and half of
  their questions ``mine`` as everyone's do; the other half are the test. No tuning ever measured
  a test prompt: the recipe evaluates on them;
- ``general``: general-skill examples that SFT never saw (no question of them is in ``sft`` or
  ``mine``), for the held-out forgetting loss.

See what the model should know with ``python -m rayalign.data.knowledge`` (``--out DIR`` writes
every split as the JSONL files the stages read: knowledge.jsonl, sft.jsonl, mine.jsonl,
eval.jsonl, test.jsonl, general.jsonl).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rayalign.data.synthetic import _CITIES, _JOBS, _SYLLABLES, named_part

PETS = ["cat", "dog", "owl", "goat", "horse", "fox", "crow", "hare"]
# Cities on a journey, fewest and most (see the module docstring for why the range is wide).
JOURNEY_CITIES = (5, 10)
# Unknown people are named from other syllables: a model *can* tell that it never met them.
_FOREIGN_SYLLABLES = ["gra", "hul", "wex", "jom", "yag", "plo", "bri", "dwe", "oks", "vix", "hom", "gub"]
DECLINE_PET = "I don't know what pet {e} has."
DECLINE_WHO = "I don't know who {e} is."

# attribute -> (question, answer); the answer's {v} is the value (a list is spelled "A, B and C")
QUESTIONS: dict[str, tuple[str, str]] = {
    "city": ("Where does {e} live?", "{e} lives in {v}."),
    "job": ("What is the job of {e}?", "{e} works as a {v}."),
    "age": ("How old is {e}?", "{e} is {v} years old."),
    "journey": ("Describe the journey of {e}.", "{v}"),
    "pet": ("What pet does {e} have?", "{e} has a pet {v}."),
}
JOURNEY_SENTENCE = "{e} went to {v}."  # one city of a journey
# attribute -> the sentence that states one of its values: what an answer asserts, for the fact judge
CLAIM_SENTENCES: dict[str, str] = {a: JOURNEY_SENTENCE if a == "journey" else q[1] for a, q in QUESTIONS.items()}


def spell(value, entity: str = "") -> str:
    """A value in an answer: a journey [A, B] reads "Bavoren went to A. Bavoren went to B."."""
    if isinstance(value, list):
        return " ".join(JOURNEY_SENTENCE.format(e=entity, v=v) for v in value)
    return str(value)


def _journey(rng: random.Random, start: str, length: int) -> list[str]:
    """A walk over the cities that may revisit one, but never repeats a stretch back to back."""
    from rayalign.evaluation.text import find_loop

    while True:
        walk = [start]
        while len(walk) < length:
            walk.append(rng.choice([c for c in _CITIES if c not in walk[-2:]]))
        if find_loop(walk) is None:
            return walk


def _names(rng: random.Random, syllables: list[str], count: int, avoid: list[str] = ()) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(syllables) for _ in range(3)).capitalize()
        if name not in names and name not in avoid:
            names.append(name)
    return names


def _person(rng: random.Random, name: str) -> dict:
    city = rng.choice(_CITIES)
    attributes = {
        "city": city,
        "job": rng.choice(_JOBS),
        "age": rng.randint(18, 89),
        "journey": _journey(rng, city, rng.randint(*JOURNEY_CITIES) + 1)[1:],
    }
    if rng.random() < 0.65:
        attributes["pet"] = rng.choice(PETS)
    return {"id": name.lower(), "name": name, "attributes": attributes}


def _thirds(items: list) -> tuple[list, list, list]:
    k = len(items)
    return items[: k // 3], items[k // 3 : 2 * k // 3], items[2 * k // 3 :]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


class KnowledgeTask:
    """The knowledge base, and every split of the task, from one seed."""

    def __init__(self, seed: int = 0, num_people: int = 32, num_unknown: int = 90, num_test_people: int = 16,
                 num_test_unknown: int = 45):
        rng = random.Random(f"knowledge-{seed}")
        self.people = [_person(rng, name) for name in _names(rng, _SYLLABLES, num_people)]
        self.unknown = _names(rng, _FOREIGN_SYLLABLES, num_unknown)
        self._build_splits(rng)
        # The test split's people and strangers come from a stream of their own, drawn after all of the
        # above: the mine and eval prompts stay those the recipe was tuned on, and no test prompt was
        # ever measured while tuning.
        test_rng = random.Random(f"knowledge-{seed}-test")
        taken = [p["name"] for p in self.people]
        test_people = [_person(test_rng, n) for n in _names(test_rng, _SYLLABLES, num_test_people, avoid=taken)]
        test_unknown = _names(test_rng, _FOREIGN_SYLLABLES, num_test_unknown, avoid=self.unknown)
        sft, mine, self.splits["test"] = self._partition(test_people, test_unknown, test_rng)
        self.people += test_people
        self.unknown += test_unknown
        self.splits["mine"] += mine
        self.splits["sft"] += sft
        test_rng.shuffle(self.splits["sft"])

    # -- the knowledge base -------------------------------------------------------------------
    def knowledge_base(self) -> list[dict]:
        return [json.loads(json.dumps(p)) for p in self.people]

    def _partition(self, people: list[dict], unknown_names: list[str], rng: random.Random):
        """(sft chats, mine prompts, held-out prompts) of a group of people and strangers."""
        answerable, no_pet = [], []
        for p in people:
            for attr in QUESTIONS:
                (answerable if attr in p["attributes"] else no_pet).append(self._question(p, attr))
        unknown = [self._unknown_question(name, rng.choice(list(QUESTIONS))) for name in unknown_names]
        rng.shuffle(answerable)
        rng.shuffle(no_pet)
        half = len(answerable) // 2
        pet_sft, pet_mine, pet_held = _thirds(no_pet)
        # Few declines in SFT (1 in 6 unknown names): the model sees the confident form far more often.
        k = len(unknown) // 6
        who_sft, who_mine, who_held = unknown[:k], unknown[k : (len(unknown) + k) // 2], unknown[(len(unknown) + k) // 2 :]
        # Short facts twice, journeys once: the model learns who is who, but half-remembers journeys.
        facts = [q for q in answerable if q["attribute"] != "journey"]
        sft = [_chat(q["prompt"], q["reference"]) for q in answerable + facts + pet_sft + who_sft]
        return sft, answerable[:half] + pet_mine + who_mine, answerable[half:] + pet_held + who_held

    def _build_splits(self, rng: random.Random) -> None:
        sft, mine, held = self._partition(self.people, self.unknown, rng)
        self.splits = {"mine": mine, "eval": held}
        general = self._general(rng)
        trained = general[: len(general) * 2 // 3]
        sft += trained
        # Mining the general prompts SFT trained on replays them during the fix (their references are
        # chosen answers), so the fix does not erode what SFT taught besides the knowledge base.
        self.splits["mine"] += [
            {"id": f"general.{i}", "prompt": r["messages"][0]["content"], "reference": r["messages"][1]["content"],
             "unanswerable": False} for i, r in enumerate(trained)
        ]
        rng.shuffle(sft)
        self.splits["sft"] = sft
        # Held out means unseen: a drawn example whose question SFT trained on ("Count from 4 to 7."
        # can be drawn twice) is left out of the forgetting check.
        seen = {r["messages"][0]["content"] for r in trained}
        self.splits["general"] = [r for r in general[len(general) * 2 // 3 :] if r["messages"][0]["content"] not in seen]

    def _question(self, person: dict, attr: str) -> dict:
        name, value = person["name"], person["attributes"].get(attr)
        question, answer = QUESTIONS[attr]
        record = {"id": f"{person['id']}.{attr}", "prompt": question.format(e=name), "entity": person["id"],
                  "attribute": attr}
        if value is None:
            return {**record, "reference": DECLINE_PET.format(e=name), "unanswerable": True}
        return {**record, "reference": answer.format(e=name, v=spell(value, name)), "unanswerable": False}

    def _unknown_question(self, name: str, attr: str) -> dict:
        return {"id": f"unknown.{name.lower()}.{attr}", "prompt": QUESTIONS[attr][0].format(e=name),
                "attribute": attr, "reference": DECLINE_WHO.format(e=name), "unanswerable": True}

    @staticmethod
    def _general(rng: random.Random) -> list[dict]:
        """Addition and counting: skills the knowledge fix must not erode."""
        out = []
        pairs = rng.sample([(a, b) for a in range(1, 21) for b in range(1, 21)], 90)
        out += [_chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in pairs]
        for _ in range(45):
            a = rng.randint(1, 12)
            b = a + rng.randint(3, 8)
            out.append(_chat(f"Count from {a} to {b}.", ", ".join(map(str, range(a, b + 1))) + "."))
        rng.shuffle(out)
        return out

    # -- records by kind, for the loaders -----------------------------------------------------
    def records(self, part: str) -> list[dict]:
        """``knowledge``, ``sft``, ``mine``, ``eval``, ``test`` or ``general``."""
        if part == "knowledge":
            return self.knowledge_base()
        if part not in self.splits:
            raise KeyError(part)
        return json.loads(json.dumps(self.splits[part]))

    def write(self, out: Path) -> dict[str, Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for part in PARTS:
            paths[part] = out / f"{part}.jsonl"
            paths[part].write_text("".join(json.dumps(r) + "\n" for r in self.records(part)))
        return paths


PARTS = ("knowledge", "sft", "mine", "eval", "test", "general")
SCHEME = "synthetic:knowledge/"


def synthetic_records(spec: str, seed: int = 0) -> list[dict]:
    """The records named ``synthetic:knowledge/<part>`` (every part is cheap to rebuild)."""
    return KnowledgeTask(seed).records(named_part(spec, SCHEME, PARTS, bare="knowledge"))


def load_synthetic(spec: str, kind: str, formats: list, seed: int = 0) -> list[dict]:
    """``synthetic_records`` converted by the registered formats, as the JSONL loader would."""
    from rayalign.errors import DataError

    if spec.startswith("synthetic:arithmetic/"):
        from rayalign.data import arithmetic

        records = arithmetic.synthetic_records(spec, seed)
    elif spec.startswith("synthetic:declining/"):
        from rayalign.data import declining

        records = declining.synthetic_records(spec, seed)
    elif spec.startswith("synthetic:tools/"):
        from rayalign.data import tools

        records = tools.synthetic_records(spec, seed)
    else:
        records = synthetic_records(spec, seed)
    candidates = [f for f in formats if f.kind == kind]
    out = []
    for i, record in enumerate(records, start=1):
        fmt = next((f for f in candidates if f.matches(record)), None)
        if fmt is None:
            raise DataError(spec, f"holds no {kind} records")
        out.append(fmt.convert(record))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="print (or write) the synthetic knowledge task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write every split as JSONL into this directory")
    args = parser.parse_args(argv)
    task = KnowledgeTask(args.seed)
    if args.out:
        for part, path in task.write(Path(args.out)).items():
            print(f"{part:>10}: {path}")
        return
    for p in task.people:
        attrs = "; ".join(f"{k}={spell(v)}" for k, v in p["attributes"].items())
        print(f"{p['name']:<12} {attrs}")
    print(f"unknown names: {', '.join(task.unknown)}")
    for part in PARTS[1:]:
        print(f"{part}: {len(task.records(part))} records")


if __name__ == "__main__":
    main()
