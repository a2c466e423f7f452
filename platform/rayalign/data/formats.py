"""Dataset formats and the JSONL loader that reports bad records by file and line.

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

from rayalign.errors import DataError

Kind = Literal["chat", "preference", "prompt"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataFormat:
    name: str
    kind: Kind
    fields: tuple[str, ...]  # the record must have all of these
    convert: Callable[[dict[str, Any]], dict[str, Any]]  # raises ValueError naming the field

    def matches(self, record: dict[str, Any]) -> bool:
        return all(f in record for f in self.fields)


def as_messages(value: Any, field: str, default_role: str) -> list[dict[str, str]]:
    """A string becomes one message of ``default_role``; a list is checked message by message."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field {field!r}: empty text")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {field!r}: expected a string or a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"field '{field}[{i}]': expected a message object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"field '{field}[{i}].role': expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"field '{field}[{i}].content': expected string")
        out.append({"role": role, "content": content})
    return out


def load_jsonl(path: str | Path, kind: Kind, formats: list[DataFormat]) -> list[dict[str, Any]]:
    """Parse every line; the first error names ``path:line`` and the field at fault."""
    path = Path(path)
    candidates = [f for f in formats if f.kind == kind]
    if not path.exists():
        raise DataError(str(path), "file does not exist")
    records = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(where, f"malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(where, "expected a JSON object")
            fmt = next((f for f in candidates if f.matches(record)), None)
            if fmt is None:
                expected = " | ".join("+".join(f.fields) for f in candidates)
                raise DataError(where, f"missing fields for a {kind} record (expected one of: {expected})")
            try:
                records.append(fmt.convert(record))
            except ValueError as exc:
                raise DataError(where, str(exc)) from None
    if not records:
        raise DataError(str(path), f"no {kind} examples in the file")
    return records
