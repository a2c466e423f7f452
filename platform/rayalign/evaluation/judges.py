"""Judges of an answer that share nothing with the fix's detectors: standard repetition metrics and
a check of every stated fact against the knowledge base.

The fix trains on what its detectors flag, so a table that measured the fix with those detectors
would grade the fix with its own answer key. These judges are defined elsewhere:

- ``seq_rep_n(tokens, 4)``: seq-rep-4 of Welleck et al. 2019 ("Neural Text Generation with
  Unlikelihood Training"), ``1 - |unique 4-grams| / |4-grams|`` of one continuation; the table
  averages it over continuations. A continuation too short to hold a 4-gram scores 0.
- ``rep_w(tokens, 16)``: the share of a continuation's tokens that already occur among the ``w``
  tokens before them (the paper's rep/l family, with l = 16; its code reports 16, 32, 128, 512),
  averaged over continuations. The window is the continuation's own tokens, not the prompt's: an
  answer that names the person the question names repeats nothing.

Both count lower-cased words (``rayalign.evaluation.text.words``), not the tokenizer's tokens.
The paper's tokens were GPT-2-style word pieces (about a word each); the embedded tokenizer has
511 entries and splits "went" into three, so its 4-grams are character chunks, and a right
journey answer ("Bavoren went to Dunvale. Bavoren went to Parvel. ...") repeats "Bavoren went to"
in more than four tokens every sentence: counted in tokens, the reference answers scored close to
the looping SFT model, and the measure saw the template rather than the loops. In words a right
answer repeats a 4-gram only where a journey revisits a city (the evaluation reports the
references' score as the floor). Words also mean the same for every model, so runs with different
tokenizers compare. The repetition detector splits text into the same words; what it computes
from them (a loop: a block repeated back to back) is another measure.

``FactJudge`` reads what an answer asserts. Sentence forms that state a fact (one per attribute,
e.g. ``"{e} lives in {v}."``; the embedded task's are ``rayalign.data.knowledge.CLAIM_SENTENCES``)
turn each sentence of the answer into a claim (subject, attribute, value), and the claim is looked
up in the knowledge base, the world's fact table:

- the subject is a known entity: the value must be that entity's (for a list such as the cities of
  a journey, one of them); an entity with no value for the attribute (no pet) makes any value false;
- the subject is nobody the table knows: a misspelling of the asked entity's name, if the question
  is about a known entity (the claim is checked against it), else a claim about a stranger: false;
- the question is unanswerable (the data says so): any claim at all is an error, true or not: it
  answers with a value where the table has none.

An answer is a *fact error* when one of its claims is. A sentence no form matches asserts nothing
the judge can check; ``FactVerdict.claims`` is then empty, which the evaluation reports as the
share of answers that neither decline nor state a checkable fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from rayalign.evaluation.references import KnowledgeBase
from rayalign.evaluation.text import ngrams

SEQ_REP_N = 4  # Welleck et al.'s sequence-level measure
REP_WINDOW = 16  # the shortest context of the paper's rep/l


def seq_rep_n(tokens: Sequence, n: int = SEQ_REP_N) -> float:
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rep_w(tokens: Sequence, w: int = REP_WINDOW) -> float:
    """Share of tokens after the first that occur among the ``w`` tokens before them (0 for one token)."""
    if len(tokens) < 2:
        return 0.0
    hits = sum(tokens[t] in tokens[max(0, t - w) : t] for t in range(1, len(tokens)))
    return hits / (len(tokens) - 1)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- facts ---------------------------------------------------------------------------------------

_SUBJECT = r"(?P<e>[A-Z][\w'-]*(?: [A-Z][\w'-]*)*)"
_VALUE = r"(?P<v>[^.!?\n]+?)"


@dataclass(frozen=True)
class Claim:
    subject: str  # as written
    attribute: str
    value: str
    error: str | None  # why the claim is wrong, or None


@dataclass
class FactVerdict:
    claims: list[Claim] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [c.error for c in self.claims if c.error]

    def to_json(self) -> dict:
        return {"claims": [[c.subject, c.attribute, c.value] for c in self.claims], "errors": self.errors}


def _pattern(template: str, complete: bool) -> re.Pattern:
    if template.count("{e}") != 1 or template.count("{v}") != 1:
        raise ValueError(f"sentence form {template!r} must hold {{e}} and {{v}} once each")
    body = template.rstrip()
    end = ""
    if body[-1:] in ".!?":  # the sentence's end may be missing only in an answer that was not cut short
        end = rf"(?:{re.escape(body[-1])}|$)" if complete else re.escape(body[-1])
        body = body[:-1]
    regex = re.escape(body).replace(re.escape("{e}"), _SUBJECT).replace(re.escape("{v}"), _VALUE)
    return re.compile(rf"(?<![\w']){regex}{end}")


def _norm(value: str) -> str:
    return " ".join(value.lower().split())


class FactJudge:
    """Claims an answer makes, each checked against the knowledge base (see the module docstring)."""

    def __init__(self, knowledge: KnowledgeBase, sentences: dict[str, str]):
        self.knowledge = knowledge
        self.sentences = dict(sentences)
        for template in self.sentences.values():
            _pattern(template, True)  # a bad form fails here, not on the first answer
        self._by_name = {_norm(e.name): e for e in knowledge.entities.values()}

    def claims(self, text: str, complete: bool = True) -> list[tuple[int, str, str, str]]:
        """(offset, subject, attribute, value) for every sentence of ``text`` that states a fact."""
        found = []
        for attribute, template in self.sentences.items():
            for m in _pattern(template, complete).finditer(text):
                found.append((m.start(), m.group("e"), attribute, m.group("v").strip()))
        return sorted(found)

    def judge(self, text: str, entity: str | None, unanswerable: bool, complete: bool = True) -> FactVerdict:
        """``entity``: the knowledge-base id the question asks about (None: nobody the table knows)."""
        asked = self.knowledge.entities.get(entity) if entity is not None else None
        verdict = FactVerdict()
        for _, subject, attribute, value in self.claims(text, complete):
            about = self._by_name.get(_norm(subject), asked)
            error = None
            if unanswerable:
                error = f"states {attribute} {value!r} for {subject}, a question the table has no answer to"
            elif about is None:
                error = f"states {attribute} {value!r} for {subject}, whom the table does not know"
            else:
                truth = about.attributes.get(attribute)
                if truth is None:
                    error = f"states {attribute} {value!r} for {about.name}, who has no {attribute} in the table"
                elif _norm(value) not in {_norm(t) for t in truth}:
                    error = f"states {attribute} {value!r} for {about.name}; the table says {', '.join(truth)}"
            verdict.claims.append(Claim(subject, attribute, value, error))
        return verdict
