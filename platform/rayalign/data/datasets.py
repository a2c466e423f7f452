"""Where a stage's examples come from: the user's dataset (JSONL, Parquet, ``save_to_disk``, hub id; see
``readers``), or the embedded synthetic world."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from rayalign.data.formats import Kind, load_file
from rayalign.data.synthetic import SyntheticWorld
from rayalign.data.validation import Origin, Policy, Record, Records, new_ledger


def load_records(path: str | None, kind: Kind, registry, seed: int, policy: Policy | None = None) -> tuple[Records, str]:
    """Canonical records and a label of their source (for error messages and provenance).

    The records are a ``Records`` list: each one knows its file and line (``record.where``), and
    ``records.ledger`` counts the bad ones, skipped or fatal by ``policy`` (default: the run's
    ``data.bad_records`` inside a pipeline stage, else ``skip``).
    """
    formats = [f for _, f in registry.items()]
    if path is not None and not path.startswith("synthetic:"):
        return load_file(path, kind, formats, policy), str(path)
    if path is not None:  # a named embedded dataset, e.g. synthetic:knowledge/sft
        from rayalign.data.knowledge import load_synthetic

        records, source = load_synthetic(path, kind, formats, seed), path
    else:
        records, source = _synthetic(kind, formats, seed)
    ledger = new_ledger(source, kind, policy)
    ledger.read = len(records)
    return Records([Record(r, source, index=i) for i, r in enumerate(records)], ledger, Origin("synthetic")), source


def _synthetic(kind: Kind, formats: list, seed: int) -> tuple[list[dict[str, Any]], str]:
    world = SyntheticWorld(seed)
    if kind == "chat":
        return world.chat_examples(), "synthetic:chat"
    if kind == "preference":
        convert = next(f for f in formats if f.name == "preference").convert
        return [convert(p) for p in world.preference_pairs()], "synthetic:preference"
    if kind == "unpaired":
        convert = next(f for f in formats if f.name == "unpaired").convert
        return [convert(e) for e in unpair(world.preference_pairs())], "synthetic:unpaired"
    convert = next(f for f in formats if f.name == "prompt").convert
    return [convert({"prompt": f.question(), "reference": f.answer()}) for f in world.facts], "synthetic:prompts"


def unpair(pairs: list[dict]) -> list[dict]:
    """Preference pairs as unpaired examples: the chosen answer desirable, the rejected one not;
    an example repeated (one chosen answer in several pairs) is kept once."""
    examples = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]
    return list({json.dumps(e, sort_keys=True): e for e in examples}.values())


def split(records: list, eval_fraction: float, seed: int, key: Callable[[Any], Any] | None = None) -> tuple[list, list]:
    """Seeded train/eval split; at least one eval example when asked for any and there are two.

    With ``key``, records of one key land on the same side and ``eval_fraction`` counts keys:
    preference pairs split by prompt, so no held-out prompt (nor its chosen answer) is trained on.
    """
    keys = [key(r) for r in records] if key is not None else list(range(len(records)))
    groups = list(dict.fromkeys(keys))
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(groups) * eval_fraction))
    if eval_fraction > 0 and len(groups) >= 2:
        n_eval = max(1, n_eval)
    held_keys = {groups[i] for i in order[:n_eval]}
    train = [r for r, k in zip(records, keys) if k not in held_keys]
    held = [r for r, k in zip(records, keys) if k in held_keys]
    return train, held


# Embedded tasks that ship held-out prompts of their own beside their SFT data.
_TASK_PROMPTS = {"synthetic:declining/sft": "synthetic:declining/prompts"}


def held_out_prompts(data) -> str | None:
    """The prompts to sample: ``data.prompts``; unset, the embedded task's own held-out prompts when
    ``data.sft`` is such a task; else None (the caller samples the held-out split of ``data.sft``)."""
    return data.prompts if data.prompts is not None else _TASK_PROMPTS.get(data.sft)


def prompts_from_chat(records: list[dict]) -> list[dict]:
    """Held-out prompts from chat data: the conversation up to its last assistant turn."""
    out = []
    for r in records:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"prompt": msgs[:last], "reference": msgs[last]["content"]})
    return out
