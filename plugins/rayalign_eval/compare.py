"""The comparison table across the stages of a run: one row per evaluated model (base -> SFT -> DPO ...).

Each ``evaluate_model`` stage writes ``comparison.json`` with the rows of every earlier
``evaluate_model`` stage of the run followed by its own, so the last one holds the whole run; the
run folder's ``comparison.md`` is rewritten by each of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

COLUMNS = [  # (metric, header, format)
    ("exact_match", "exact match", "{:.3f}"),
    ("extracted", "answer found", "{:.3f}"),
    ("mc_accuracy", "MC acc", "{:.3f}"),
    ("mc_accuracy_norm", "MC acc (norm)", "{:.3f}"),
    ("heldout_loss", "held-out loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("repetition_rate", "repetition", "{:.3f}"),
    ("hallucination_rate", "hallucination", "{:.3f}"),
    ("rep_4", "rep-4", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("mean_words", "words", "{:.1f}"),
]


def earlier_rows(lineage: list[dict], stage_name: str) -> list[dict]:
    """Rows of the latest earlier stage of this kind (it already carries the ones before it)."""
    for entry in reversed(lineage):
        path = Path(entry["dir"]) / "comparison.json"
        if entry["stage"] == stage_name and path.exists():
            return json.loads(path.read_text())["rows"]
    return []


def merge(rows: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows, then the new ones; a model evaluated again keeps its latest row, in its old place."""
    out = {r["model"]: r for r in rows}
    for r in new:
        out[r["model"]] = r
    return list(out.values())


def table(rows: list[dict]) -> list[str]:
    columns = [c for c in COLUMNS if any(r["metrics"].get(c[0]) is not None for r in rows)]
    head = ["model", "stage"] + [h for _, h, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["evaluated_in"]]
        for key, _, fmt in columns:
            value = r["metrics"].get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
