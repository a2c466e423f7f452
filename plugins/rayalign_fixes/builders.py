"""Synthetic negatives: a reference turned into a plausible wrong answer, with the rule that made it.

- ``loop_span``: the reference with a span looped, as a degenerate model writes it: the text up to
  a sentence and then that sentence again and again, never finishing (a text with no sentence end:
  its last words). Chosen and rejected then part exactly where the answer should go on or stop,
  so the pair teaches that and not against the fact tokens the loop repeats. Trains the
  repetition fix.
- ``swap_values``: the reference with one stated fact replaced by a wrong value drawn from the same
  knowledge-base attribute (a city by another city, an age by another age), or an entity's name by
  another entity's. Trains the hallucination fix on answerable questions.
- ``borrow_answer``: for a question the data marks unanswerable, a confident answer borrowed from
  an answerable question of the same shape ("What pet does Kelrato have?" gets "Kelrato has a pet
  owl." from "What pet does Bavoren have?"). Trains declining instead of inventing.
- ``borrow_decline``: the mirror image, for an answerable question about a known entity: a decline
  borrowed from an unanswerable question of the same shape ("Where does Bavoren live?" gets "I
  don't know who Bavoren is." from "Where does Zitanmo live?"). Without it, a fix that teaches
  declining also teaches declining what the model knows (false declines cost task accuracy).
  Opt-in (``OPT_IN``): a stage runs it only when ``synthetic:`` names it.

Each builder returns ``(text, rule)`` or ``None`` when it does not apply to a prompt.
"""

from __future__ import annotations

import difflib
import random
import re
from typing import Callable

from rayalign.evaluation.references import KnowledgeBase, RefPrompt
from rayalign.evaluation.text import mentions, numbers

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def loop_span(p: RefPrompt, rng: random.Random, repeats: int = 4, **_) -> tuple[str, str] | None:
    sentences = [s for s in _SENTENCE_END.split(p.reference.strip()) if s]
    if sentences and sentences[-1][-1] in ".!?":
        i = rng.randrange(len(sentences))
        text = " ".join(sentences[: i + 1] + [sentences[i]] * repeats)
        return text, f"sentence {i + 1} of the reference looped x{repeats + 1}"
    body = " ".join(sentences)
    tokens = body.split()
    if len(tokens) < 2:
        return None
    k = min(3, len(tokens) - 1)
    span = " ".join(tokens[-k:])
    return f"{body} " + " ".join([span] * repeats), f"last {k} words of the reference looped x{repeats + 1}"


def _replace(text: str, old: str, new: str) -> str:
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new, text, flags=re.IGNORECASE)


def swap_values(p: RefPrompt, rng: random.Random, knowledge: KnowledgeBase | None = None, **_) -> tuple[str, str] | None:
    if p.unanswerable:
        return None
    candidates: list[tuple[str, list[str]]] = []  # (value stated in the reference, wrong values for it)
    entity = knowledge.entities.get(p.entity) if knowledge is not None and p.entity else None
    if knowledge is not None:
        domains = knowledge.domains()
        attrs = [p.attribute] if p.attribute in domains else sorted(domains)
        for attr in attrs:
            # Wrong for this attribute: another entity's value that this one does not have for it.
            own = set(entity.attributes.get(attr, [])) if entity is not None else set(p.facts)
            for value in sorted(domains[attr]):
                if (not p.facts or value in p.facts) and mentions(p.reference, value):
                    wrong = sorted(v for v in domains[attr] if v not in own and v != value)
                    if wrong:
                        candidates.append((value, wrong))
        if not candidates and entity is not None:  # no fact to swap: swap the entity itself
            others = sorted(domains["name"] - {entity.name})
            if mentions(p.reference, entity.name) and others:
                candidates.append((entity.name, others))
    if not candidates:  # no knowledge base, or nothing of it stated: perturb a number
        for n in sorted(numbers(p.reference)):
            candidates.append((n, [str(int(float(n)) + d) for d in (-3, -2, -1, 1, 2, 3) if int(float(n)) + d >= 0]))
    if not candidates:
        return None
    value, wrong = rng.choice(candidates)
    new = rng.choice(wrong)
    return _replace(p.reference, value, new), f"swapped {value} -> {new}"


def _borrow(p: RefPrompt, rng: random.Random, donors: list[RefPrompt], unanswerable: bool) -> tuple[str, str] | None:
    """The reference of a donor question of the same shape about someone else, with the name swapped.

    ``unanswerable`` picks the donors: answerable ones lend a confident answer, unanswerable ones
    a decline. Same shape: the two questions differ in one run of words (the name).
    """
    target = p.question.split()
    shaped = [d for d in donors if d.unanswerable == unanswerable and (p.attribute is None or d.attribute == p.attribute)]
    rng.shuffle(shaped)
    for donor in shaped:
        source = donor.question.split()
        ops = [op for op in difflib.SequenceMatcher(a=source, b=target, autojunk=False).get_opcodes() if op[0] != "equal"]
        if len(ops) != 1 or ops[0][0] != "replace":
            continue  # not the same question about someone else
        _, i1, i2, j1, j2 = ops[0]
        old, new = " ".join(source[i1:i2]).strip("?.,!"), " ".join(target[j1:j2]).strip("?.,!")
        if old and mentions(donor.reference, old):
            return _replace(donor.reference, old, new), f"answer of {donor.id} with {old} -> {new}"
    return None


def borrow_answer(p: RefPrompt, rng: random.Random, donors: list[RefPrompt] = (), **_) -> tuple[str, str] | None:
    return _borrow(p, rng, donors, unanswerable=False) if p.unanswerable else None


def borrow_decline(p: RefPrompt, rng: random.Random, donors: list[RefPrompt] = (), **_) -> tuple[str, str] | None:
    return _borrow(p, rng, donors, unanswerable=True) if not p.unanswerable and p.entity else None


BUILDERS: dict[str, tuple[str, Callable[..., tuple[str, str] | None]]] = {  # name -> (kind, builder)
    "loop_span": ("repetition", loop_span),
    "swap_values": ("hallucination", swap_values),
    "borrow_answer": ("hallucination", borrow_answer),
    "borrow_decline": ("hallucination", borrow_decline),
}
# Builders a negatives stage runs only when its `synthetic:` names them. With other settings changed
# alongside, borrow_decline did worse over three seeds of the embedded task
# (benchmarks/results/trials/): not a default until it is measured on its own.
OPT_IN = {"borrow_decline"}
