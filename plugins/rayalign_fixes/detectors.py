"""Built-in detectors: repetition loops, contradictions of the reference facts, unanswered declines.

Each one is a rule anyone can check by hand on a sample; the rule that fired is written into the
finding (and from there into every preference pair built from it).
"""

from __future__ import annotations

from pydantic import Field

from rayalign.evaluation.detectors import Detector, DetectorConfig, Finding, Sample
from rayalign.evaluation.references import KnowledgeBase
from rayalign.evaluation.text import DECLINE_PATTERNS, declines, find_loop, mentions, numbers, rep_n, stutter, words


class RepetitionConfig(DetectorConfig):
    min_repeats: int = Field(3, ge=2, description="back-to-back copies of a block that make a loop")
    min_loop_words: int = Field(6, ge=1, description="words the looped region must cover")
    max_period: int = Field(24, ge=1, description="longest block (in words) looked for")
    stutter_repeats: int = Field(5, ge=2, description="copies of a 1-8 character chunk that make a stutter")


class RepetitionDetector(Detector):
    """Flags a sample as *looping* when one of three rules fires (words are ``\\w+``, lower-cased):

    1. ``loop``: a block of words occurs ``min_repeats`` (3) or more times back to back and the
       copies cover at least ``min_loop_words`` (6) words ("X went to A. X went to A. X went to A.");
    2. ``loop at the token limit``: the sample was cut at the token limit while repeating a block
       back to back (2 copies or more, ``min_loop_words`` words): it would have gone on;
    3. ``stutter``: a chunk of 1-8 characters repeats ``stutter_repeats`` (5) times in a row
       inside the text ("Renvovovovovo"), a loop below the word level.

    Details carry rep-2 and rep-4 (share of repeated word n-grams, Welleck et al. 2019).
    """

    name = "repetition"
    kind = "repetition"
    Config = RepetitionConfig

    def detect(self, samples, knowledge):
        return [self.check(s.completion, s.finish_reason) for s in samples]

    def check(self, text: str, finish_reason: str = "stop") -> Finding | None:
        cfg = self.config
        tokens = words(text)
        details = {"rep_2": round(rep_n(tokens, 2), 4), "rep_4": round(rep_n(tokens, 4), 4)}
        loop = find_loop(tokens, cfg.max_period)
        if loop is not None and loop.words >= cfg.min_loop_words:
            block = " ".join(tokens[loop.start : loop.start + loop.period])
            details.update(period=loop.period, repeats=loop.repeats, block=block)
            if loop.repeats >= cfg.min_repeats:
                return Finding(f"loop: '{block}' x{loop.repeats} back to back", details)
            if finish_reason == "length":
                return Finding(f"loop at the token limit: '{block}' x{loop.repeats} and cut off", details)
        chunk = stutter(text, min_repeats=cfg.stutter_repeats)
        if chunk is not None:
            return Finding(f"stutter: '{chunk}'", {**details, "stutter": chunk})
        return None


class DeclineConfig(DetectorConfig):
    decline_patterns: list[str] = Field(list(DECLINE_PATTERNS), description="regexes of a decline (any matches)")


def _stated(text: str, domains: dict[str, set[str]]) -> set[str]:
    """Knowledge-base values and numbers an answer states."""
    found = {v for values in domains.values() for v in values if mentions(text, v)}
    return found | numbers(text)


class ContradictionDetector(Detector):
    """Flags an answer to an answerable question that states something the references contradict.

    With a knowledge base entry for the question's entity, the answer *contradicts* it when it
    (a) states a value of some attribute (any entity's name, city, number, ...) that is none of the
    entity's own values and does not appear in the question, or (b) misses every fact the question
    asks for while stating another value of that attribute ("lives in Dunvale" for Kelmora).
    Without an entity, the allowed values are the prompt's ``facts`` and what the reference states,
    and the checked values are every prompt's facts and all numbers. A decline is not a
    contradiction (task accuracy counts it as a miss).
    """

    name = "contradiction"
    kind = "hallucination"
    Config = DeclineConfig

    def detect(self, samples, knowledge):
        domains = knowledge.domains() if knowledge is not None else {}
        if knowledge is None:  # the facts of every prompt in the batch are what can be checked
            domains = {"fact": {f for s in samples for f in s.facts}}
        return [self.check(s, knowledge, domains) for s in samples]

    def check(self, s: Sample, kb: KnowledgeBase | None, domains: dict[str, set[str]]) -> Finding | None:
        if s.unanswerable or declines(s.completion, self.config.decline_patterns):
            return None
        entity = kb.entities.get(s.entity) if kb is not None and s.entity else None
        question = " ".join(m["content"] for m in s.prompt)
        stated = _stated(s.completion, domains)
        if entity is not None:
            allowed = entity.values() | {entity.name}
        else:
            allowed = set(s.facts) | _stated(s.reference, domains)
        allowed |= _stated(question, domains)
        allowed_lower = {a.lower() for a in allowed}
        invented = sorted(v for v in stated if v.lower() not in allowed_lower)
        if invented:
            return Finding(f"states {', '.join(invented)}, not in the reference facts", {"invented": invented})
        if s.facts and s.attribute and kb is not None and not any(mentions(s.completion, f) for f in s.facts):
            others = sorted(v for v in kb.domain(s.attribute) if v not in s.facts and mentions(s.completion, v))
            if others:
                return Finding(f"says {', '.join(others)} for {s.attribute}; the reference says {', '.join(s.facts)}",
                               {"wrong": others, "expected": s.facts})
        return None


class UnanswerableDetector(Detector):
    """Flags an answer to a question the data marks unanswerable that does not decline.

    A decline is any match of ``decline_patterns`` ("I don't know", "I'm not sure", "cannot
    answer", "no information about"). Details list the knowledge-base values and numbers the answer
    states, i.e. what it invented.
    """

    name = "unanswerable"
    kind = "hallucination"
    Config = DeclineConfig

    def detect(self, samples, knowledge):
        domains = knowledge.domains() if knowledge is not None else {}
        out = []
        for s in samples:
            if not s.unanswerable or declines(s.completion, self.config.decline_patterns):
                out.append(None)
                continue
            invented = sorted(_stated(s.completion, domains))
            out.append(Finding("answered a question marked unanswerable instead of declining", {"invented": invented}))
        return out
