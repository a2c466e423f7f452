"""Options of the RL stages. ``ppo`` and ``grpo`` share them and differ only in defaults."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from rayalign.errors import ConfigError
from rayalign.options import validate_options
from rayalign.rewards import reward_options
from rayalign.training.labelled_logps import LogitsMode
from rayalign.training.loop import TrainingConfig
from rayalign_rl.advantages import stage_estimator
from rayalign_rl.async_rollout import AsyncRollout

REWARD_MODEL_TERM = "reward_model"  # the term scored by the stage's reward model, not a registered reward


class RewardTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a registered reward (`rayalign plugins` lists them), or `reward_model`")
    weight: float = 1.0
    options: dict[str, Any] = Field({}, description="the reward's options (e.g. `pattern`; `rayalign plugins show "
                                    "<reward>` lists them)")

    def check_plugins(self, plugins, where: str) -> None:
        """Called with the rest of the config (``rayalign.options.check_registered``): the reward
        exists and its options are its own; they become every option of it, defaults included."""
        if self.name == REWARD_MODEL_TERM:
            if self.options:
                raise ConfigError(f"{where}.options", "the reward model term takes no options")
            return
        self.options = reward_options(plugins, self.name, self.options, where)


class EnvironmentSettings(BaseModel):
    """A multi-turn environment for the RL stage's episodes (``rayalign_rl.multiturn``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a registered environment (`rayalign plugins` lists them), e.g. `calculator`")
    max_turns: int = Field(4, ge=1, description="model turns per episode (end reason `max_turns`)")
    max_total_tokens: int = Field(1024, ge=1, description="tokens after the prompt per episode, the model's and "
                                  "the observations' (end reason `max_tokens`); each turn is also capped at "
                                  "max_new_tokens")
    max_episode_s: float = Field(300.0, gt=0, description="wall time of one episode (end reason `timeout`)")
    timeout_s: float = Field(30.0, gt=0, description="one environment call, reset or step (end reason "
                             "`env_timeout`)")
    options: dict[str, Any] = Field({}, description="the environment's options (`rayalign plugins show <name>`)")

    def check_plugins(self, plugins, where: str) -> None:
        """With the rest of the config: the environment exists and its options are its own."""
        cls = plugins.environments.get(self.name, where=f"{where}.name")
        self.options = validate_options(cls.Config, self.options, f"{where}.options", "environment",
                                        self.name).model_dump()


class RLConfig(TrainingConfig):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)  # async_rollout's alias `async`

    # With resources.colocate the stage plans every role on the GPU itself (rayalign_rl.memory_plan),
    # which the pipeline's trainer-only check would contradict (it knows no optimizer offload).
    plans_colocated_memory: ClassVar[bool] = True

    # Inherited training options that mean nothing here: a rollout batch is a step, and lengths are
    # max_prompt_length + max_new_tokens. Setting them is a mistake worth an error.
    epochs: int = Field(1, description="not used by RL stages: `steps` counts rollout batches")
    max_length: int = Field(1024, description="not used by RL stages: see max_prompt_length and max_new_tokens")

    @field_validator("epochs", "max_length")
    @classmethod
    def _unused(cls, value: int, info) -> int:
        if value != cls.model_fields[info.field_name].default:
            raise ValueError("not used by RL stages (" + cls.model_fields[info.field_name].description.split(": ", 1)[1] + ")")
        return value

    prompts: str = Field("prompts", description="key under `data:` naming the prompts JSONL (with `reference` "
                         "answers for rule rewards); `eval_fraction` of them are held out for evaluation")
    steps: int = Field(20, ge=1, description="rollout batches: generate, score, update, sync")
    prompts_per_step: int = Field(8, ge=1, description="prompts per rollout batch")
    num_generations: int = Field(1, ge=1, description="answers sampled per prompt (a group, for grpo/rloo)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1, description="tokens per sampled answer")
    max_prompt_length: int = Field(512, ge=1, description="prompt tokens after the chat template; a longer prompt "
                                   "is a bad record (`data.bad_records`)")
    advantage: str = Field("gae", description="a registered advantage estimator: gae (PPO, with a critic), grpo "
                           "or rloo (group baselines, no critic), or a plugin's (`rayalign plugins` lists them)")
    advantage_options: dict[str, Any] = Field({}, description="options of the estimator beyond the settings "
                                              "below that it declares")
    scale_rewards: bool = Field(True, description="grpo: divide by the group's reward std")
    whiten_advantages: bool = Field(True, description="gae: normalise advantages over the batch")
    gamma: float = Field(1.0, ge=0, le=1, description="gae discount")
    lam: float = Field(0.95, ge=0, le=1, description="gae lambda")
    kl_coef: float = Field(0.05, ge=0, description="weight of the KL to the reference (0: none)")
    kl_in: Literal["reward", "loss"] = Field("reward", description="reward: a per-token penalty in the reward "
                                             "(PPO); loss: a k3 term in the loss (GRPO)")
    kl_ratio_correction: bool = Field(True, description="loss KL: weight it by the importance ratio (unbiased "
                                      "off-policy; TRL's use_bias_correction_kl)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    clip_low: float | None = Field(None, gt=0, lt=1, description="policy ratio clip below 1 (null: the policy "
                                   "loss's default: 0.2, gspo 3e-4)")
    clip_high: float | None = Field(None, gt=0, description="policy ratio clip above 1, DAPO's clip-higher when "
                                    "larger than clip_low (null: the policy loss's default: 0.2, dapo 0.28, gspo "
                                    "4e-4, cispo 4)")
    loss_aggregation: Literal["token_mean", "sequence_mean"] | None = Field(
        None, description="clipped_policy: mean over the step's answer tokens, or over answers of each answer's "
        "token mean (null: token_mean)")
    value_clip: float = Field(0.2, gt=0, description="critic: how far a new value may move from the old one")
    policy_loss: str = Field("clipped_policy", description="registered policy loss (family `policy`): "
                             "clipped_policy, dapo, gspo, dr_grpo, cispo, or a plugin's; gets the clip, KL and "
                             "max_new_tokens settings that it declares, and `loss_options`")
    dynamic_sampling: bool = Field(False, description="DAPO's dynamic sampling: drop each prompt whose answers "
                                   "all got the same reward (their group advantages are zero) and sample further "
                                   "prompts in their place, up to `sampling_rounds` rounds a step")
    sampling_rounds: int = Field(3, ge=1, description="dynamic_sampling: generation rounds a step may take, the "
                                 "first included")
    overlong_filtering: bool = Field(False, description="DAPO's overlong filtering: answers cut off at "
                                     "max_new_tokens count in their group's baseline but are left out of the update")
    value_loss: str = Field("clipped_value", description="registered value loss of the critic (family `value`)")
    value_loss_options: dict[str, Any] = Field({}, description="options of the value loss beyond `value_clip`")
    critic_lr: float = Field(1e-5, gt=0, description="critic learning rate (ppo)")
    rewards: list[RewardTerm] = Field([RewardTerm(name="exact_match")], description="rewards summed with weights")
    reward_model: str | None = Field(None, description="a model named by an earlier stage (`reward_model`) or a "
                                     "path; scores answers as the reward term named `reward_model`")
    environment: EnvironmentSettings | None = Field(None, description="a multi-turn environment: episodes "
                                                    "alternate model turns and its observations (docs/rl.md)")
    eval_every: int = Field(5, ge=1, description="steps between held-out evaluations (greedy)")
    eval_prompts: int = Field(64, ge=1, description="held-out prompts evaluated (at most)")
    eval_fraction: float | None = Field(None, ge=0, lt=1, description="share of the prompts held out for the "
                                        "evaluations (null: `data.eval_fraction`)")
    logits: LogitsMode = "auto"
    sync_bucket_mb: int = Field(256, ge=1, description="weight-sync bucket size")
    lr: float = Field(1e-6, gt=0, description="policy learning rate")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="1.0: constant after warmup (RL's usual schedule)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    grad_accum: int = Field(4, ge=1, description="packed micro-batches per optimizer step per rank")
    max_tokens_per_micro_batch: int = Field(4096, ge=8, description="packing budget of one row")
    # `async:` is the spelling in the docs; `async` is a Python keyword, so the field is named
    # async_rollout and takes both keys.
    async_rollout: AsyncRollout | None = Field(None, alias="async", description="asynchronous RL (key `async` or "
                                               "`async_rollout`): the engines generate up to max_staleness steps' "
                                               "answers ahead while the trainers train (needs the engines beside "
                                               "the trainer, not resources.colocate)")

    _needs_critic: bool | None = PrivateAttr(None)

    def check_plugins(self, plugins, where: str) -> None:
        """With the rest of the config: the advantage estimator exists, takes its options and fits
        ``num_generations``, as dynamic sampling must (the reward terms check themselves:
        ``RewardTerm.check_plugins``)."""
        estimator = stage_estimator(plugins, self, where)
        if self.num_generations < estimator.min_group_size:
            raise ConfigError(f"{where}.num_generations", f"advantage {self.advantage!r} compares answers to the "
                              f"same prompt: needs at least {estimator.min_group_size}")
        if self.dynamic_sampling and self.num_generations < 2:
            raise ConfigError(f"{where}.dynamic_sampling", "compares the rewards of the answers to one prompt: "
                              "needs num_generations of at least 2")
        self._needs_critic = estimator.needs_critic

    @property
    def max_answer_tokens(self) -> int:
        """The longest answer an episode can have after its prompt: ``max_new_tokens``, or with an
        environment its whole exchange, the model's turns and the observations
        (``environment.max_total_tokens``)."""
        return self.environment.max_total_tokens if self.environment is not None else self.max_new_tokens

    @property
    def needs_critic(self) -> bool:
        """Whether the advantage estimator reads a critic's values (``gae``): the stage then starts a
        critic, trains it with ``value_loss`` and plans its memory."""
        if self._needs_critic is None:  # a config built outside a run: ask the process's plugins
            from rayalign.plugins import get_plugin_manager

            registry = get_plugin_manager().advantage_estimators
            self._needs_critic = registry.get(self.advantage, where="advantage").needs_critic
        return self._needs_critic


class PPOConfig(RLConfig):
    pass


class GRPOConfig(RLConfig):
    num_generations: int = Field(4, ge=2, description="answers sampled per prompt (a group)")
    advantage: str = Field("grpo", description="grpo or rloo (group baselines, no critic), gae, or a plugin's "
                           "estimator")
    kl_coef: float = Field(0.04, ge=0, description="weight of the k3 KL to the reference in the loss (0: none)")
    kl_in: Literal["reward", "loss"] = "loss"
