"""Dataset formats and the loader that checks every record and names bad ones by file and line (or row).

Every format converts one record into a canonical form:
- ``chat``: ``{"messages": [{"role", "content"}, ...]}``
- ``preference``: ``{"prompt": [...messages], "chosen": [...messages], "rejected": [...messages]}``
- ``unpaired``: ``{"prompt": [...messages], "completion": [...messages], "label": bool}`` (KTO: is the
  completion desirable)
Formats are registered by plugins (``register_data_formats``); the built-ins live in
``plugins/rayalign_formats``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from rayalign.data.readers import Row, decode_line, open_dataset  # noqa: F401  (decode_line: its old home)
from rayalign.data.validation import Origin, Policy, Record, RecordProblem, Records, new_ledger

Kind = Literal["chat", "preference", "unpaired", "prompt"]
ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's answer to the assistant's call
# One string object per role: a million records would otherwise hold three million copies of them.
_ROLE = {role: role for role in ROLES}


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
        out.append({"role": _ROLE[role], "content": content})
    return out


def convert_record(record: dict[str, Any], kind: Kind, candidates: list[DataFormat]) -> dict[str, Any]:
    """One raw record to its canonical form by the first matching format, or ``RecordProblem``."""
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
    if kind == "preference" and _same_answer(converted["chosen"], converted["rejected"]):
        # No preference to learn, and in real data nearly always a bug upstream in the pipeline that made it.
        raise RecordProblem("chosen_equals_rejected", "chosen equals rejected (a pair must prefer one answer)")
    return converted


def _same_answer(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> bool:
    """Canonical messages compared by role and text; "hi" and [{"role": "assistant", "content": "hi "}] match."""
    def norm(messages):
        return [(m["role"], m["content"].strip()) for m in messages]

    return norm(chosen) == norm(rejected)


def load_file(path: str | Path, kind: Kind, formats: list[DataFormat], policy: Policy | None = None) -> Records:
    """Read and check every record of a JSONL file, Parquet file or directory, ``save_to_disk``
    directory or hub id (``readers.open_dataset``); bad ones are named ``file:line`` (``file:row``)
    and handled by the policy."""
    opened = open_dataset(path)
    return check_rows(opened.rows(), str(path), kind, formats, policy, opened.unit, opened.origin)


load_jsonl = load_file  # the name from when JSONL was the only input; kept for plugins that import it


def check_rows(rows: Iterable[Row], source: str, kind: Kind, formats: list[DataFormat], policy: Policy | None,
               unit: str = "line", origin: Origin | None = None) -> Records:
    """The one checking loop of every reader: convert each row, name and count the bad ones.

    Only the canonical records are kept; each raw row is dropped once converted, so a large file
    is never held twice.
    """
    candidates = [f for f in formats if f.kind == kind]
    ledger = new_ledger(source, kind, policy)
    records: list[Record] = []
    seen_ids: dict[str, tuple[str, int]] = {}
    for file, number, raw in rows:
        ledger.read += 1
        try:
            if isinstance(raw, RecordProblem):
                raise raw
            record = convert_record(raw, kind, candidates)
            if "id" in raw:  # ids name records in provenance and evaluations: two with one id is a mistake
                key = json.dumps(raw["id"], sort_keys=True, default=str)
                if key in seen_ids:
                    first_file, first = seen_ids[key]
                    at = f"on {unit} {first}" if first_file == file else f"at {first_file}:{first}"
                    raise RecordProblem("duplicate_id", f"duplicate id {raw['id']!r} (first {at})")
                seen_ids[key] = (file, number)
        except RecordProblem as exc:
            ledger.report(f"{file}:{number}", exc.kind, str(exc))
            continue
        records.append(Record(record, file, line=number))
    ledger.check()
    return Records(records, ledger, origin)
