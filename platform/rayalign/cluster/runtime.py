"""Connecting to Ray and reserving resources for a stage's worker roles.

Each stage reserves one placement group for the roles it uses (SFT: trainer; DPO: trainer and
reference; generation: rollout) and releases it when done, so stages never compete. Resources
come from the run config only; a role's ``placement`` pins ranks to nodes by custom resources
or node labels (multi-node clusters). When ``colocate`` is set and the trainer has GPUs, every role
shares the trainer's GPU bundles (fractional GPUs; vLLM sleeps while the trainer works); with
``split_gpus`` the trainer and rollout engines share them, both awake, split by memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from rayalign.cluster.worker_group import Placement
from rayalign.config import ResourcesConfig, RoleResources, RolloutResources
from rayalign.errors import ConfigError

log = logging.getLogger("rayalign")

SPLIT_ROLES = ("trainer", "rollout")  # the roles that share the trainer's GPUs under resources.split_gpus


def connect(namespace: str = "rayalign") -> None:
    """Join the cluster named by RAY_ADDRESS (set by ``ray job submit``), a running local one, or start one."""
    if ray.is_initialized():
        return
    ray.init(namespace=namespace, log_to_driver=True, configure_logging=False)


def worker_env(uses_gpu: bool) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not uses_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA and fail on CPU nodes
    if "RAYALIGN_CACHE" in os.environ:
        env["RAYALIGN_CACHE"] = os.environ["RAYALIGN_CACHE"]
    return env


@dataclass
class RoleRequest:
    role: str
    resources: RoleResources

    @property
    def gpus_per_worker(self) -> float:
        tp = getattr(self.resources, "tensor_parallel_size", 1)
        return self.resources.num_gpus * tp if isinstance(self.resources, RolloutResources) else self.resources.num_gpus


class Cluster:
    def __init__(self, resources: ResourcesConfig):
        self.resources = resources

    def role(self, name: str) -> RoleRequest:
        return RoleRequest(name, getattr(self.resources, name))

    def _bundles(
        self, requests: list[RoleRequest]
    ) -> tuple[list[dict[str, float]], list[dict[str, str]], dict[str, Placement]]:
        """Bundles for the placement group, each bundle's node-label selector, and per role which
        bundle each rank uses."""
        res = self.resources
        trainer_gpus = res.trainer.num_gpus
        bundles: list[dict[str, float]] = []
        layout: dict[str, list[int]] = {}
        shares: dict[str, float] = {}
        colocated = res.colocated
        # The roles on the trainer's GPU bundles: every role when colocated, trainer and rollout
        # engines when they split the GPUs by memory (resources.split_gpus).
        shared = [r for r in requests if colocated or (res.split and r.role in SPLIT_ROLES)]
        n_shared = 0
        if shared:
            # One bundle per trainer GPU; every sharing role takes a slice of the same GPUs (Ray's
            # bookkeeping only: what each really holds is vLLM's gpu_memory_utilization and the rest).
            n = max(res.trainer.num_workers, *(r.resources.num_workers for r in shared))
            cpus = sum(r.resources.num_cpus for r in shared)
            bundles = [{"GPU": trainer_gpus, "CPU": cpus} for _ in range(n)]
            n_shared = n
            for r in shared:
                layout[r.role] = list(range(r.resources.num_workers))
                shares[r.role] = trainer_gpus / len(shared)
        for r in requests:
            if r in shared:
                continue
            start = len(bundles)
            bundle = {"CPU": r.resources.num_cpus}
            if r.gpus_per_worker > 0:
                bundle["GPU"] = r.gpus_per_worker  # a TP engine's GPUs stay in one bundle, so one node
            bundles += [dict(bundle) for _ in range(r.resources.num_workers)]
            layout[r.role] = list(range(start, start + r.resources.num_workers))
            shares[r.role] = r.gpus_per_worker
        # Rank r's node constraints go on its own bundle: custom resources join the bundle, label
        # selectors go beside it. Sharing roles use the trainer's bundles and its placement.
        selectors: list[dict[str, str]] = [{} for _ in bundles]
        owners = [(self.role("trainer"), list(range(n_shared)))] if shared else []
        owners += [(r, layout[r.role]) for r in requests if r not in shared]
        for r, indices in owners:
            for rank, index in enumerate(indices):
                selector = r.resources.selector(rank)
                if selector is not None:
                    bundles[index].update(selector.resources)
                    selectors[index] = dict(selector.labels)
        placements = {
            r.role: Placement(
                group=None,  # filled once the group exists
                bundles=layout[r.role],
                num_cpus=r.resources.num_cpus,
                num_gpus=shares[r.role],
                env_vars=worker_env(shares[r.role] > 0),
            )
            for r in requests
        }
        return bundles, selectors, placements

    @contextlib.contextmanager
    def reserve(self, stage: str, roles: list[str]) -> Iterator[dict[str, Placement]]:
        """Reserve a placement group for ``roles`` of ``stage``; fail clearly if it cannot fit."""
        requests = [self.role(r) for r in roles]
        bundles, selectors, placements = self._bundles(requests)
        need: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0) + 1e-9}
        if short:
            detail = ", ".join(f"{k}: needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
            raise ConfigError("resources", f"stage {stage!r} cannot fit on this cluster ({detail})")
        pg = placement_group(bundles, strategy=self.resources.placement_strategy, name=f"{stage}-pg",
                             bundle_label_selector=selectors if any(selectors) else None)
        ready, _ = ray.wait([pg.ready()], timeout=self.resources.placement_timeout_s)
        if not ready:
            remove_placement_group(pg)
            labels = f" with node labels {selectors}" if any(selectors) else ""
            raise ConfigError(
                "resources",
                f"stage {stage!r}: placement group {bundles}{labels} not ready after "
                f"{self.resources.placement_timeout_s:.0f}s (resources busy or no node fits one bundle)",
            )
        for p in placements.values():
            p.group = pg
        try:
            yield placements
        finally:
            remove_placement_group(pg)
