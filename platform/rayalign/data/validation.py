"""Bad records: every problem is named (file:line, or file:row for columnar files; reason), counted, and
handled by the run's policy.

``data.bad_records: skip`` (the default) drops a bad record, names it in the log (the first
``LOGGED`` per file, then the total) and counts it in the stage's metrics; ``fail`` stops the run
at the first one. Under ``skip`` a file with no valid record left, or with more than
``data.max_bad_fraction`` of its records bad, still stops the run with one line: that is the wrong
file or format, not a few bad lines.

The pipeline opens a ``DataChecks`` scope around each stage's ``prepare`` and ``run``; every
dataset loaded inside it (by any plugin, through ``load_records``) gets a ``BadRecords`` ledger
there, and the ledgers' counts land in the stage's ``metrics.json``. Outside a scope (a plugin's
unit test) the default policy applies and nothing is collected.
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rayalign.errors import DataError

log = logging.getLogger("rayalign")

LOGGED = 10  # problems named in the log per dataset; the rest are counted

# Problem kinds, as they appear in metrics (``bad_record_kinds``).
PROBLEMS = {
    "invalid_utf8": "the line is not valid UTF-8 text",
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the line is JSON but not an object",
    "missing_field": "a field the format needs is absent",
    "empty_field": "a text field or message list is empty",
    "wrong_type": "a field has the wrong type",
    "unknown_role": "a message role other than system, user, assistant",
    "no_final_assistant": "a conversation that does not end with an assistant turn",
    "too_long": "longer than the stage's max_length after the chat template",
    "chosen_equals_rejected": "a preference pair whose chosen and rejected answers are the same",
    "duplicate_id": "a record whose `id` an earlier record of the file already has",
    "invalid": "rejected by a format plugin for another reason",
}


class RecordProblem(ValueError):
    """A record is bad in a known way; formats raise it (a plain ValueError counts as ``invalid``)."""

    def __init__(self, kind: str, message: str):
        assert kind in PROBLEMS, kind
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class Policy:
    mode: str = "skip"  # skip | fail
    max_bad_fraction: float = 0.1

    @classmethod
    def of(cls, data_config) -> "Policy":
        return cls(data_config.bad_records, data_config.max_bad_fraction)


@dataclass(frozen=True)
class Origin:
    """How a dataset was stored: ``format`` (jsonl, parquet, arrow, hub, synthetic) and the files read,
    in order (what a content hash of the dataset covers; none for embedded data)."""

    format: str
    files: tuple[str, ...] = ()


class Record(dict):
    """A canonical record that remembers where it came from (for messages about it)."""

    def __init__(self, data: dict, source: str, line: int | None = None, index: int | None = None):
        super().__init__(data)
        self.source, self.line, self.index = source, line, index
        self.tokens: Any = None  # what a stage tokenized it into, once it checked the length

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return f"{self.source} #{self.index}" if self.index is not None else self.source


@dataclass
class Problem:
    where: str
    kind: str
    reason: str


@dataclass
class BadRecords:
    """The ledger of one dataset: how many records were read, which were bad and why."""

    source: str
    kind: str
    policy: Policy = field(default_factory=Policy)
    read: int = 0
    problems: list[Problem] = field(default_factory=list)
    _logged: int = 0

    def report(self, where: str, kind: str, reason: str) -> None:
        """One bad record: fatal under ``fail``; otherwise counted and dropped by the caller."""
        if self.policy.mode == "fail":
            raise DataError(where, f"{reason} (data.bad_records=fail)")
        self.problems.append(Problem(where, kind, reason))

    @property
    def kept(self) -> int:
        return self.read - len(self.problems)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def check(self) -> None:
        """Name what is new in the log, then stop the run if nothing valid is left or too much is bad."""
        if self.read == 0:
            raise DataError(self.source, f"no {self.kind} examples in the file")
        if not self.problems:
            return
        first, bad = self.problems[0], len(self.problems)
        fatal = None
        if self.kept == 0:
            fatal = f"{first.reason}; no valid {self.kind} record left: all {self.read} are bad"
        elif bad / self.read > self.policy.max_bad_fraction:
            fatal = (f"{first.reason}; {bad} of {self.read} records are bad ({bad / self.read:.0%}), "
                     f"above data.max_bad_fraction={self.policy.max_bad_fraction:g}")
        new = self.problems[self._logged :]
        if new:
            for p in new[: max(0, LOGGED - self._logged)]:
                log.warning("bad record: %s: %s", p.where, p.reason)
            self._logged = bad
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items()))
            named = f"; the first {LOGGED} are named above" if bad > LOGGED else ""
            log.warning("%s: %d of %d %s records are bad (%s)%s%s", self.source, bad, self.read, self.kind, counts,
                        named, "" if fatal else "; skipped (data.bad_records=skip)")
        if fatal:
            raise DataError(first.where, fatal)

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "read": self.read, "kept": self.kept, "skipped": len(self.problems),
                "problems": self.counts()}


class DataChecks:
    """The policy of a run, and the ledgers of the datasets one stage loaded."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.ledgers: dict[tuple[str, str], BadRecords] = {}

    def ledger(self, source: str, kind: str) -> BadRecords:
        # A stage loaded again (a restart) starts a fresh ledger, so nothing is counted twice.
        self.ledgers[(source, kind)] = BadRecords(source, kind, self.policy)
        return self.ledgers[(source, kind)]

    def metrics(self) -> dict[str, Any]:
        """``bad_records`` (total skipped), ``bad_record_kinds`` and per-dataset ``data_sources`` counts."""
        kinds: dict[str, int] = {}
        for ledger in self.ledgers.values():
            for k, v in ledger.counts().items():
                kinds[k] = kinds.get(k, 0) + v
        return {
            "bad_records": sum(kinds.values()),
            "bad_record_kinds": kinds,
            "data_sources": {source: ledger.summary() for (source, _), ledger in self.ledgers.items()},
        }


_current: contextvars.ContextVar[DataChecks | None] = contextvars.ContextVar("rayalign_data_checks", default=None)


@contextmanager
def data_checks(checks: DataChecks) -> Iterator[DataChecks]:
    """Datasets loaded inside follow ``checks.policy`` and are counted in ``checks``."""
    token = _current.set(checks)
    try:
        yield checks
    finally:
        _current.reset(token)


def new_ledger(source: str, kind: str, policy: Policy | None = None) -> BadRecords:
    """A ledger for a dataset about to be loaded: in the current stage's scope, or a loose one."""
    checks = _current.get()
    if checks is None:
        return BadRecords(source, kind, policy or Policy())
    ledger = checks.ledger(source, kind)
    ledger.policy = policy or ledger.policy
    return ledger


class Records(list):
    """A loaded dataset: its valid records, with the ledger of the bad ones and where they were read."""

    def __init__(self, records, ledger: BadRecords, origin: Origin | None = None):
        super().__init__(records)
        self.ledger = ledger
        self.origin = origin or Origin("synthetic")


def within_max_length(records: Records, tokenize: Callable[[Record], Any], max_length: int) -> tuple[Records, list]:
    """Tokenize every record; one whose longest sequence exceeds ``max_length`` is a ``too_long`` problem.

    ``tokenize`` returns one ``Tokenized`` or a tuple of them (a preference pair). Returns the
    records that fit and their tokenizations, in order.
    """
    kept, tokenized = [], []
    for record in records:
        out = tokenize(record)
        seqs = out if isinstance(out, tuple) else (out,)
        longest = max(len(s) for s in seqs)
        if longest > max_length:
            records.ledger.report(record.where, "too_long",
                                  f"{longest} tokens after the chat template, above max_length={max_length}")
        elif any(s.num_trained == 0 for s in seqs):
            records.ledger.report(record.where, "empty_field", "no token to train on after the chat template")
        else:
            kept.append(record)
            tokenized.append(out)
    records.ledger.check()
    return Records(kept, records.ledger, records.origin), tokenized
