"""Few-shot prompts for the teacher, built from example question/answer pairs.

Two formats:

- ``chat``: the examples become earlier user/assistant turns of one conversation, rendered with the
  teacher's chat template (an instruction-tuned teacher);
- ``text``: ``text_template`` filled per example and joined by blank lines, then the question with an
  empty answer (a base-model teacher). The answer is cut where the teacher starts the next question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Shot:
    id: str
    question: str
    answer: str


def shots_from_chat(records: list[dict]) -> list[Shot]:
    """(first user turn, last assistant turn) of each chat record."""
    out = []
    for i, r in enumerate(records):
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        if users and answers:
            out.append(Shot(str(r.get("id", i)), users[0], answers[-1]))
    return out


def pick_shots(shots: list[Shot], question: str, k: int, selection: str, seed: int, index: int) -> list[Shot]:
    """``k`` examples for one question; never the question itself (that would hand the teacher the answer)."""
    pool = [s for s in shots if s.question.strip() != question.strip()]
    if selection == "random":
        return random.Random(f"{seed}-{index}").sample(pool, min(k, len(pool)))
    return pool[:k]


def chat_prompt(question: str, shots: list[Shot], system: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for s in shots:
        messages += [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.answer}]
    return messages + [{"role": "user", "content": question}]


def text_prompt(question: str, shots: list[Shot], template: str, instruction: str | None) -> str:
    parts = [instruction] if instruction else []
    parts += [template.format(question=s.question, answer=s.answer) for s in shots]
    parts.append(template.format(question=question, answer="").rstrip())
    return "\n\n".join(parts)


def cut_at_next_question(answer: str, template: str) -> str:
    """A base model continues the pattern: keep only the answer to this question."""
    head = template.split("{question}")[0].strip()
    if head and head in answer:
        answer = answer[: answer.index(head)]
    return answer.strip()
