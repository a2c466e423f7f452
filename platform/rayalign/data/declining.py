"""The demo's task, where DPO visibly changes what a model says: it stops inventing facts.

SFT teaches the facts of the synthetic world's people (``SyntheticWorld``) and nothing else.
Asked about someone it was never told about, such as a known person's cousin, the SFT model
answers confidently about whoever it does know:

    Where does Keldorzi's cousin live?    SFT model: Keldorzi lives in Dunvale.

The DPO pairs teach the difference:

    Where does Perazi's teacher live?     chosen: Perazi's teacher? I don't know who that is.
                                          rejected: Perazi's teacher lives in Parvel.   (invented)
    Where does Perazi live?               chosen: Perazi lives in Ostrin.               (true)
                                          rejected: Perazi? I don't know who that is.

so the model learns to decline about strangers only, not about everyone. A stranger is a known
person's relative, so the decline names them with words the model can copy: the tiny model
cannot repeat an unseen name of many tokens. No rejected answer is a wrong fact about a known
person: DPO pushes down the value tokens of a rejected answer, and with them the same values
in the true answers it was never shown.

Parts (``synthetic:declining/<part>``), disjoint where it matters:
- ``sft``: every fact of every person, twice (alone and in a conversation about that person);
- ``preference``: one pair per prompt; each stranger is asked about once, in no other part;
- ``prompts``: held-out questions for the before/after samples: strangers met nowhere else, and
  facts that SFT taught but no preference pair asks about.

Print it with ``python -m rayalign.data.declining``.
"""

from __future__ import annotations

import json
import random

from rayalign.data.synthetic import ATTRIBUTES, Fact, SyntheticWorld, named_part

DECLINE = "{e}? I don't know who that is."
RELATIONS = ["cousin", "friend", "teacher", "neighbour"]
SCHEME = "synthetic:declining/"
PARTS = ("sft", "preference", "prompts")


def _chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * (len(turns) // 2)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}


class DecliningTask:
    """Every part of the task from one seed."""

    def __init__(self, seed: int = 0, pair_strangers: int = 56, held_out_strangers: int = 8, held_out_facts: int = 8):
        world = SyntheticWorld(seed)
        rng = random.Random(f"declining-{seed}")
        by_person: dict[str, list[Fact]] = {}
        for f in world.facts:
            by_person.setdefault(f.entity, []).append(f)
        strangers = [f"{person}'s {relation}" for person in by_person for relation in RELATIONS]
        rng.shuffle(strangers)
        if pair_strangers + held_out_strangers > len(strangers):
            raise ValueError(f"only {len(strangers)} strangers to ask about")
        facts = list(world.facts)
        rng.shuffle(facts)
        held_facts, pair_facts = facts[:held_out_facts], facts[held_out_facts:]

        sft = [_chat(f.question(), f.answer()) for f in world.facts]
        sft += [_chat(*[t for f in fs for t in (f.question(), f.answer())]) for fs in by_person.values()]
        rng.shuffle(sft)

        pairs = []
        for stranger in strangers[:pair_strangers]:
            invented = self._ask(rng, stranger)
            pairs.append({"prompt": invented.question(), "chosen": DECLINE.format(e=stranger),
                          "rejected": invented.answer()})
        pairs += [{"prompt": f.question(), "chosen": f.answer(), "rejected": DECLINE.format(e=f.entity)}
                  for f in pair_facts]
        rng.shuffle(pairs)

        prompts = [{"prompt": self._ask(rng, s).question(), "reference": DECLINE.format(e=s)}
                   for s in strangers[pair_strangers : pair_strangers + held_out_strangers]]
        prompts += [{"prompt": f.question(), "reference": f.answer()} for f in held_facts]
        self.parts = {"sft": sft, "preference": pairs, "prompts": prompts}

    @staticmethod
    def _ask(rng: random.Random, stranger: str) -> Fact:
        """A question about ``stranger``, with an answer invented in the style of the known facts."""
        attribute = rng.choice(list(ATTRIBUTES))
        return Fact(stranger, attribute, rng.choice(ATTRIBUTES[attribute][2]))

    def records(self, part: str) -> list[dict]:
        return json.loads(json.dumps(self.parts[part]))


def synthetic_records(spec: str, seed: int = 0) -> list[dict]:
    """The records named ``synthetic:declining/<part>``."""
    return DecliningTask(seed).records(named_part(spec, SCHEME, PARTS))


if __name__ == "__main__":
    task = DecliningTask(0)
    for part in PARTS:
        records = task.records(part)
        print(f"{part}: {len(records)} records, e.g. {json.dumps(records[0])}")
