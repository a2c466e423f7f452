"""Mixture weights: how many examples of each training source go into the curated mix.

Weights are shares of the mix (normalised to sum to 1). With ``size`` unset the source with the
largest share (the task data) is taken exactly once and the others follow their shares:
``size = available / share`` of that source. So a large general corpus replayed at 10% gives 10%
of the mix, not all of itself, and a small one is repeated. A source asked for more examples than it
has is repeated whole and topped up with a seeded sample, never silently shortened.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class MixPlan:
    source: str
    available: int
    taken: int
    share: float  # the configured share (normalised weight)

    @property
    def repeats(self) -> float:
        return self.taken / self.available if self.available else 0.0


def plan_mix(available: dict[str, int], weights: dict[str, float], size: int | None) -> list[MixPlan]:
    total = sum(weights[s] for s in available)
    shares = {s: weights[s] / total for s in available}
    if size is None:
        primary = max(available, key=lambda s: (shares[s], available[s]))
        size = math.floor(available[primary] / shares[primary])
    return [MixPlan(s, available[s], round(shares[s] * size), shares[s]) for s in available]


def draw(items: list, n: int, rng: random.Random) -> list:
    """``n`` items: whole copies of ``items`` and a seeded sample of the remainder."""
    if not items:
        return []
    copies, rest = divmod(n, len(items))
    return items * copies + rng.sample(items, rest)


def mix(groups: dict[str, list], weights: dict[str, float], size: int | None, seed: int) -> tuple[list, list[MixPlan]]:
    """The shuffled mixture and the plan it followed."""
    plans = plan_mix({s: len(g) for s, g in groups.items()}, weights, size)
    rng = random.Random(seed)
    out = [item for p in plans for item in draw(groups[p.source], p.taken, rng)]
    rng.shuffle(out)
    return out, plans
