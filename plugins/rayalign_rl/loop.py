"""The driver of online RL: generate -> score -> update -> sync, once per step.

Actor groups (each its own resources, or sharing the trainer's GPUs when ``colocate``):

* ``rollout``: vLLM engines; they sample with the policy's latest synced weights;
* ``trainer``: the policy (DeepSpeed), which also recomputes the sampled tokens' log-probs;
* ``critic``: the value model (PPO with gae only);
* ``reference``: the frozen input model, for the KL term (only when ``kl_coef > 0``);
* ``reward``: a reward model (only when one is configured); rule rewards run on the driver.

One step: sample ``num_generations`` answers for each of ``prompts_per_step`` prompts; score
them while the reference and old log-probs (and values) are computed on packed rows (the actor
groups work at once); turn rewards into advantages; run ``ppo_epochs`` passes of clipped updates; push the new weights to the engines
with a version. Engines stamp completions with the version they sampled under, and any answer
from an older version is counted as stale and dropped. On shared GPUs, ``colocation.Colocation``
decides who holds the memory in each phase (and reads each phase's peak on CUDA).

DAPO's two stage options change the step: ``dynamic_sampling`` scores the rewards while
generating, to replace prompts whose answers all got the same reward (``sample_informative``);
``overlong_filtering`` leaves answers cut off at ``max_new_tokens`` out of the update
(``without_truncated``). Each step's metrics count what they dropped.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import ray

from rayalign import telemetry
from rayalign.cluster.worker_group import Placement, WorkerGroup
from rayalign.colocated_memory import ColocatedPlan
from rayalign.data.jsonl import write_jsonl
from rayalign.rollout.sharding import generate_sharded, round_robin
from rayalign.rollout.vllm_engine import Sampling, engine_config
from rayalign.rollout.weight_sync import WeightSync
from rayalign.stage import StageContext
from rayalign.training.checkpoint import CheckpointStore, TrainingState
from rayalign.training.loop import start_trainers, to_numpy, train_step
from rayalign.training.progress import Progress
from rayalign.workers.reference import ReferenceWorker
from rayalign.workers.reward import RewardWorker
from rayalign.workers.rollout import RolloutWorker
from rayalign_rl import advantages as adv
from rayalign_rl import multiturn
from rayalign_rl.async_rollout import Prefetch, prefetch_for
from rayalign_rl.colocation import STARTUP_SLEEP_LEVEL, Colocation
from rayalign_rl.config import RLConfig
from rayalign_rl.episodes import Episode, PackedRow, current_episodes, gather, informative_groups, pack, scatter
from rayalign_rl.losses import rl_losses
from rayalign_rl.objectives import PolicyForward, PolicyObjective, TokenLogps, ValueObjective, token_values


@dataclass
class Prompt:
    messages: list[dict]
    reference: str | None
    ids: list[int]

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class RewardFn:
    name: str
    weight: float
    fn: object  # a rule reward; None for the reward model
    options: dict


_shards = round_robin  # the rollout engines' sharding, for the reward-model and log-prob passes too


class RLLoop:
    prefetch: Prefetch | None = None  # async_rollout: the batches generated ahead

    def __init__(self, ctx: StageContext, cfg: RLConfig, placement: dict[str, Placement],
                 train: list[Prompt], held_out: list[Prompt], rewards: list[RewardFn], reward_model: str | None,
                 plan: ColocatedPlan | None = None):
        self.ctx, self.cfg, self.train, self.held_out, self.rewards = ctx, cfg, train, held_out, rewards
        self.start_memory: dict[str, float] = {}
        self.timeouts = ctx.run.timeouts
        self.colocated = ctx.run.resources.colocated
        self.plan = plan  # the colocated memory plan (None: not colocated, or GPU memory unknown)
        self.groups: list[WorkerGroup] = []
        # The rollout log sits beside the checkpoints, which survive restarts and resumes (the
        # work dir does not survive a resume); each checkpoint records how much of it is final.
        self.rollouts_path = ctx.checkpoint_dir / "rollouts.jsonl"
        try:
            self._start(placement, reward_model)
        except BaseException:
            self.shutdown()  # the groups that did start
            raise

    def _start(self, placement: dict[str, Placement], reward_model: str | None) -> None:
        from transformers import AutoTokenizer

        ctx, cfg = self.ctx, self.cfg
        model = ctx.artifacts.model
        # Answers come back as token ids; their text (for rewards and the rollout log) is decoded
        # here in one batch, as TRL does, instead of token by token inside the engines.
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        # Without a plan (GPU memory unknown) colocated engines sleep: the safe choice.
        self.sleep_level = (self.plan.sleep_level if self.plan is not None else 2) if self.colocated else 0
        engine = engine_config(ctx.run.resources.rollout, model, ctx.run.seed, enable_sleep_mode=self.colocated,
                               enforce_eager=None if self.plan is None else not self.plan.cuda_graphs)
        # Engines first: on a shared GPU vLLM sizes its KV cache from the memory free at start.
        self.engines = self._group("rollout", RolloutWorker, placement, lambda r, t: (engine, t))
        self.engines.run(lambda a, r: a.ping.remote(), self.timeouts.worker_start_s)
        if self.colocated:
            self.engines.run(lambda a, r: a.sleep.remote(STARTUP_SLEEP_LEVEL), self.timeouts.step_s)
        ga, n = cfg.grad_accum, len(placement["trainer"].bundles)
        tokens = cfg.prompts_per_step * cfg.num_generations * (cfg.max_answer_tokens + 64)
        opt_steps = cfg.steps * cfg.ppo_epochs * max(1, -(-tokens // cfg.max_tokens_per_micro_batch) // (n * ga))
        loss, value_loss = rl_losses(ctx.plugins.losses, cfg, f"stages[{ctx.index}].{ctx.name}")
        self.policy_objective = PolicyObjective(loss, kl_in_loss=cfg.kl_in == "loss" and cfg.kl_coef > 0,
                                                temperature=cfg.temperature, logits=cfg.logits)
        self.policy = start_trainers(ctx, placement["trainer"], cfg.spec(model, opt_steps, ctx.run.seed),
                                     self.policy_objective)
        self.groups.append(self.policy)
        self.critic = None
        if cfg.needs_critic:
            # The critic starts from the reward model when there is one (it already reads answers
            # for quality), else from the policy with a fresh value head.
            spec = cfg.spec(reward_model or model, opt_steps, ctx.run.seed, head="score")
            spec.lr = cfg.critic_lr
            self.value_objective = ValueObjective(value_loss)
            self.critic = start_trainers(ctx, placement["critic"], spec, self.value_objective, role="critic")
            self.groups.append(self.critic)
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = self._group("reference", ReferenceWorker, placement, lambda r, t: (model, t))
        self.reward_model = None
        if reward_model is not None:
            self.reward_model = self._group("reward", RewardWorker, placement,
                                            lambda r, t: (reward_model, 4096, cfg.max_tokens_per_micro_batch, t))
        self.sync = WeightSync(self.policy, self.engines, self.timeouts.sync_s, cfg.sync_bucket_mb << 20,
                               ctx.run.resources.weight_sync_transport)
        roles = {"rollout": self.engines, "trainer": self.policy, "critic": self.critic,
                 "reference": self.reference, "reward": self.reward_model}
        self.prefetch = prefetch_for(self)
        self.gpu = Colocation(
            self.engines, [g for g in (self.policy, self.critic) if g is not None],
            [g for g in (self.reference, self.reward_model) if g is not None], self.sync, self.timeouts.step_s,
            colocated=self.colocated, offload_optimizer=self.plan is not None and self.plan.offload_optimizer,
            sleep_level=self.sleep_level,
            gpu_roles={role: g for role, g in roles.items() if g is not None and placement[role].num_gpus > 0})

    def _group(self, role: str, cls, placement: dict[str, Placement], args) -> WorkerGroup:
        p = placement[role]
        threads = max(1, int(p.num_cpus))
        group = WorkerGroup(f"{self.ctx.actor_prefix}/{role}", cls, p, lambda r: args(r, threads))
        self.groups.append(group)
        return group

    # -- one step --------------------------------------------------------------------------------

    def step_prompts(self, step: int) -> list[Prompt]:
        """The prompts of ``step``: consecutive slices of one seeded order per pass over the data."""
        per = self.cfg.prompts_per_step
        start = step * per
        out = []
        for k in range(start, start + per):
            epoch, i = divmod(k, len(self.train))
            order = list(range(len(self.train)))
            random.Random(self.ctx.run.seed * 7919 + epoch).shuffle(order)
            out.append(self.train[order[i]])
        return out

    def sampling(self, step: int) -> Sampling:
        """How ``step``'s answers are sampled; the seed follows from the step, so a resumed run
        samples the same answers again."""
        cfg = self.cfg
        return Sampling(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                        max_tokens=cfg.max_new_tokens, seed=self.ctx.run.seed * 100003 + step, logprobs=True,
                        detokenize=False)

    def sample(self, prompts: list[Prompt], sampling: Sampling) -> tuple[list[Episode], int]:
        """Episodes sampled under the current weights, and how many stale answers were dropped.
        A prompt keeps its answers only if all are current (group baselines need whole groups).
        With an ``environment``, each episode is a multi-turn exchange (``multiturn``)."""
        if self.cfg.environment is not None:
            return multiturn.runner(self).run(prompts, sampling, self.sync.version)
        grouped = generate_sharded(self.engines, [p.ids for p in prompts], sampling, self.timeouts.step_s)
        episodes, stale = current_episodes([p.ids for p in prompts], grouped, self.sync.version)
        self.decode(episodes)
        return episodes, stale

    def sample_informative(self, step: int) -> tuple[list[Prompt], list[Episode], int, dict]:
        """DAPO's dynamic sampling (Yu et al. 2025): sample and score ``step``'s prompts, drop each
        prompt whose answers all got the same reward (``informative_groups``), and sample further
        prompts until ``prompts_per_step`` prompts with differing rewards are in, or
        ``sampling_rounds`` rounds are done; the last round's surplus is left unused.

        Round r draws the prompts and sampling seed of step ``step + r * steps``, a part of the
        seeded prompt order that no step of the run trains on: a step's prompts still follow from its
        number, so a resumed run samples the same ones. Returns the prompts, the rewarded episodes of
        the prompts kept, the stale answers, and the step's ``dynamic_sampling/`` metrics: prompts
        dropped for equal rewards, and rounds taken."""
        cfg = self.cfg
        prompts, episodes, stale, dropped = [], [], 0, 0
        for rounds in range(1, cfg.sampling_rounds + 1):
            source = step + (rounds - 1) * cfg.steps
            batch = self.step_prompts(source)
            sampled, sampled_stale = self.sample(batch, self.sampling(source))
            self.score(batch, sampled)
            kept, equal = informative_groups(sampled)
            for e in kept:
                e.prompt_index += len(prompts)  # into this step's whole list of prompts
            prompts, episodes = prompts + batch, episodes + kept
            stale, dropped = stale + sampled_stale, dropped + equal
            if len({e.prompt_index for e in episodes}) >= cfg.prompts_per_step:
                break
        if not episodes:
            raise RuntimeError(f"step {step}: no prompt's answers got different rewards in {rounds} sampling "
                               "round(s) of dynamic_sampling (or every answer was stale or empty)")
        keep = set(sorted({e.prompt_index for e in episodes})[: cfg.prompts_per_step])
        return prompts, [e for e in episodes if e.prompt_index in keep], stale, {
            "dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/rounds": float(rounds)}

    def decode(self, episodes: list[Episode]) -> None:
        """Each answer's text without special tokens (what TRL's GRPO scores too), for answers the
        engines returned as token ids only."""
        todo = [e for e in episodes if e.text is None]
        for e, text in zip(todo, self.tokenizer.batch_decode([e.completion_ids for e in todo], skip_special_tokens=True)):
            e.text = text

    def score(self, prompts: list[Prompt], episodes: list[Episode]) -> None:
        """Every reward term of every episode, and their weighted sum (``episode.reward``)."""
        self.start_rewards(prompts, episodes)()

    def start_rewards(self, prompts: list[Prompt], episodes: list[Episode]) -> Callable[[], None]:
        """Put the reward model to work on the episodes and return ``finish()``, which runs the rule
        rewards on the driver, waits for the model's scores and sets every term and the weighted
        sum (``episode.reward``). What the caller starts in between overlaps with the scoring."""
        in_flight = None
        if any(term.fn is None for term in self.rewards):
            # A multi-turn episode is judged on its whole exchange (tool calls and results too).
            convs = [prompts[e.prompt_index].messages + e.info.get("transcript", [{"role": "assistant", "content": e.text}])
                     for e in episodes]
            shards = _shards(len(convs), len(self.reward_model))
            in_flight = self.reward_model.submit(lambda a, r: a.score.remote([convs[i] for i in shards[r]]))

        def finish() -> None:
            for term in self.rewards:
                if term.fn is not None:
                    values = [float(term.fn(prompts[e.prompt_index].text, e.text,
                                            reference=prompts[e.prompt_index].reference, **term.options))
                              for e in episodes]
                    for e, v in zip(episodes, values):
                        e.reward_terms[term.name] = v
            if in_flight is not None:
                results = self.reward_model.wait(in_flight, self.timeouts.step_s)
                model_terms = [t.name for t in self.rewards if t.fn is None]
                for shard, scores in zip(shards, results):
                    for i, value in zip(shard, scores):
                        for name in model_terms:
                            episodes[i].reward_terms[name] = value
            for e in episodes:  # plus a multi-turn environment's rewards, when there is one
                e.reward = sum(t.weight * e.reward_terms[t.name] for t in self.rewards) \
                    + e.reward_terms.get(multiturn.ENV_REWARD, 0.0)

        return finish

    def _start_per_episode(self, group: WorkerGroup, rows: list[PackedRow], call, names: list[str]) -> Callable:
        """Start ``call(actor, row ids)`` over the rows sharded across ``group``; the returned
        ``collect(episodes)`` waits and stores the per-token tensors in each episode's ``arrays``
        under ``names``."""
        shards = _shards(len(rows), len(group))
        in_flight = group.submit(lambda a, r: call(a, shards[r]))

        def collect(episodes: list[Episode]) -> None:
            for shard, outputs in zip(shards, group.wait(in_flight, self.timeouts.step_s)):
                for row_id, tensors in zip(shard, outputs):
                    row = rows[row_id]
                    for name, tensor in zip(names, tensors):
                        for e, values in zip(row.episodes, gather(row, tensor)):
                            episodes[e].arrays[name] = values

        return collect

    def advantages(self, prompts: list[Prompt], episodes: list[Episode]) -> None:
        """Per-token advantages (and, for a critic, returns) from the estimator ``advantage:`` names."""
        cfg = self.cfg
        for e in episodes:
            e.arrays["kl"] = (e.arrays["old_logps"] - e.arrays["ref_logps"]) if "ref_logps" in e.arrays \
                else np.zeros(e.num_trained, dtype=np.float32)
        if getattr(self, "estimator", None) is None:  # resolved here, like the losses, through the registry
            self.estimator = adv.stage_estimator(self.ctx.plugins, cfg, f"stages[{self.ctx.index}].{self.ctx.name}")
        batch = adv.AdvantageBatch(
            rewards=[e.reward for e in episodes], kl=[e.arrays["kl"] for e in episodes],
            kl_coef=cfg.kl_coef if cfg.kl_in == "reward" else 0.0, group_size=cfg.num_generations,
            values=[e.arrays["values"] for e in episodes] if self.estimator.needs_critic else None)
        result = self.estimator.estimate(batch)
        for i, e in enumerate(episodes):
            e.arrays["advantages"] = result.advantages[i]
            if result.returns is not None:
                e.arrays["returns"] = result.returns[i]

    def step(self, step: int) -> dict:
        cfg, t, filtered = self.cfg, {}, {}
        clock = time.monotonic()
        if self.prefetch is not None:
            prompts, episodes, stale, filtered = self.prefetch.take(step)
            clock += self.prefetch.seconds["sync"]  # a deferred sync that ran here is the sync phase's
        elif cfg.dynamic_sampling:
            prompts, episodes, stale, filtered = self.sample_informative(step)
        else:
            prompts = self.step_prompts(step)
            episodes, stale = self.sample(prompts, self.sampling(step))
        self.gpu.after_generate()
        t["generate"] = time.monotonic() - clock
        memory = self.gpu.phase_memory("generate")
        if not episodes:
            raise RuntimeError(f"step {step}: every sampled answer was stale or empty")
        # Rewards and log-probs are independent given the episodes: the reward model, the policy,
        # the reference and the critic all work at once while the driver runs the rule rewards.
        clock = time.monotonic()
        self.gpu.before_score()
        # Dynamic sampling has the rewards already: it scored each round to filter it.
        finish_rewards = (lambda: None) if cfg.dynamic_sampling else self.start_rewards(prompts, episodes)
        rows = pack(episodes, cfg.max_tokens_per_micro_batch, self.ctx.run.seed + step)
        data = ray.put([to_numpy(r.batch) for r in rows])
        self.policy.run(lambda a, r: a.load_batches.remote(data), self.timeouts.step_s)
        if self.critic is not None:
            self.critic.run(lambda a, r: a.load_batches.remote(data), self.timeouts.step_s)
        forward, ref_logps = PolicyForward(cfg.temperature, cfg.logits), TokenLogps(cfg.temperature, cfg.logits)
        passes = [self._start_per_episode(self.policy, rows, lambda a, ids: a.compute.remote(forward, ids),
                                          ["old_logps", "entropy", "raw_logps"])]
        if self.reference is not None:
            passes.append(self._start_per_episode(
                self.reference, rows, lambda a, ids: a.score.remote(ref_logps, [rows[i].batch for i in ids]), ["ref_logps"]))
        if self.critic is not None:
            passes.append(self._start_per_episode(self.critic, rows, lambda a, ids: a.compute.remote(token_values, ids),
                                                  ["values"]))
        finish_rewards()
        for collect in passes:
            collect(episodes)
        self.gpu.after_score()
        self.advantages(prompts, episodes)
        if self.prefetch is not None:
            filtered |= self.prefetch.correct(episodes)
        t["score"] = time.monotonic() - clock
        memory |= self.gpu.phase_memory("score")

        if self.prefetch is not None:  # the weights are still a whole version: a deferred sync may run
            self.prefetch.advance()
        clock = time.monotonic()
        if cfg.overlong_filtering:
            rows, trained = self.without_truncated(step, episodes)
            filtered["overlong_filtered"] = float(len(episodes) - len(trained))
        else:
            trained = episodes
        policy_metrics, critic_metrics = self.update(step, rows, trained)
        self.gpu.after_train()
        t["train"] = time.monotonic() - clock
        memory |= self.gpu.phase_memory("train")
        if self.prefetch is not None:  # synced now, earlier in the step, or deferred (async_rollout)
            sync, t["sync"], ahead = self.prefetch.finish_step(step)
            filtered |= ahead
        else:
            clock = time.monotonic()
            sync = self.gpu.sync_weights()
            t["sync"] = time.monotonic() - clock
        memory |= self.gpu.phase_memory("sync")
        self._log_rollouts(step, prompts, episodes)
        return (self.metrics(episodes, stale, t, sync, policy_metrics, critic_metrics) | filtered | memory
                | self.gpu.take_seconds() | multiturn.take_metrics(self))

    def without_truncated(self, step: int, episodes: list[Episode]) -> tuple[list[PackedRow], list[Episode]]:
        """DAPO's overlong filtering: the episodes whose answers ended before ``max_new_tokens``, and
        their rows for the update. A cut-off answer is scored, counts in its group's baseline and in
        the step's metrics, but is left out of the update: its tokens are in no mean, nor is it among
        the answers a per-answer loss averages over (TRL's ``mask_truncated_completions`` still
        counts it as an answer of loss 0 there)."""
        trained = [e for e in episodes if e.finish_reason != "length"]
        if not trained:
            self.ctx.log.warning("[%s] step %d: every answer reached max_new_tokens; overlong_filtering leaves "
                                 "nothing to train on", self.ctx.name, step)
        return pack(trained, self.cfg.max_tokens_per_micro_batch, self.ctx.run.seed + step), trained

    def update(self, step: int, rows: list[PackedRow], episodes: list[Episode]) -> tuple[dict, dict]:
        """``ppo_epochs`` passes of clipped updates over the rows, for the policy (and critic)."""
        cfg = self.cfg
        for row in rows:
            eps = [episodes[i] for i in row.episodes]
            row.batch["old_logps"] = scatter(row, [e.arrays["old_logps"] for e in eps])
            row.batch["advantages"] = scatter(row, [e.arrays["advantages"] for e in eps])
            if self.policy_objective.kl_in_loss:
                row.batch["ref_logps"] = scatter(row, [e.arrays["ref_logps"] for e in eps])
            if self.critic is not None:
                row.batch["old_values"] = scatter(row, [e.arrays["values"] for e in eps])
                row.batch["returns"] = scatter(row, [e.arrays["returns"] for e in eps])
        data = ray.put([to_numpy(r.batch) for r in rows])
        trainers = [(self.policy, self.policy_objective)]
        if self.critic is not None:
            trainers.append((self.critic, self.value_objective))
        out = []
        for group, objective in trainers:
            group.run(lambda a, r: a.load_batches.remote(data), self.timeouts.step_s)
            weights = [objective.weight(r.batch) for r in rows]
            slots = len(group) * cfg.grad_accum
            metrics = []
            for epoch in range(cfg.ppo_epochs):
                order = list(range(len(rows)))
                random.Random(f"{self.ctx.run.seed}-{step}-{epoch}").shuffle(order)
                for k in range(0, len(order), slots):
                    metrics.append(train_step(group, order[k : k + slots], weights, cfg.grad_accum, self.timeouts.step_s))
                    if self.prefetch is not None:  # idle engines may start the next batch (no sync mid-update)
                        self.prefetch.advance(sync=False)
            out.append(_mean(metrics))
        return out[0], (out[1] if len(out) > 1 else {})

    # -- evaluation, metrics, output ---------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        """Greedy answers to the held-out prompts: mean reward and each term's mean (with an
        environment, also its ``env/`` metrics of these episodes)."""
        prompts = self.held_out[: self.cfg.eval_prompts]
        if not prompts:
            return {"step": step}
        greedy = Sampling(n=1, temperature=0.0, max_tokens=self.cfg.max_new_tokens, detokenize=False)
        if self.cfg.environment is not None:
            episodes, _ = multiturn.runner(self).run(prompts, greedy, record=False)
        else:
            grouped = generate_sharded(self.engines, [p.ids for p in prompts], greedy, self.timeouts.step_s)
            episodes = [Episode(i, p.ids, c.token_ids, c.text, c.finish_reason, c.weights_version, np.zeros(0))
                        for i, (p, cs) in enumerate(zip(prompts, grouped)) for c in cs]
        self.decode(episodes)
        self.score(prompts, episodes)
        out = {"step": step, "reward": float(np.mean([e.reward for e in episodes]))}
        for term in self.rewards:
            out[term.name] = float(np.mean([e.reward_terms[term.name] for e in episodes]))
        out["response_length"] = float(np.mean([len(e.completion_ids) for e in episodes]))
        if self.cfg.environment is not None:  # e.g. env/multi_turn_rate: the episodes that called a tool
            out.update(multiturn.summarize([e.info for e in episodes]))
        self.ctx.log.info("[%s] held-out after %d step(s): %s", self.ctx.name, step,
                          " ".join(f"{k}={v:.3f}" for k, v in out.items() if k != "step"))
        return out

    def metrics(self, episodes, stale, t, sync, policy_metrics, critic_metrics) -> dict:
        total = sum(t.values())
        lengths = [len(e.completion_ids) for e in episodes]
        tokens = np.concatenate([e.arrays["raw_logps"] for e in episodes])
        sampled = np.concatenate([e.vllm_logps for e in episodes])
        m = {
            "reward": float(np.mean([e.reward for e in episodes])),
            "reward_std": float(np.std([e.reward for e in episodes])),
            "kl": float(np.mean(np.concatenate([e.arrays["kl"] for e in episodes]))),
            "entropy": float(np.mean(np.concatenate([e.arrays["entropy"] for e in episodes]))),
            "response_length": float(np.mean(lengths)),
            "truncated": float(np.mean([e.finish_reason == "length" for e in episodes])),
            "episodes": float(len(episodes)),
            "stale": float(stale),
            "weights_version": float(sync.version),
            "sync_bytes": float(sync.bytes),
            # The trainer's log-probs of the tokens vLLM sampled, against vLLM's own: the
            # importance ratio old/sampling should be ~1 when the weights really are in sync.
            "sampler_logprob_diff": float(np.abs(tokens - sampled).max()) if sampled.size == tokens.size else float("nan"),
            "sampler_ratio_mean": float(np.mean(np.exp(tokens - sampled))) if sampled.size == tokens.size else float("nan"),
        }
        for term in self.rewards:
            m[f"reward/{term.name}"] = float(np.mean([e.reward_terms[term.name] for e in episodes]))
        for k, v in t.items():
            m[f"time/{k}_s"] = v
            m[f"time/{k}_share"] = v / total if total else 0.0
        m.update({f"policy/{k}": v for k, v in policy_metrics.items() if isinstance(v, float)})
        m.update({f"critic/{k}": v for k, v in critic_metrics.items() if isinstance(v, float)})
        m["count"] = float(sum(lengths))
        telemetry.record_generation(self.ctx.name, int(sum(lengths)), t["generate"])
        return m

    def _log_rollouts(self, step: int, prompts: list[Prompt], episodes: list[Episode]) -> None:
        write_jsonl(self.rollouts_path, ({
            "step": step, "prompt": prompts[e.prompt_index].text, "completion": e.text,
            "reference": prompts[e.prompt_index].reference, "reward": e.reward, "rewards": e.reward_terms,
            "weights_version": e.weights_version, "finish_reason": e.finish_reason,
            **({"environment": e.info} if e.info else {}),
        } for e in episodes), append=True)

    def run(self) -> tuple[list[dict], list[dict]]:
        """Every step from the last checkpoint (or the start); returns (history, evaluations)."""
        rel = self.ctx.run.reliability
        store = CheckpointStore(self.ctx.checkpoint_dir, rel.keep_checkpoints, self.ctx.log)
        self.gpu.wake_all()  # asleep since start-up, while the trainers took their GPU memory
        state = self.restore(store)
        # The peaks of start-up (and of a restore) are no phase's: kept apart, they show what the
        # roles hold before the first step (weights, optimizer states, the engines' pools).
        self.start_memory = self.gpu.phase_memory("start")
        self.gpu.take_seconds()  # nor are its wake and releases: each step reports its own
        if not state.extra:
            state.extra = {"evals": [self.evaluate(0)], "version": 0}
        self._open_rollouts(state.extra.get("rollouts_bytes", 0))
        progress = Progress(self.ctx.name, self.cfg.steps, self.ctx.log)
        while state.step < self.cfg.steps:
            clock = time.monotonic()
            metrics = self.step(state.step)
            metrics["step_wall_s"] = time.monotonic() - clock  # the driver's whole step, phases and all
            state.step += 1
            metrics["step"] = state.step
            state.history.append(metrics)
            # The policy's version, which a restore loads into the engines; with async_rollout the
            # engines may still be behind it (a deferred sync).
            state.extra["version"] = state.step if self.prefetch is not None else self.sync.version
            progress.update(state.step, metrics)
            if state.step % self.cfg.eval_every == 0 or state.step == self.cfg.steps:
                if self.prefetch is not None:  # the evaluation samples the policy being trained
                    self.prefetch.settle()
                state.extra["evals"].append(self.evaluate(state.step))
            if rel.checkpoint_every and state.step % rel.checkpoint_every == 0 and state.step < self.cfg.steps:
                self.checkpoint(store, state)
        return state.history, state.extra["evals"]

    # -- checkpoints: the policy and critic (DeepSpeed, every rank) and the loop's position --------

    def _open_rollouts(self, keep_bytes: int) -> None:
        """Cut the rollout log back to what the steps up to the restored checkpoint wrote: the steps
        after it are redone and log themselves again."""
        self.rollouts_path.parent.mkdir(parents=True, exist_ok=True)
        self.rollouts_path.touch()
        size = self.rollouts_path.stat().st_size
        if size < keep_bytes:
            self.ctx.log.warning("[%s] %s holds %d bytes, the checkpoint expected %d: earlier rollouts are "
                                 "missing from it", self.ctx.name, self.rollouts_path, size, keep_bytes)
        os.truncate(self.rollouts_path, min(size, keep_bytes))

    def finish_rollouts(self, path) -> None:
        """Move the complete rollout log into the stage's output (the checkpoints are removed next)."""
        self.rollouts_path.replace(path)

    def checkpoint(self, store: CheckpointStore, state: TrainingState) -> None:
        state.extra["rollouts_bytes"] = self.rollouts_path.stat().st_size
        tmp = store.begin(state.step)
        with self.gpu.states_on_gpu():
            for name, group in (("policy", self.policy), ("critic", self.critic)):
                if group is not None:
                    group.run(lambda a, r: a.save_checkpoint.remote(str(tmp / name)), self.timeouts.step_s)
        self.ctx.log.info("[%s] checkpoint %s", self.ctx.name, store.commit(tmp, state).name)

    def restore(self, store: CheckpointStore) -> TrainingState:
        """Back to the newest valid checkpoint after a restart or resume: trainers reloaded, and the
        engines given the checkpoint's weights under its version. The prompts and sampling seeds
        of a step follow from its number, so the steps after it are the ones a whole run takes."""
        latest = store.latest()
        if latest is None:
            return TrainingState()
        path, state = latest
        for name, group in (("policy", self.policy), ("critic", self.critic)):
            if group is not None:
                group.run(lambda a, r: a.load_checkpoint.remote(str(path / name), 1.0), self.timeouts.step_s)
        self.sync.version = state.extra["version"] - 1
        self.gpu.sync_weights()
        self.ctx.log.info("[%s] resumed from %s (step %d of %d, weights version %d)", self.ctx.name, path.name,
                          state.step, self.cfg.steps, self.sync.version)
        return state

    def save(self, path: str) -> None:
        self.policy.run(lambda a, r: a.save.remote(path), self.timeouts.step_s)

    def shutdown(self) -> None:
        for group in reversed(self.groups):
            group.shutdown()


def _mean(metrics: list[dict]) -> dict:
    keys = {k for m in metrics for k, v in m.items() if isinstance(v, float)}
    return {k: float(np.nanmean([m[k] for m in metrics if k in m])) for k in keys}
