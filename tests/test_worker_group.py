"""WorkerGroup dispatch on real Ray actors: ``submit`` lets two groups work at once (what the RL step
relies on to score rewards while log-probs are computed); ``wait`` answers in rank order and names
the actor that fails."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray

from rayalign.cluster.runtime import Cluster
from rayalign.cluster.worker_group import WorkerGroup
from rayalign.config import ResourcesConfig
from rayalign.errors import WorkerError
from rayalign.testing import start_local_ray
from rayalign.workers.base import Worker


class Signals(Worker):
    """Touches and waits for files: a rendezvous between actors that share no Ray objects."""

    def touch(self, path: str) -> int:
        Path(path).touch()
        return 1

    def wait_for(self, path: str, patience_s: float) -> bool:
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            if Path(path).exists():
                return True
            time.sleep(0.05)
        return False

    def fail(self) -> None:
        raise ValueError("bad input on purpose")


@pytest.fixture(scope="module")
def groups():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    start_local_ray(num_cpus=4)
    resources = ResourcesConfig.model_validate({"trainer": {"num_workers": 2, "num_cpus": 1},
                                                "reward": {"num_cpus": 1}})
    with Cluster(resources).reserve("wg", ["trainer", "reward"]) as placement:
        waiting = WorkerGroup("wg/trainer", Signals, placement["trainer"], lambda r: (1,))
        touching = WorkerGroup("wg/reward", Signals, placement["reward"], lambda r: (1,))
        # Every actor answers once before the tests time their calls: on a loaded 2-core machine an
        # actor's process can take over a minute to start, which is no dispatch's fault.
        for group in (waiting, touching):
            group.run(lambda a, r: a.wait_for.remote("/nonexistent", 0), 600)
        yield waiting, touching
        waiting.shutdown()
        touching.shutdown()


def test_submitted_calls_of_two_groups_run_at_the_same_time(groups, tmp_path):
    waiting, touching = groups
    flag = str(tmp_path / "flag")
    # Both ranks of one group wait for a file that only the other group's call creates: they can
    # only see it if the second call is issued before the first group's answers are awaited.
    in_flight = waiting.submit(lambda a, r: a.wait_for.remote(flag, 60))
    assert touching.run(lambda a, r: a.touch.remote(flag), 60) == [1]
    assert waiting.wait(in_flight, 60) == [True, True]


def test_run_answers_in_rank_order_and_a_failure_names_the_actor(groups, tmp_path):
    waiting, _ = groups
    assert waiting.run(lambda a, r: a.wait_for.remote(str(tmp_path / f"none-{r}"), 0.05 * (2 - r)), 60) == [False, False]
    with pytest.raises(WorkerError, match=r"worker wg/trainer/1: raised ValueError\('bad input on purpose'\)"):
        waiting.run(lambda a, r: a.fail.remote(), 60, ranks=[1])
    with pytest.raises(WorkerError, match=r"worker wg/trainer/0, wg/trainer/1: no answer within 1s"):
        waiting.wait(waiting.submit(lambda a, r: a.wait_for.remote(str(tmp_path / "never"), 5)), 1)
