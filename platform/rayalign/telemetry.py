"""Custom metrics for the Ray dashboard and Prometheus, recorded by the driver.

Ray exports ``ray.util.metrics`` from every process through its node's metrics agent in Prometheus
format, prefixing names with ``ray_``: ``rayalign_loss`` is scraped as ``ray_rayalign_loss``
(counters get a ``_total`` suffix too). Every series is tagged with ``stage`` and ``role``
(trainer, rollout, or driver for whole-stage values). Recording is a no-op while Ray is not
initialised (unit tests, ``rayalign report``), so callers never check. docs/operations.md lists
the metrics and how to see them in Prometheus and Grafana.

Ray exports a gauge only in the report interval (10 s) it was set in, and its metrics agent drops
the value two intervals later; a stage's status or last loss would vanish from the dashboard
while a long generation runs. A daemon thread therefore re-sets every gauge's last value every
few seconds for as long as the driver is connected, which gives the usual Prometheus meaning:
a gauge reads its last value.
"""

from __future__ import annotations

import math
import threading
import time
from functools import cache
from typing import Any

import ray
from ray.util.metrics import Counter, Gauge

PREFIX = "rayalign_"
TAGS = ("stage", "role")

# Values exported under their own names whenever a metrics dict holds them (per step or per
# stage); other keys stay in summary.json only.
KNOWN: dict[str, str] = {
    "loss": "training loss of the last optimizer step",
    "lr": "learning rate of the last optimizer step",
    "grad_norm": "global gradient norm of the last optimizer step, before clipping",
    "reward": "mean reward of the last batch of rollouts",
    "reward_accuracy": "share of preference pairs whose chosen answer has the higher implicit reward",
    "reward_margin": "mean implicit reward of chosen minus rejected answers",
    "kl": "KL divergence of the policy from the reference",
    "repetition_rate": "share of generations that repeat themselves",
    "hallucination_rate": "share of generations that state unsupported facts",
    "weight_sync_s": "seconds the last trainer-to-rollout weight sync took",
    "eval_loss": "held-out loss at the end of the stage",
}
ITEMS = "trained tokens (SFT) or pairs (DPO) on role=trainer, generated tokens on role=rollout"
OTHER: dict[str, str] = {
    "stage_status": "1 while the stage runs, 2 once it finished, 3 if it failed",
    "stage_seconds": "seconds the stage took (0 while it runs)",
    "step": "optimizer steps done in the stage",
    "progress": "share of the stage's optimizer steps done (0-1)",
    "throughput_per_s": "items per second: " + ITEMS,
}
RUNNING, FINISHED, FAILED = 1, 2, 3
REFRESH_S = 5.0  # half Ray's default report interval, so no interval passes without a value

_last: dict[tuple[str, str, str], float] = {}  # (name, stage, role) -> value, set on _last_node
_last_node = ""
_lock = threading.Lock()


@cache
def _gauge(name: str) -> Gauge:
    return Gauge(PREFIX + name, description=KNOWN.get(name) or OTHER[name], tag_keys=TAGS)


@cache
def _processed() -> Counter:
    # A counter, so Prometheus can take rate() over any window, beside the instantaneous gauge.
    return Counter(PREFIX + "processed", description="items processed: " + ITEMS, tag_keys=TAGS)


def _set(name: str, value: Any, stage: str, role: str) -> None:
    global _last_node
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        _gauge(name).set(float(value), tags={"stage": stage, "role": role})
        with _lock:
            if not _current(_last_node):  # a new Ray session: the old one's values are not its to show
                _last.clear()
                _last_node = ray.get_runtime_context().get_node_id()
            _last[(name, stage, role)] = float(value)
        _start_refresher()


def _current(node: str) -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_node_id() == node


@cache
def _start_refresher() -> None:
    threading.Thread(target=_refresh_forever, name="rayalign-telemetry", daemon=True).start()


def _refresh_forever() -> None:
    while True:
        time.sleep(REFRESH_S)
        with _lock:
            if not _current(_last_node):
                _last.clear()
            values = list(_last.items())
        for (name, stage, role), value in values:
            _gauge(name).set(value, tags={"stage": stage, "role": role})


def stage_started(stage: str) -> None:
    if ray.is_initialized():
        _set("stage_status", RUNNING, stage, "driver")
        _set("stage_seconds", 0, stage, "driver")


def stage_finished(stage: str, seconds: float, failed: bool = False) -> None:
    if ray.is_initialized():
        _set("stage_status", FAILED if failed else FINISHED, stage, "driver")
        _set("stage_seconds", seconds, stage, "driver")


def record_stage_metrics(stage: str, metrics: dict[str, Any], role: str = "driver") -> None:
    """Export the known keys of a metrics dict (reward, kl, repetition_rate, ...)."""
    if ray.is_initialized():
        for key, value in metrics.items():
            if key in KNOWN:
                _set(key, value, stage, role)


def record_train_step(stage: str, step: int, total: int, metrics: dict[str, Any], items_per_s: float) -> None:
    """One optimizer step: its metrics, the stage's progress and the trainers' throughput."""
    if not ray.is_initialized():
        return
    record_stage_metrics(stage, metrics, role="trainer")
    _set("step", step, stage, "trainer")
    _set("progress", step / max(1, total), stage, "trainer")
    _set("throughput_per_s", items_per_s, stage, "trainer")
    count = metrics.get("count")
    if isinstance(count, (int, float)) and count > 0:
        _processed().inc(float(count), tags={"stage": stage, "role": "trainer"})


def record_generation(stage: str, tokens: int, seconds: float) -> None:
    """A batch of rollouts: output tokens and the wall time the engines took for them."""
    if not ray.is_initialized():
        return
    if seconds > 0:
        _set("throughput_per_s", tokens / seconds, stage, "rollout")
    if tokens > 0:
        _processed().inc(float(tokens), tags={"stage": stage, "role": "rollout"})
