"""The user's benchmark files: question/answer for exact match, and multiple choice for log-likelihood.

QA (``qa:``), one JSON object per line::

    {"id": "q1", "prompt": "What is 6 x 7? End with 'The answer is N.'", "answer": "42"}

``prompt`` is a string (one user turn) or a list of chat messages; ``id`` is optional; ``reference``
is accepted for ``answer``, so the reference prompt sets of the fix stages (``unanswerable``,
``entity``, ``attribute``, ``facts``, which the hallucination detectors read) work as they are.

Multiple choice (``choices:``)::

    {"id": "m1", "question": "Which planet is largest?", "choices": ["Mars", "Jupiter", "Venus"], "answer": 1}

``answer`` is the index of the right choice (from 0), its letter ("B"), or its text. Every choice
is scored as the assistant's reply to ``question`` by the model's summed token log-likelihood
(``mc_accuracy``) and by that sum per character of the choice (``mc_accuracy_norm``, which does not
favour short choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayalign.data.formats import as_messages
from rayalign.errors import DataError
from rayalign.evaluation.references import _read_jsonl


@dataclass(frozen=True)
class QAItem:
    id: str
    prompt: list[dict]
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)  # unanswerable, entity, facts...: for detectors


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    prompt: list[dict]
    choices: list[str]
    answer: int


def read_lines(path: str) -> list[tuple[str, dict]]:
    """(file:line, object) for every non-blank line; bad JSON is a DataError naming the line."""
    return _read_jsonl(path, seed=0)  # the reference prompt sets' reader (also takes synthetic:...)


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record:
        raise DataError(where, f"missing field {name!r}")
    return record[name]


def _prompt(record: dict, name: str, where: str) -> list[dict]:
    try:
        return as_messages(_field(record, name, where), name, "user")
    except ValueError as exc:
        raise DataError(where, str(exc)) from None


def load_qa(path: str) -> list[QAItem]:
    items = []
    for n, (where, record) in enumerate(read_lines(path)):
        prompt = _prompt(record, "prompt", where)
        answer = record["answer"] if "answer" in record else _field(record, "reference", where)  # prompt sets' name
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise DataError(where, f"field 'answer': expected a string or number, got {type(answer).__name__}")
        extra = {k: v for k, v in record.items() if k not in ("id", "prompt", "answer", "reference")}
        items.append(QAItem(str(record.get("id", n)), prompt, str(answer), extra))
    return items


def _answer_index(answer: Any, choices: list[str], where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
    elif isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if len(answer) == 1 and answer.isalpha() and ord(answer.upper()) - ord("A") < len(choices):
            return ord(answer.upper()) - ord("A")
    raise DataError(where, f"field 'answer': {answer!r} is no index (0-{len(choices) - 1}), letter or text "
                    "of one of the choices")


def load_choices(path: str) -> list[ChoiceItem]:
    items = []
    for n, (where, record) in enumerate(read_lines(path)):
        prompt = _prompt(record, "question", where)
        choices = _field(record, "choices", where)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                         for c in choices):
            raise DataError(where, "field 'choices': expected a list of at least two non-empty strings")
        items.append(ChoiceItem(str(record.get("id", n)), prompt, choices,
                                _answer_index(_field(record, "answer", where), choices, where)))
    return items
