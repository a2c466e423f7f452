"""Dataset formats and the JSONL loader that checks every record and names bad ones by file and line.

Every format converts one record into a canonical form:
- ``chat``: ``{"messages": [{"role", "content"}, ...]}``
- ``preference``: ``{"prompt": [...messages], "chosen": [...messages], "rejected": [...messages]}``
Formats are registered by plugins (``register_data_formats``); the built-ins live in
``plugins/rayalign_formats``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from rayalign.data.validation import Policy, Record, RecordProblem, Records, new_ledger
from rayalign.errors import DataError

Kind = Literal["chat", "preference", "prompt"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataFormat:
    name: str
    kind: Kind
    fields: tuple[str, ...]  # the record must have all of these
    # Raises RecordProblem (or ValueError) naming the field.
    convert: Callable[[dict[str, Any]], dict[str, Any]]

    def matches(self, record: dict[str, Any]) -> bool:
        return all(f in record for f in self.fields)


def as_messages(value: Any, field: str, default_role: str) -> list[dict[str, str]]:
    """A string becomes one message of ``default_role``; a list is checked message by message."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordProblem("empty_field", f"field {field!r}: empty text")
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and not value:
        raise RecordProblem("empty_field", f"field {field!r}: empty list of messages")
    if not isinstance(value, list):
        raise RecordProblem("wrong_type", f"field {field!r}: expected a string or a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RecordProblem("wrong_type", f"field '{field}[{i}]': expected a message object")
        role, content = msg.get("role"), msg.get("content")
        if "role" not in msg or "content" not in msg:
            missing = "role" if "role" not in msg else "content"
            raise RecordProblem("missing_field", f"field '{field}[{i}].{missing}': missing")
        if role not in ROLES:
            raise RecordProblem("unknown_role",
                                f"field '{field}[{i}].role': expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RecordProblem("wrong_type", f"field '{field}[{i}].content': expected string")
        if role != "system" and not content.strip():  # an empty system prompt is a choice; an empty turn is not
            raise RecordProblem("empty_field", f"field '{field}[{i}].content': empty {role} message")
        out.append({"role": role, "content": content})
    return out


def _parse(line: str, kind: Kind, candidates: list[DataFormat]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One line to (the raw object, its canonical record), or ``RecordProblem`` saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordProblem("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RecordProblem("not_an_object", "expected a JSON object")
    fmt = next((f for f in candidates if f.matches(record)), None)
    if fmt is None:
        expected = " | ".join("+".join(f.fields) for f in candidates)
        raise RecordProblem("missing_field", f"missing fields for a {kind} record (expected one of: {expected})")
    try:
        converted = fmt.convert(record)
    except RecordProblem:
        raise
    except ValueError as exc:  # a third-party format's own check
        raise RecordProblem("invalid", str(exc)) from None
    if kind == "chat" and converted["messages"][-1]["role"] != "assistant":
        raise RecordProblem("no_final_assistant", "the conversation does not end with an assistant message "
                            f"(last role: {converted['messages'][-1]['role']})")
    return record, converted


def load_jsonl(path: str | Path, kind: Kind, formats: list[DataFormat], policy: Policy | None = None) -> Records:
    """Parse and check every line; bad ones are named by ``path:line`` and handled by the policy."""
    path = Path(path)
    candidates = [f for f in formats if f.kind == kind]
    if not path.exists():
        raise DataError(str(path), "file does not exist")
    ledger = new_ledger(str(path), kind, policy)
    records, seen_ids = [], {}
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines are not records
            ledger.read += 1
            try:
                raw, record = _parse(line, kind, candidates)
                if "id" in raw:  # ids name records in provenance and evaluations: two with one id is a mistake
                    key = json.dumps(raw["id"], sort_keys=True)
                    if key in seen_ids:
                        raise RecordProblem("duplicate_id", f"duplicate id {raw['id']!r} (first on line {seen_ids[key]})")
                    seen_ids[key] = lineno
            except RecordProblem as exc:
                ledger.report(f"{path}:{lineno}", exc.kind, str(exc))
                continue
            records.append(Record(record, str(path), line=lineno))
    ledger.check()
    return Records(records, ledger)
