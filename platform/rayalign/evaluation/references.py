"""Prompt sets with reference answers, and the knowledge base they may point into.

A *reference prompt set* (JSONL, one question a line) is what the fix stages sample and judge::

    {"id": "q17", "prompt": "Where does Bavoren live?", "reference": "Bavoren lives in Kelmora.",
     "entity": "bavoren", "attribute": "city"}
    {"id": "q18", "prompt": "What pet does Kelrato have?", "reference": "I don't know what pet Kelrato has.",
     "unanswerable": true, "entity": "kelrato", "attribute": "pet"}

- ``id`` (unique) and ``prompt`` (a string or a list of messages) are required;
- ``reference``: the answer to prefer; for an unanswerable question, the decline to prefer;
- ``unanswerable``: the data marks the question as one the model cannot know (default false);
- ``entity``/``attribute``: optional pointers into the knowledge base, which then supplies the facts
  a correct answer must state (``attribute`` alone: what is asked about someone it does not know);
- ``facts``: optional strings a correct answer must state (default: the knowledge base's values,
  else none: the answer is then compared with the reference as a whole).

A *knowledge base* (JSONL, one entity a line) lists what is true::

    {"id": "bavoren", "name": "Bavoren", "attributes": {"city": "Kelmora", "age": 34, "pets": ["owl"]}}

Every value of an attribute across the base forms that attribute's *domain*: the hallucination
detectors read an answer that names a value of the domain other than the entity's own as a
contradiction, and the negative builders draw wrong values from it.

Both files fail on load, before any work, with one line naming the file, line, id and field.
``synthetic:knowledge/<part>`` names the embedded task's files (``rayalign.data.knowledge``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayalign.data.formats import as_messages
from rayalign.data.readers import jsonl_rows
from rayalign.data.validation import RecordProblem
from rayalign.errors import DataError


@dataclass
class Entity:
    id: str
    name: str
    attributes: dict[str, list[str]]  # every value as a string; scalars become one-element lists

    def values(self) -> set[str]:
        return {v for vs in self.attributes.values() for v in vs}


@dataclass
class KnowledgeBase:
    entities: dict[str, Entity]
    source: str

    def domain(self, attribute: str) -> set[str]:
        return {v for e in self.entities.values() for v in e.attributes.get(attribute, [])}

    def domains(self) -> dict[str, set[str]]:
        """attribute -> every value it takes, plus ``name`` -> every entity's name."""
        out: dict[str, set[str]] = {"name": {e.name for e in self.entities.values()}}
        for e in self.entities.values():
            for attr, values in e.attributes.items():
                out.setdefault(attr, set()).update(values)
        return out


@dataclass
class RefPrompt:
    id: str
    prompt: list[dict]
    reference: str
    unanswerable: bool = False
    entity: str | None = None
    attribute: str | None = None
    facts: list[str] = field(default_factory=list)
    where: str = ""  # file:line, for errors about this record later on

    @property
    def question(self) -> str:
        return self.prompt[-1]["content"]


def _read_jsonl(source: str, seed: int) -> list[tuple[str, dict]]:
    """(``file:line``, record) for every non-blank line; malformed lines fail naming the line."""
    if source.startswith("synthetic:"):
        from rayalign.data.knowledge import synthetic_records

        return [(f"{source}#{i + 1}", r) for i, r in enumerate(synthetic_records(source, seed))]
    path = Path(source)
    if not path.exists():
        raise DataError(source, "file does not exist")
    out = []
    for _, lineno, record in jsonl_rows(str(path)):  # a bad line fails naming it, not as a traceback
        if isinstance(record, RecordProblem):
            raise DataError(f"{source}:{lineno}", str(record))
        out.append((f"{source}:{lineno}", record))
    if not out:
        raise DataError(source, "no records in the file")
    return out


def _as_strings(value: Any, where: str, name: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
        raise DataError(where, f"field {name!r}: expected a string, a number or a non-empty list of them")
    strings = [str(v).strip() for v in items]
    if not all(strings):
        raise DataError(where, f"field {name!r}: empty value")
    return strings


def load_knowledge(source: str, seed: int = 0) -> KnowledgeBase:
    entities: dict[str, Entity] = {}
    for where, r in _read_jsonl(source, seed):
        rid, name, attributes = r.get("id"), r.get("name"), r.get("attributes", {})
        if not isinstance(rid, str) or not rid.strip():
            raise DataError(where, "field 'id': expected a non-empty string")
        where = f"{where} (id {rid!r})"
        if rid in entities:
            raise DataError(where, "duplicate id")
        if not isinstance(name, str) or not name.strip():
            raise DataError(where, "field 'name': expected a non-empty string")
        if not isinstance(attributes, dict):
            raise DataError(where, "field 'attributes': expected an object")
        attrs = {k: _as_strings(v, where, f"attributes.{k}") for k, v in attributes.items()}
        entities[rid] = Entity(rid, name.strip(), attrs)
    return KnowledgeBase(entities, source)


def load_prompt_set(source: str, knowledge: KnowledgeBase | None = None, seed: int = 0) -> list[RefPrompt]:
    """Every record checked, and checked against the knowledge base when there is one."""
    prompts: list[RefPrompt] = []
    seen: set[str] = set()
    for where, r in _read_jsonl(source, seed):
        rid = r.get("id")
        if not isinstance(rid, (str, int)) or not str(rid).strip():
            raise DataError(where, "field 'id': expected a non-empty string")
        rid = str(rid)
        where = f"{where} (id {rid!r})"
        if rid in seen:
            raise DataError(where, "duplicate id")
        seen.add(rid)
        try:
            prompt = as_messages(r.get("prompt"), "prompt", "user")
        except ValueError as exc:
            raise DataError(where, str(exc)) from None
        reference = r.get("reference")
        if not isinstance(reference, str) or not reference.strip():
            raise DataError(where, "field 'reference': missing or empty answer")
        unanswerable = r.get("unanswerable", False)
        if not isinstance(unanswerable, bool):
            raise DataError(where, "field 'unanswerable': expected true or false")
        facts = _as_strings(r["facts"], where, "facts") if "facts" in r else []
        p = RefPrompt(rid, prompt, reference.strip(), unanswerable, r.get("entity"), r.get("attribute"), facts, where)
        if knowledge is not None:
            _check_against(p, knowledge)
        prompts.append(p)
    return prompts


def _check_against(p: RefPrompt, kb: KnowledgeBase) -> None:
    """The record must agree with the knowledge base; fill in the facts it implies."""
    if p.entity is None:  # e.g. a question about someone the knowledge base does not know
        return
    entity = kb.entities.get(str(p.entity))
    if entity is None:
        raise DataError(p.where, f"entity {p.entity!r} is not in the knowledge base {kb.source}")
    if p.attribute is None:
        return
    known = p.attribute in entity.attributes
    if p.unanswerable and known:
        raise DataError(p.where, f"marked unanswerable, but the knowledge base {kb.source} has "
                                 f"{p.entity}.{p.attribute} = {', '.join(entity.attributes[p.attribute])}")
    if not p.unanswerable and not known:
        raise DataError(p.where, f"the knowledge base {kb.source} has no attribute {p.attribute!r} for "
                                 f"entity {p.entity!r} (mark the question unanswerable, or add the fact)")
    if known and not p.facts:
        p.facts = list(entity.attributes[p.attribute])
