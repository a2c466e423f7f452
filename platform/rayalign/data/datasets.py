"""Where a stage's examples come from: the user's JSONL file, or the embedded synthetic world."""

from __future__ import annotations

import random
from typing import Any

from rayalign.data.formats import Kind, load_jsonl
from rayalign.data.synthetic import SyntheticWorld
from rayalign.data.validation import Policy, Record, Records, new_ledger
from rayalign.errors import ConfigError


def dataset_path(run, key: str, where: str) -> str | None:
    """The file configured under ``data.<key>`` (None: use synthetic data)."""
    files = [k for k, v in type(run.data).model_fields.items() if v.annotation == (str | None)]
    if key not in files:
        raise ConfigError(where, f"no dataset {key!r} under data: (known: {', '.join(files)})")
    return getattr(run.data, key)


def load_records(path: str | None, kind: Kind, registry, seed: int, policy: Policy | None = None) -> tuple[Records, str]:
    """Canonical records and a label of their source (for error messages and provenance).

    The records are a ``Records`` list: each one knows its file and line (``record.where``), and
    ``records.ledger`` counts the bad ones, skipped or fatal by ``policy`` (default: the run's
    ``data.bad_records`` inside a pipeline stage, else ``skip``).
    """
    formats = [f for _, f in registry.items()]
    if path is not None and not path.startswith("synthetic:"):
        return load_jsonl(path, kind, formats, policy), str(path)
    if path is not None:  # a named embedded dataset, e.g. synthetic:knowledge/sft
        from rayalign.data.knowledge import load_synthetic

        records, source = load_synthetic(path, kind, formats, seed), path
    else:
        records, source = _synthetic(kind, formats, seed)
    ledger = new_ledger(source, kind, policy)
    ledger.read = len(records)
    return Records([Record(r, source, index=i) for i, r in enumerate(records)], ledger), source


def _synthetic(kind: Kind, formats: list, seed: int) -> tuple[list[dict[str, Any]], str]:
    world = SyntheticWorld(seed)
    if kind == "chat":
        return world.chat_examples(), "synthetic:chat"
    if kind == "preference":
        convert = next(f for f in formats if f.name == "preference").convert
        return [convert(p) for p in world.preference_pairs()], "synthetic:preference"
    convert = next(f for f in formats if f.name == "prompt").convert
    return [convert({"prompt": f.question(), "reference": f.answer()}) for f in world.facts], "synthetic:prompts"


def split(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded train/eval split; at least one eval example when asked for any and there are two."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(records) * eval_fraction))
    if eval_fraction > 0 and len(records) >= 2:
        n_eval = max(1, n_eval)
    eval_ids = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in eval_ids]
    held = [r for i, r in enumerate(records) if i in eval_ids]
    return train, held


def prompts_from_chat(records: list[dict]) -> list[dict]:
    """Held-out prompts from chat data: the conversation up to its last assistant turn."""
    out = []
    for r in records:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"prompt": msgs[:last], "reference": msgs[last]["content"]})
    return out
