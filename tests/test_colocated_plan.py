"""The colocated RL memory plan: what each phase holds on the shared GPU, the levers it pulls (optimizer
offload, then CUDA graphs off) only when needed, and its one-line refusal before any worker starts."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch

from conftest import REPO
from rayalign.colocated_memory import (AWAKE_HEADROOM, CUDA_GRAPHS, PHASES, ColocatedSetup, phases, plan_colocated,
                                       refusal)
from rayalign.errors import ConfigError
from rayalign.memory import GiB, ModelShape, TrainingPlan

sys.path.insert(0, str(REPO / "benchmarks"))
from memory_validation import SHAPES  # noqa: E402  (the published Qwen2-0.5B/1.5B configs)

H200_GIB = 139.8


def shape(name: str) -> ModelShape:
    return ModelShape.from_config({"model_type": "qwen2", **SHAPES[name]})


def setup(name="0.5b", tokens=16384, gib=H200_GIB, fraction=0.3, logits="full", **kw) -> ColocatedSetup:
    return ColocatedSetup(policy=shape(name), training=TrainingPlan(seq=tokens, gpu_memory_gib=gib, logits=logits),
                          engine_fraction=fraction, max_model_len=528, **kw)


def test_the_grpo_benchmark_settings_fit_an_h200_awake_at_05b_and_asleep_at_15b():
    # benchmarks/grpo_step.py: 16k-token rows, vLLM's share 0.3, no reference (kl_coef 0), and the
    # RL passes' chunked output head. 1.5B would fit awake, but not with AWAKE_HEADROOM to spare.
    large = plan_colocated(setup("1.5b", logits="labelled"))
    assert large.fits and large.sleep_level == 2 and large.cuda_graphs and not large.offload_optimizer
    awake = plan_colocated(setup("1.5b", logits="labelled"), sleep=False)
    assert awake.fits and awake.peak * AWAKE_HEADROOM > awake.capacity
    name = "0.5b"
    plan = plan_colocated(setup(name, logits="labelled"))
    assert plan.fits and plan.cuda_graphs and not plan.offload_optimizer and plan.sleep_level == 0
    for phase in PHASES:
        assert plan.phases[phase]["vLLM"] == pytest.approx(0.3 * H200_GIB * GiB + CUDA_GRAPHS)
        assert "vLLM asleep" not in plan.phases[phase]
    assert "engines stay awake" in plan.summary()
    # Awake, nothing returns the trainer's cached blocks: its allocator keeps its training peak in
    # every phase, so every phase is as full as training (the awake run of 2026-12-03 read 93.6
    # GiB while generating where this plan had said 52.2, with only the trainer's resident state).
    assert plan.phases["generate"]["policy"] == plan.phases["train"]["policy"] == plan.phases["sync"]["policy"]
    asleep = plan_colocated(setup(name, logits="labelled"), sleep=True)
    assert asleep.phases["generate"]["policy"] < asleep.phases["train"]["policy"]


@pytest.mark.parametrize("name", ["0.5b", "1.5b"])
def test_the_grpo_benchmark_settings_fit_an_h200_asleep_with_graphs_and_no_offload(name):
    plan = plan_colocated(setup(name), sleep=True)
    assert plan.fits and plan.cuda_graphs and not plan.offload_optimizer and plan.sleep_level == 2
    assert plan.peak <= plan.capacity
    # The engine's whole share only while generating; asleep it keeps its context and graph pool.
    assert plan.phases["generate"]["vLLM"] == pytest.approx(0.3 * H200_GIB * GiB + CUDA_GRAPHS)
    for phase in ("score", "train"):
        assert "vLLM" not in plan.phases[phase] and plan.phases[phase]["vLLM asleep"] < 2.5 * GiB
    # The sync wakes the engine's weights only, beside the trainer's exported copy of them.
    assert plan.phases["sync"]["vLLM weights"] == plan.phases["sync"]["exported weights"] == 2 * shape(name).params


def test_every_role_on_the_gpu_is_counted_in_every_phase():
    alone = phases(setup(), False, True)
    full = phases(setup(reference=shape("0.5b"), critic=shape("0.5b"), reward=shape("0.5b")), False, True)
    for phase in PHASES:
        assert sum(full[phase].values()) > sum(alone[phase].values())
        assert full[phase]["CUDA contexts"] == 4 * alone[phase]["CUDA contexts"]  # policy, critic, reference, reward
    # Scoring runs every model's forward pass at once; frozen models keep only weights while training.
    assert full["score"]["reference"] > full["train"]["reference"] == 2 * shape("0.5b").params


def test_sleep_then_offload_then_eager_are_pulled_only_when_needed():
    # 60 GiB, a 0.5B policy, 16k-token rows: awake while the engine's share fits beside training.
    plan = lambda frac, **kw: plan_colocated(setup(gib=60, fraction=frac, logits="labelled"), **kw)  # noqa: E731
    assert plan(0.1).fits and plan(0.1).sleep_level == 0
    crowded = next(f / 100 for f in range(10, 100) if not plan(f / 100, sleep=False).fits)
    assert plan(crowded).fits and plan(crowded).sleep_level == 2 and not plan(crowded).offload_optimizer
    assert plan(crowded).total("train") < plan(crowded, sleep=False).total("train")
    # Forced awake where it cannot fit: refused, and the message names the lever.
    assert "resources.colocate_sleep=true" in refusal(plan(crowded, sleep=False), "stages[0].grpo")
    # Awake is chosen by itself only with AWAKE_HEADROOM to spare; forced, it runs wherever it fits.
    edge = next(f / 100 for f in range(10, 100)
                if plan(f / 100, sleep=False).peak * AWAKE_HEADROOM > plan(f / 100, sleep=False).capacity)
    assert plan(edge, sleep=False).fits and plan(edge).sleep_level == 2
    assert plan(edge - 0.01).sleep_level == 0

    # 24 GiB, a 0.5B policy and a 1k-token row, engines asleep: the generate phase decides.
    fits = lambda frac, **kw: plan_colocated(setup(tokens=1024, gib=24, fraction=frac), sleep=True, **kw)  # noqa: E731
    roomy = fits(0.3)
    assert roomy.fits and not roomy.offload_optimizer and roomy.cuda_graphs
    # Offload alone makes room: graphs stay on.
    tight = next(f / 100 for f in range(30, 100) if not fits(f / 100, offload_optimizer=False).fits)
    plan = fits(tight)
    assert plan.fits and plan.offload_optimizer and plan.cuda_graphs
    assert plan.total("generate") < fits(tight, offload_optimizer=False).total("generate")
    # Past what offload frees, the graph pool goes too; and the config can forbid either lever.
    tighter = next(f / 100 for f in range(int(tight * 100), 100) if not fits(f / 100, enforce_eager=False).fits)
    plan = fits(tighter)
    assert plan.fits and plan.offload_optimizer and not plan.cuda_graphs
    assert not fits(tighter, enforce_eager=False).fits and not fits(tight, offload_optimizer=False).fits


def _suggested(message: str, key: str) -> float:
    return float(re.search(re.escape(key) + r" <= ([\d.]+)", message).group(1))


def test_refusal_names_the_phase_the_numbers_and_values_that_fit():
    plan = plan_colocated(setup(tokens=1024, gib=24, fraction=0.9))
    assert not plan.fits
    message = refusal(plan, "stages[0].grpo")
    assert "\n" not in message
    assert "needs %.1f GiB per GPU but the GPU has 24.0 GiB" % (plan.peak / GiB) in message
    assert "even with the optimizer offloaded and CUDA graphs off" in message
    assert "generate %.1f GiB (vLLM %.1f" % (plan.total("generate") / GiB, 0.9 * 24) in message
    fraction = _suggested(message, "resources.rollout.gpu_memory_utilization")
    assert plan_colocated(setup(tokens=1024, gib=24, fraction=fraction)).fits
    assert not plan_colocated(setup(tokens=1024, gib=24, fraction=fraction + 0.02)).fits

    # Too many tokens per row: the train phase decides, and the key is the stage's.
    plan = plan_colocated(setup(tokens=65536, gib=80, fraction=0.3))
    message = refusal(plan, "stages[2].grpo")
    assert re.search(r": train \d+\.\d GiB \(policy", message)
    tokens = _suggested(message, "stages[2].grpo.max_tokens_per_micro_batch")
    assert plan_colocated(setup(tokens=int(tokens), gib=80, fraction=0.3)).fits
    assert not plan_colocated(setup(tokens=int(tokens) + 512, gib=80, fraction=0.3)).fits
    assert "stages[2].grpo.gradient_checkpointing=true" in message and "resources.colocate=false" in message


def test_refusal_when_vllm_share_cannot_hold_its_weights_and_one_sequence():
    plan = plan_colocated(setup("1.5b", tokens=1024, gib=24, fraction=0.05))
    assert not plan.fits and not plan.kv_cache_fits_one_sequence
    message = refusal(plan, "stages[0].grpo")
    assert message.startswith("colocated memory plan: resources.rollout.gpu_memory_utilization=0.05 gives vLLM 1.2 GiB")
    assert plan_colocated(setup("1.5b", tokens=1024, gib=24, fraction=_at_least(message))).kv_cache_fits_one_sequence


def _at_least(message: str) -> float:
    return float(re.search(r"raise it to at least ([\d.]+)", message).group(1))


def test_pipeline_refuses_a_colocated_rl_plan_before_any_worker(tmp_path, tiny_model_path, monkeypatch):
    """A 0.5B-shaped policy, one 24 GiB GPU, vLLM asking for 90% of it: refused in the stage's
    preflight, before the output directory or Ray exist, naming the stage and the keys."""
    from rayalign.config import RunConfig
    from rayalign.pipeline import run_pipeline

    model = tmp_path / "policy"
    shutil.copytree(tiny_model_path, model)
    config = json.loads((model / "config.json").read_text())
    config.update({k: v for k, v in SHAPES["0.5b"].items() if k != "vocab_size"})
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("RAYALIGN_GPU_MEMORY_GIB", "24")
    cfg = RunConfig.model_validate({
        "model": str(model), "output_dir": str(tmp_path / "run"),
        "data": {"prompts": "synthetic:arithmetic/prompts"},
        "resources": {"colocate": True, "trainer": {"num_gpus": 1}, "rollout": {"gpu_memory_utilization": 0.9}},
        "stages": [{"grpo": {"steps": 1, "max_tokens_per_micro_batch": 1024}}]})
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg)
    message = str(err.value)
    assert message.startswith("config error: stages[0].grpo: colocated memory plan needs ") and "\n" not in message
    assert "but the GPU has 24.0 GiB" in message and "resources.rollout.gpu_memory_utilization <= 0." in message
    assert not (tmp_path / "run").exists()

    # What the message says fits, runs the preflight through (this CPU box then has no GPU to run on).
    fraction = _suggested(message, "resources.rollout.gpu_memory_utilization")
    from rayalign_rl.memory_plan import colocated_plan

    plan = colocated_plan(cfg.model_copy(update={"resources": cfg.resources.model_copy(update={
        "rollout": cfg.resources.rollout.model_copy(update={"gpu_memory_utilization": fraction})})}),
        _grpo(max_tokens_per_micro_batch=1024), str(model), None, "stages[0].grpo")
    assert plan is not None and plan.fits and plan.phases["generate"]["policy"] > 0


def _grpo(**options):
    from rayalign_rl.config import GRPOConfig

    return GRPOConfig.model_validate(options)


def test_no_plan_without_shared_gpus_or_known_memory(tiny_model_path, monkeypatch):
    from rayalign.config import RunConfig
    from rayalign_rl.memory_plan import colocated_plan

    monkeypatch.setenv("RAYALIGN_GPU_MEMORY_GIB", "80")
    shared = RunConfig.model_validate({"resources": {"colocate": True, "trainer": {"num_gpus": 1}}})
    apart = RunConfig.model_validate({"resources": {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}}})
    cpu = RunConfig.model_validate({"resources": {"colocate": True}})
    assert colocated_plan(shared, _grpo(), tiny_model_path, None, "stages[0].grpo").fits
    assert colocated_plan(apart, _grpo(), tiny_model_path, None, "stages[0].grpo") is None
    assert colocated_plan(cpu, _grpo(), tiny_model_path, None, "stages[0].grpo") is None
    monkeypatch.delenv("RAYALIGN_GPU_MEMORY_GIB")
    if not torch.cuda.is_available():
        assert colocated_plan(shared, _grpo(), tiny_model_path, None, "stages[0].grpo") is None


def test_roles_follow_the_stage_config(tiny_model_path, monkeypatch):
    from rayalign.config import RunConfig
    from rayalign_rl.memory_plan import colocated_plan

    monkeypatch.setenv("RAYALIGN_GPU_MEMORY_GIB", "80")
    run = RunConfig.model_validate({"resources": {"colocate": True, "trainer": {"num_gpus": 1}}})
    grpo = colocated_plan(run, _grpo(kl_coef=0.0), tiny_model_path, None, "s").phases["score"]
    assert set(grpo) == {"policy", "vLLM", "CUDA contexts"}  # room to spare: the engine stays awake
    asleep = run.model_copy(update={"resources": run.resources.model_copy(update={"colocate_sleep": True})})
    grpo = colocated_plan(asleep, _grpo(kl_coef=0.0), tiny_model_path, None, "s").phases["score"]
    assert set(grpo) == {"policy", "vLLM asleep", "CUDA contexts"}
    # PPO: a critic (from the reward model), the reference, and the reward model named by an
    # earlier stage (not produced yet: sized like the policy).
    ppo = colocated_plan(run, _grpo(advantage="gae", kl_coef=0.05, reward_model="reward_model"), tiny_model_path,
                         "reward_model", "s").phases["score"]
    assert {"policy", "critic", "reference", "reward model"} <= set(ppo)


def test_chunked_log_probs_equal_the_whole_rows():
    """The no-gradient passes slice the positions to bound their float32 temporaries; every value
    is the one the whole-row computation gives."""
    import torch.nn.functional as F

    import rayalign_rl.objectives as objectives
    from rayalign.training.losses import shifted_token_logps

    torch.manual_seed(0)
    vocab, length = 50, 37
    logits = torch.randn(1, length, vocab).bfloat16()
    labels = torch.randint(0, vocab, (1, length))
    labels[0, :5] = -100
    batch = {"input_ids": labels, "position_ids": labels, "labels": labels}

    class Model:
        def __call__(self, **_):
            return type("Out", (), {"logits": logits})()

    tempered = logits / 0.7
    all_logps = F.log_softmax(tempered[:, :-1].float(), dim=-1)
    whole = (shifted_token_logps(tempered, labels)[0], -(all_logps.exp() * all_logps).sum(-1),
             shifted_token_logps(logits, labels)[0])
    for elements in (1 << 28, 7 * vocab, vocab):  # one chunk, a ragged last chunk, one position each
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(objectives, "LOGPROB_CHUNK_ELEMENTS", elements)
            for got, want in zip(objectives.PolicyForward(0.7)(Model(), batch), whole):
                assert torch.equal(got, want)
            assert torch.equal(objectives.TokenLogps(0.7)(Model(), batch)[0], whole[0])


def test_the_stage_turns_cuda_graphs_off_only_when_its_plan_needs_it_and_says_so(tmp_path, tiny_model_path,
                                                                                  monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from rayalign.config import RunConfig
    from rayalign.stage import Artifacts
    from rayalign_rl.stage import GRPOStage

    model = tmp_path / "policy"
    shutil.copytree(tiny_model_path, model)
    config = json.loads((model / "config.json").read_text())
    config.update({"model_type": "qwen2", **SHAPES["0.5b"]})
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("RAYALIGN_GPU_MEMORY_GIB", "24")
    stage = GRPOStage(_grpo(max_tokens_per_micro_batch=1024, kl_coef=0.0))
    # The largest vLLM share that needs the graph pool's memory: offload alone no longer suffices.
    like_stage = lambda f: setup(tokens=1024, gib=24, fraction=f, logits="labelled")  # noqa: E731
    eager_only = max(f / 100 for f in range(5, 100)
                     if plan_colocated(like_stage(f / 100)).fits
                     and not plan_colocated(like_stage(f / 100), enforce_eager=False).fits)

    def plan_for(fraction: float):
        run = RunConfig.model_validate({"resources": {"colocate": True, "trainer": {"num_gpus": 1},
                                                      "rollout": {"gpu_memory_utilization": fraction,
                                                                  "max_model_len": 528}}})
        ctx = SimpleNamespace(run=run, index=0, name="grpo", artifacts=Artifacts(model=str(model)),
                              log=logging.getLogger("rayalign"))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rayalign"):
            return stage.memory_plan(ctx, None), caplog.text

    plan, log = plan_for(eager_only)
    assert plan.fits and not plan.cuda_graphs and plan.offload_optimizer
    assert "vLLM runs eager (no CUDA graphs" in log and "colocated memory plan: peak generate" in log
    plan, log = plan_for(0.3)
    assert plan.cuda_graphs and not plan.offload_optimizer and "eager" not in log
    assert "colocated memory plan: peak" in log and "CUDA graphs on" in log


def test_the_labelled_rl_passes_plan_one_chunk_of_logits_not_the_row():
    from rayalign.memory import CALIBRATION, LABELLED_CHUNK_TOKENS
    from rayalign.training.labelled_logps import CHUNK_TOKENS

    assert LABELLED_CHUNK_TOKENS == CHUNK_TOKENS  # the planner's copy of the chunk size (it imports no torch)
    full = plan_colocated(setup(logits="full"), sleep=True)
    labelled = plan_colocated(setup(logits="labelled"), sleep=True)
    vocab = shape("0.5b").vocab
    # Training: 16k positions' logits and their float32 work become one 1k chunk's.
    saved = full.phases["train"]["policy"] - labelled.phases["train"]["policy"]
    assert saved == pytest.approx((16384 - CHUNK_TOKENS) * vocab * CALIBRATION.logits_bytes, rel=1e-6)
    # Scoring: the whole row's bf16 logits are no longer kept.
    assert full.phases["score"]["policy"] - labelled.phases["score"]["policy"] == pytest.approx(16384 * vocab * 2)
