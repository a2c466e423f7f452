"""A seeded synthetic world for the embedded default: invented people and their facts.

Everything the model should know is generated here from one seed, so a user can print the
knowledge base and see exactly what a correct answer is. Later stages reuse the world: chat
data for SFT, preference pairs for DPO (a correct answer beats a wrong or looping one), and
held-out questions for rollouts.

    world = SyntheticWorld(seed=0)
    for fact in world.facts: print(fact.question(), fact.answer())
"""

from __future__ import annotations

import random
from dataclasses import dataclass

def named_part(spec: str, scheme: str, parts: tuple[str, ...], bare: str | None = None) -> str:
    """The part that ``spec`` (``<scheme><part>``, e.g. ``synthetic:arithmetic/sft``) names.

    ``bare``: the part the scheme names without a part (``synthetic:knowledge``). Anything else is a
    DataError that lists every name the task knows.
    """
    if bare is not None and spec == scheme.rstrip("/"):
        return bare
    part = spec[len(scheme):] if spec.startswith(scheme) else None
    if part not in parts:
        from rayalign.errors import DataError

        known = ([scheme.rstrip("/")] if bare else []) + [scheme + p for p in parts if p != bare]
        raise DataError(spec, f"unknown synthetic dataset (known: {', '.join(known)})")
    return part


_SYLLABLES = ["ba", "vo", "ren", "kel", "mo", "ra", "zi", "tan", "lu", "pe", "dor", "fi", "na", "sul", "qui", "ter"]
_CITIES = ["Kelmora", "Dunvale", "Parvel", "Ostrin", "Belgar", "Mirrow", "Tessan", "Yorrim"]
_JOBS = ["baker", "sailor", "painter", "miner", "weaver", "healer", "scribe", "smith"]
_COLORS = ["red", "blue", "green", "amber", "violet", "silver", "black", "white"]

# attribute -> (question template, answer template, pool of values)
ATTRIBUTES: dict[str, tuple[str, str, list[str]]] = {
    "city": ("Where does {e} live?", "{e} lives in {v}.", _CITIES),
    "job": ("What is the job of {e}?", "{e} works as a {v}.", _JOBS),
    "color": ("What is the favorite color of {e}?", "The favorite color of {e} is {v}.", _COLORS),
}


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    def question(self) -> str:
        return ATTRIBUTES[self.attribute][0].format(e=self.entity)

    def answer(self, value: str | None = None) -> str:
        return ATTRIBUTES[self.attribute][1].format(e=self.entity, v=value or self.value)


class SyntheticWorld:
    """A knowledge base of ``num_entities`` invented people, each with every attribute."""

    def __init__(self, seed: int = 0, num_entities: int = 24):
        self.rng = random.Random(seed)
        names: list[str] = []
        while len(names) < num_entities:
            name = "".join(self.rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
            if name not in names:
                names.append(name)
        self.facts = [
            Fact(name, attr, self.rng.choice(pool)) for name in names for attr, (_, _, pool) in ATTRIBUTES.items()
        ]

    def wrong_value(self, fact: Fact) -> str:
        pool = [v for v in ATTRIBUTES[fact.attribute][2] if v != fact.value]
        return self.rng.choice(pool)

    def chat_examples(self) -> list[dict]:
        """One single-turn and one two-turn conversation per entity, covering every fact."""
        examples = [
            {"messages": [{"role": "user", "content": f.question()}, {"role": "assistant", "content": f.answer()}]}
            for f in self.facts
        ]
        by_entity: dict[str, list[Fact]] = {}
        for f in self.facts:
            by_entity.setdefault(f.entity, []).append(f)
        for facts in by_entity.values():
            a, b = facts[0], facts[1]
            examples.append(
                {
                    "messages": [
                        {"role": "user", "content": a.question()},
                        {"role": "assistant", "content": a.answer()},
                        {"role": "user", "content": b.question()},
                        {"role": "assistant", "content": b.answer()},
                    ]
                }
            )
        self.rng.shuffle(examples)
        return examples

    def preference_pairs(self) -> list[dict]:
        """Correct answer (chosen) against a wrong fact or a looping answer (rejected)."""
        pairs = []
        for f in self.facts:
            wrong = f.answer(self.wrong_value(f))
            looping = " ".join([f.answer()] * 4)
            for rejected in (wrong, looping):
                pairs.append({"prompt": f.question(), "chosen": f.answer(), "rejected": rejected})
        self.rng.shuffle(pairs)
        return pairs

    def corpus(self) -> list[str]:
        """Every text the tokenizer should cover well."""
        texts = [f.question() + " " + f.answer() for f in self.facts]
        texts += [f.answer(v) for f in self.facts for v in ATTRIBUTES[f.attribute][2]]
        return texts
