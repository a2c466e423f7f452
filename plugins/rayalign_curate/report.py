"""The curation report: what was read, dropped and kept per source, and what the mix looks like.

``report.json`` holds everything; the job log gets the per-source table, the length histogram and
the refusal share, with a warning when that share is far from the configured target (too many
refusals teach a model to refuse; none at all can teach it to answer everything).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from rayalign.data.filters import Example

from rayalign_curate.filters import is_refusal

HIST_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class SourceCounts:
    source: str
    split: str
    read: int = 0
    filtered: Counter = field(default_factory=Counter)  # "filter: reason" -> count
    exact_duplicates: int = 0
    near_duplicates: int = 0
    leaked: int = 0  # duplicates of a held-out (validation/test) item, removed from training
    kept: int = 0
    held_out: int = 0  # moved to <output>_validation by validation_fraction
    in_mix: int = 0
    share: float | None = None  # configured share of the mix (train sources)

    def row(self) -> dict:
        return {"source": self.source, "split": self.split, "read": self.read,
                "filtered": sum(self.filtered.values()), "filtered_by": dict(self.filtered),
                "exact_duplicates": self.exact_duplicates, "near_duplicates": self.near_duplicates,
                "leaked": self.leaked, "kept": self.kept, "held_out": self.held_out, "in_mix": self.in_mix, "share": self.share}


def histogram(lengths: list[int], edges=HIST_EDGES) -> dict[str, int]:
    bins = {f"{lo}-{hi - 1}": 0 for lo, hi in zip(edges, edges[1:])}
    bins[f"{edges[-1]}+"] = 0
    labels = list(bins)
    for n in lengths:
        i = next((k for k, hi in enumerate(edges[1:]) if n < hi), len(edges) - 1)
        bins[labels[i]] += 1
    return bins


def conversation_stats(examples: list[Example], length: Callable[[str], int], refusal_patterns) -> dict:
    roles = Counter(m["role"] for e in examples for m in e.messages)
    turns = Counter(min(sum(m["role"] == "user" for m in e.messages), 4) for e in examples)
    lengths = [length(e.prompt + "\n" + e.response) for e in examples]
    refusals = sum(is_refusal(e.response, refusal_patterns) for e in examples)
    n = max(1, len(examples))
    return {
        "examples": len(examples),
        "messages_per_role": dict(roles),
        "turns": {("4+" if k == 4 else str(k)): v for k, v in sorted(turns.items())},
        "mean_turns": sum(m["role"] == "user" for e in examples for m in e.messages) / n,
        "with_system_prompt": sum(any(m["role"] == "system" for m in e.messages) for e in examples) / n,
        "length_histogram": histogram(lengths),
        "mean_length": sum(lengths) / n,
        "max_length": max(lengths, default=0),
        "refusals": refusals,
        "refusal_share": refusals / n,
    }


def source_table(counts: list[SourceCounts]) -> list[str]:
    head = ["source", "split", "read", "filtered", "exact dup", "near dup", "leaked", "kept", "held out", "in mix",
            "share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in counts:
        share = "-" if c.share is None else f"{c.share:.2f}"
        cells = [c.source, c.split, c.read, sum(c.filtered.values()), c.exact_duplicates, c.near_duplicates,
                 c.leaked, c.kept, c.held_out, c.in_mix if c.split == "train" else "-", share]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return lines


def histogram_lines(hist: dict[str, int], unit: str, width: int = 40) -> list[str]:
    top = max(hist.values(), default=0) or 1
    return [f"{label:>10} {unit}: {'#' * round(width * n / top):<{width}} {n}" for label, n in hist.items() if n
            or label == next(iter(hist))]


def refusal_warning(share: float, target: float | None, tolerance: float) -> str | None:
    if target is None or abs(share - target) <= tolerance:
        return None
    side = "above" if share > target else "below"
    return (f"refusal share {share:.1%} is {side} the target {target:.1%} by more than {tolerance:.1%} "
            "(curate.refusal_target / refusal_tolerance)")
