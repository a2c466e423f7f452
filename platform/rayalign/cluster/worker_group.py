"""One abstraction owns placement and dispatch of a role's actors (the shape of Ray Train's).

A ``WorkerGroup`` starts ``num_workers`` actors of one class, each pinned to its own bundle of a
placement group and named ``<stage>/<role>/<rank>`` so the dashboard's Actors view reads like
the pipeline. Calls go through ``run(lambda actor, rank: actor.method.remote(...))``: the method
is a real attribute, not a string, and every call has a deadline after which the error names the
actor that did not answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayalign.errors import WorkerError


@dataclass
class Placement:
    """Where each rank of a role goes: bundle ``bundles[rank]`` of ``group``."""

    group: PlacementGroup
    bundles: list[int]
    num_cpus: float
    num_gpus: float
    env_vars: dict[str, str] = field(default_factory=dict)


class WorkerGroup:
    def __init__(self, name: str, actor_cls: type, placement: Placement, init_args: Callable[[int], tuple] = lambda r: ()):
        self.name = name
        remote_cls = ray.remote(actor_cls)
        self.actors = []
        self.actor_names = []
        for rank, bundle in enumerate(placement.bundles):
            actor_name = f"{name}/{rank}"
            actor = remote_cls.options(
                name=actor_name,
                num_cpus=placement.num_cpus,
                num_gpus=placement.num_gpus,
                max_concurrency=2,  # lets a health probe through while a long call runs
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement.group,
                    placement_group_bundle_index=bundle,
                    placement_group_capture_child_tasks=True,
                ),
                runtime_env={"env_vars": placement.env_vars} if placement.env_vars else None,
            ).remote(*init_args(rank))
            self.actors.append(actor)
            self.actor_names.append(actor_name)

    def __len__(self) -> int:
        return len(self.actors)

    def run(self, call: Callable[[Any, int], "ray.ObjectRef"], timeout_s: float, ranks: Sequence[int] | None = None) -> list[Any]:
        """Issue ``call(actor, rank)`` on the chosen ranks and wait for all, within ``timeout_s``."""
        return self.wait(self.submit(call, ranks), timeout_s)

    def submit(self, call: Callable[[Any, int], "ray.ObjectRef"], ranks: Sequence[int] | None = None) -> dict["ray.ObjectRef", int]:
        """Issue ``call(actor, rank)`` on the chosen ranks without waiting, so the driver can keep
        other groups busy meanwhile; ``wait`` collects the answers (and names whoever fails)."""
        ranks = list(range(len(self.actors))) if ranks is None else list(ranks)
        return {call(self.actors[r], r): r for r in ranks}

    def ready(self, refs: dict["ray.ObjectRef", int]) -> bool:
        """Whether every one of ``submit``'s calls has answered (without waiting)."""
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        return len(done) == len(refs)

    def wait(self, refs: dict["ray.ObjectRef", int], timeout_s: float) -> list[Any]:
        """The answers to ``submit``'s calls in rank order, within ``timeout_s`` from now."""
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                slow = ", ".join(self.actor_names[refs[r]] for r in pending)
                raise WorkerError(slow, f"no answer within {timeout_s:.0f}s (hung or overloaded)", retryable=True)
            ref = ready[0]
            rank = refs[ref]
            try:
                results[rank] = ray.get(ref)
            except RayTaskError as exc:
                raise WorkerError(self.actor_names[rank], f"raised {exc.cause!r}") from exc.cause
            except RayActorError as exc:
                # Ray's message spans many lines (the actor's whole history): the first says why.
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise WorkerError(self.actor_names[rank], f"died ({exc.__class__.__name__}: {why})", retryable=True) from exc
            except GetTimeoutError as exc:  # pragma: no cover - ray.wait already bounded the time
                raise WorkerError(self.actor_names[rank], str(exc)) from exc
        return [results[r] for r in sorted(results)]

    def shutdown(self, patience_s: float = 10.0) -> None:
        """Ask actors to release resources, then kill whatever did not finish in time."""
        refs = [a.shutdown.remote() for a in self.actors if hasattr(a, "shutdown")]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=patience_s)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
