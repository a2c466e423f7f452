"""A progress line per stage in the job log: step, metrics, rate and ETA.

Every step also goes to the dashboard's metrics (``rayalign.telemetry``) and the run's experiment
trackers (``rayalign.tracking``), with the trainers' throughput: the step's ``count`` (trained
tokens, or pairs for DPO) over its wall time.
"""

from __future__ import annotations

import logging
import time

from rayalign import telemetry, tracking


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, stage: str, total: int, log: logging.Logger, every_s: float = 5.0):
        self.stage, self.total, self.log, self.every_s = stage, total, log, every_s
        self.start = self.last = self.last_step = time.monotonic()
        self.done = 0

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.done = step
        now = time.monotonic()
        rate = metrics.get("count", 0.0) / max(now - self.last_step, 1e-9)
        self.last_step = now
        telemetry.record_train_step(self.stage, step, self.total, metrics, rate)
        tracking.record_train_step(step, metrics, rate)
        if now - self.last < self.every_s and step not in (1, self.total):
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step) if step else 0.0
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        width = 20
        filled = int(width * step / max(1, self.total))
        self.log.info(
            "[%s] |%s%s| %d/%d %s elapsed %s eta %s",
            self.stage, "#" * filled, "." * (width - filled), step, self.total, shown,
            _fmt_seconds(elapsed), _fmt_seconds(eta),
        )
