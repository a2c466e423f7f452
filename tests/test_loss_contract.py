"""Losses are a contract: a family (which stages take them), typed options checked before any
work, and ``needs_reference`` for preference losses. Every stage resolves its losses by name, so
a plugin's loss replaces any built-in one, the RL stage's policy and value losses included."""

import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml
from ray import cloudpickle

from rayalign.errors import ConfigError
from rayalign.hookspecs import hookimpl
from rayalign.plugins import PluginManager
from rayalign.training.losses import Loss, build_loss

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/


class ReferenceFreeHingeLoss(Loss):
    """A plugin's own reference-free loss: SLiC's hinge (Zhao et al. 2023) on the policy's mean
    log-probs alone, ``max(0, delta - beta * (mean_c - mean_r))``; no built-in computes it."""

    name = "hinge_test"
    family = "preference"
    needs_reference = False
    uses_mean_logps = True

    def __init__(self, beta: float = 1.0, delta: float = 1.0):
        super().__init__(beta=beta, delta=delta)
        self.beta, self.delta = beta, delta

    def forward(self, pc, pr, rc, rr):
        assert not rc.any() and not rr.any(), "a reference-free loss gets zeros as the reference"
        loss = torch.relu(self.delta - self.beta * (pc - pr)).mean()
        return loss, {"loss": loss.detach()}


def plugins() -> PluginManager:
    module = types.ModuleType("hinge_plugin")
    module.register_losses = hookimpl(lambda register: register(ReferenceFreeHingeLoss))
    return PluginManager(extra_plugins=(module,))


def test_options_come_from_the_typed_init():
    from rayalign_rl.losses import ClippedPolicyLoss

    fields = ClippedPolicyLoss.Options.model_fields
    assert list(fields) == ["clip_low", "clip_high", "kl_coef", "aggregation", "kl_ratio_correction"]
    assert fields["clip_low"].default == 0.2
    assert list(ReferenceFreeHingeLoss.Options.model_fields) == ["beta", "delta"]


def test_stage_settings_reach_only_a_loss_that_declares_them():
    pm = plugins()
    loss = build_loss(pm.losses, "hinge_test", "preference", {"delta": 2.0}, "w", "w_options",
                      stage_options={"beta": 3.0, "not_an_option_of_it": 1})
    assert (loss.beta, loss.delta) == (3.0, 2.0)
    ce = build_loss(pm.losses, "sft", "sft", {}, "w", "w_options", stage_options={"beta": 3.0})
    assert ce.options == {}


def test_a_policy_family_keeps_its_own_defaults_unless_the_stage_sets_them():
    from rayalign_rl.config import GRPOConfig
    from rayalign_rl.losses import rl_losses

    losses = plugins().losses

    def policy(**stage):
        return rl_losses(losses, GRPOConfig(**stage), "stages[0].grpo")[0]

    clipped = policy()
    assert (clipped.name, clipped.clip_low, clipped.clip_high, clipped.aggregation) == (
        "clipped_policy", 0.2, 0.2, "token_mean")
    assert policy(loss_aggregation="sequence_mean").aggregation == "sequence_mean"
    dapo = policy(policy_loss="dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.kl_coef, dapo.aggregation) == (0.2, 0.28, 0.04, "token_mean")
    assert policy(policy_loss="dapo", clip_high=0.3).clip_high == 0.3
    assert policy(policy_loss="dapo", clip_high=0.3, loss_options={"clip_high": 0.35}).clip_high == 0.35
    gspo = policy(policy_loss="gspo", kl_in="reward")
    assert (gspo.clip_low, gspo.clip_high, gspo.kl_coef, gspo.aggregation) == (3e-4, 4e-4, 0.0, "sequence_mean")
    assert policy(policy_loss="dr_grpo", max_new_tokens=64).max_new_tokens == 64
    assert policy(policy_loss="cispo").clip_high == 4.0


@pytest.mark.parametrize("name, family, options, where, message", [
    ("sft", "preference", {}, "stages[1].dpo.loss",
     "'sft' is a sft loss; this stage takes a preference loss: hinge_test, ipo, orpo, sigmoid, simpo"),
    ("kto", "preference", {}, "stages[1].dpo.loss",
     "'kto' is an unpaired loss; this stage takes a preference loss: hinge_test, ipo, orpo, sigmoid, simpo"),
    ("simpo", "unpaired", {}, "stages[1].dpo.loss",
     "'simpo' is a preference loss; this stage takes an unpaired loss: kto"),
    ("sigmoid", "reward", {}, "stages[1].dpo.loss",
     "'sigmoid' is a preference loss; this stage takes a reward loss: bradley_terry"),
    ("clipped_value", "policy", {}, "stages[1].dpo.loss",
     "'clipped_value' is a value loss; this stage takes a policy loss: cispo, clipped_policy, dapo, dr_grpo, gspo"),
    ("sigmoid", "preference", {"gamma": 0.5}, "stages[1].dpo.loss_options.gamma",
     "unknown option of loss 'sigmoid' (its options: beta)"),
    ("hinge_test", "preference", {"delta": "much"}, "stages[1].dpo.loss_options.delta",
     "of loss 'hinge_test' (its options: beta, delta)"),
    # Bounds declared with Annotated in the built-ins' typed __init__ are checked too.
    ("simpo", "preference", {"gamma": -0.5}, "stages[1].dpo.loss_options.gamma",
     "Input should be greater than or equal to 0 of loss 'simpo' (its options: beta, gamma)"),
    ("orpo", "preference", {"beta": 0}, "stages[1].dpo.loss_options.beta",
     "Input should be greater than 0 of loss 'orpo' (its options: beta, prompt_nll)"),
    ("orpo", "preference", {"prompt_nll": "sometimes"}, "stages[1].dpo.loss_options.prompt_nll",
     "Input should be a valid boolean"),
    ("kto", "unpaired", {"undesirable_weight": -1}, "stages[1].dpo.loss_options.undesirable_weight",
     "of loss 'kto' (its options: beta, desirable_weight, undesirable_weight)"),
])
def test_a_wrong_family_or_option_is_one_line_naming_the_key(name, family, options, where, message):
    with pytest.raises(ConfigError) as exc:
        build_loss(plugins().losses, name, family, options, "stages[1].dpo.loss", "stages[1].dpo.loss_options")
    text = str(exc.value)
    assert text.startswith(f"config error: {where}: ") and message in text and "\n" not in text


def test_a_loss_without_a_family_is_refused_by_every_stage():
    class Bare(Loss):
        name = "bare"

        def forward(self, logits, labels):
            return logits.sum(), {}

    module = types.ModuleType("bare_plugin")
    module.register_losses = hookimpl(lambda register: register(Bare))
    with pytest.raises(ConfigError, match="'bare' is a loss that declares no family; this stage takes a sft loss"):
        build_loss(PluginManager(extra_plugins=(module,)).losses, "bare", "sft", {}, "stages[0].sft.loss", "x")


@pytest.mark.parametrize("stage, message", [
    ({"reward_model": {"loss": "sigmoid"}}, "stages[0].reward_model.loss: 'sigmoid' is a preference loss"),
    ({"dpo": {"loss_options": {"gamma": 0.5}}}, "stages[0].dpo.loss_options.gamma: unknown option of loss 'sigmoid'"),
    ({"grpo": {"policy_loss": "clipped_value"}}, "stages[0].grpo.policy_loss: 'clipped_value' is a value loss"),
    ({"kto": {"loss": "sigmoid"}}, "stages[0].kto.loss: 'sigmoid' is a preference loss; this stage takes an "
     "unpaired loss: kto"),
    ({"kto": {"loss_options": {"desirable_weight": 0}}}, "stages[0].kto.loss_options.desirable_weight: Input "
     "should be greater than 0 of loss 'kto'"),
    ({"ppo": {"value_loss_options": {"delta": 1.0}}},
     "stages[0].ppo.value_loss_options.delta: unknown option of loss 'clipped_value' (its options: clip)"),
    # A stage clip or aggregation set for a policy loss that has no such option is refused, not ignored.
    ({"grpo": {"policy_loss": "cispo", "clip_low": 0.1}}, "stages[0].grpo.clip_low: policy loss 'cispo' has no "
     "option clip_low (its options: clip_high, kl_coef, kl_ratio_correction)"),
    ({"grpo": {"policy_loss": "gspo", "loss_aggregation": "token_mean"}},
     "stages[0].grpo.loss_aggregation: policy loss 'gspo' has no option aggregation"),
    ({"grpo": {"policy_loss": "dr_grpo", "loss_options": {"max_new_tokens": "long"}}},
     "stages[0].grpo.loss_options.max_new_tokens: Input should be a valid integer"),
])
def test_every_stage_refuses_before_any_worker(tmp_path, stage, message):
    from rayalign.config import RunConfig
    from rayalign.pipeline import run_pipeline

    out = tmp_path / "run"
    with pytest.raises(ConfigError) as exc:
        run_pipeline(RunConfig(output_dir=str(out), stages=[stage]))
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not out.exists()


def test_the_command_refuses_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "stages": [{"dpo": {"loss": "sft"}}]}))
    proc = subprocess.run([sys.executable, "-m", "rayalign", "run", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert lines == ["rayalign: config error: stages[0].dpo.loss: 'sft' is a sft loss; this stage takes a "
                     "preference loss: ipo, orpo, sigmoid, simpo"], proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_reference_free_loss_trains_dpo_without_reference_workers(tmp_path, monkeypatch):
    import ray

    import rayalign_dpo.stage
    from rayalign.config import RunConfig
    from rayalign.pipeline import run_pipeline

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss started the reference pass")

    monkeypatch.setattr(rayalign_dpo.stage, "reference_logps", no_reference)
    cfg = RunConfig(output_dir=str(tmp_path / "hinge"), stages=[{"dpo": {
        "loss": "hinge_test", "loss_options": {"delta": 0.3}, "beta": 2.5, "lr": 1e-4, "epochs": 1,
        "max_tokens_per_micro_batch": 256}}])
    ray.init(num_cpus=2, include_dashboard=False, namespace="rayalign-loss-contract", log_to_driver=False)
    try:
        out = run_pipeline(cfg, plugins())
    finally:
        ray.shutdown()
    metrics = json.loads((out / "00-dpo" / "metrics.json").read_text())["metrics"]
    assert metrics["steps"] > 0 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics["history"])
    assert not torch.load(out / "00-dpo" / "reference_logps.pt")[0][0].any()
