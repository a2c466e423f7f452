"""Multi-turn episodes: the model's turns and an environment's observations, token in, token out.

For a batch of prompts, ``EpisodeRunner.run`` loops: the engines generate the next turn of every
live episode (token ids in, token ids out), each episode's environment answers it
(``rayalign.environments``), and the observation's tokens are appended after the sampled ones,
until the environment says ``done`` or a limit ends the episode. The episode's token sequence is
exactly what the engines were given and sampled: the trainer trains the sampled ids, never a
re-tokenization of the conversation (a chat template need not be append-only: one that strips
earlier turns' reasoning would otherwise change what was sampled). An observation is tokenized
once, as its own segment (``ObservationTokens``). The loss mask covers the sampled tokens only,
and the sampler's log-probs are kept for them.

Each episode records its ``end_reason``: ``done``, ``max_turns``, ``max_tokens``, ``timeout``
(its wall time), ``env_timeout`` (one environment call took longer than ``timeout_s``), or
``env_error: <exception>``. An environment that raises or times out ends that episode only; the
episode keeps the turns it has, and is scored like any other (plus the environment's reward
contributions so far): never a silent zero. Rule rewards read its last turn; a reward model reads
the whole exchange after the prompt. The step counts
them (``env/errors``, ``env/timeouts``, ``env/end/<reason>``).
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from rayalign.data.chat import render_chat
from rayalign.environments import Environment, Observation
from rayalign.rollout.sharding import generate_sharded
from rayalign.rollout.vllm_engine import Completion, Sampling
from rayalign_rl.episodes import Episode

ENV_REWARD = "environment"  # the reward term holding an episode's summed environment rewards
ACTOR_START_S = 60.0  # a stateful environment's first call (reset) may also wait this long for its actor
END_REASONS = ("done", "max_turns", "max_tokens", "timeout", "env_timeout", "env_error")


class ObservationTokens:
    """Token ids of one observation message, rendered alone by the chat template.

    The segment is what rendering ``[user, assistant, message]`` with the generation prompt adds to
    rendering ``[user, assistant]``; ``bridge`` adds the end of the template's assistant turn that
    the sampled turn lacks (e.g. the newline after Qwen's ``<|im_end|>``, which the model stops on)."""

    _BASE = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.before = render_chat(tokenizer, self._BASE, add_generation_prompt=False)
        opened = render_chat(tokenizer, self._BASE[:1], add_generation_prompt=True) + \
            tokenizer("A", add_special_tokens=False)["input_ids"]
        self.close = self.before[len(opened):] if self.before[: len(opened)] == opened else []

    def __call__(self, message: dict) -> list[int]:
        after = render_chat(self.tokenizer, self._BASE + [message], add_generation_prompt=True)
        if after[: len(self.before)] != self.before:
            raise ValueError(f"the chat template does not render a {message['role']!r} message after an assistant "
                             "turn as tokens appended to it: return Observation(token_ids=...) instead")
        return after[len(self.before):]

    def bridge(self, turn_ids: list[int]) -> list[int]:
        for k in range(len(self.close), 0, -1):
            if list(turn_ids[-k:]) == self.close[:k]:
                return self.close[k:]
        return list(self.close)


class EnvironmentActor:
    """A thin Ray actor around one episode's environment (``Environment.stateful``)."""

    def __init__(self, cls: type[Environment], config):
        self.env = cls(config)

    def call(self, method: str, *args):
        return getattr(self.env, method)(*args)


@dataclass
class _Failed:
    reason: str  # "env_timeout" or "env_error: ..."


class _Calls:
    """Environment calls for a batch of episodes at once, each bounded by ``timeout_s``: in a
    thread pool on the driver, or in one Ray actor per episode when the environment is stateful.
    A call past its time is abandoned (an actor is killed; a thread is left to finish alone)."""

    def __init__(self, cls: type[Environment], config, timeout_s: float):
        self.cls, self.config, self.timeout_s = cls, config, timeout_s
        self.pool = None if cls.stateful else concurrent.futures.ThreadPoolExecutor(16, "rayalign-env")

    def open(self):
        if not self.cls.stateful:
            return self.cls(self.config)
        import ray

        return ray.remote(EnvironmentActor).options(**self.cls.actor_options).remote(self.cls, self.config)

    def submit(self, handles: list, method: str, args: list[tuple]) -> list:
        if self.pool is not None:
            return [self.pool.submit(getattr(h, method), *a) for h, a in zip(handles, args)]
        return [h.call.remote(method, *a) for h, a in zip(handles, args)]

    def collect(self, handles: list, pending: list, starting: bool = False) -> list:
        """Each call's result, or ``_Failed``; ``starting``: the first calls, which also wait for
        the actors to start."""
        out: list = []
        timeout_s = self.timeout_s + (ACTOR_START_S if starting and self.pool is None else 0.0)
        if self.pool is not None:
            concurrent.futures.wait(pending, timeout=timeout_s)
            for f in pending:
                if not f.done():
                    f.cancel()
                    out.append(_Failed("env_timeout"))
                elif f.exception() is not None:
                    out.append(_Failed(f"env_error: {f.exception()!r}"))
                else:
                    out.append(f.result())
            return out
        import ray

        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
        ready = set(ready)
        for h, ref in zip(handles, pending):
            if ref not in ready:
                ray.kill(h)
                out.append(_Failed("env_timeout"))
                continue
            try:
                out.append(ray.get(ref))
            except Exception as exc:  # a RayTaskError: the environment's own exception is its cause
                out.append(_Failed(f"env_error: {getattr(exc, 'cause', None) or exc!r}"))
        return out

    def close(self, handles: list) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            return
        import ray

        for h in handles:
            ray.kill(h)


@dataclass
class _Live:
    """One episode while it runs."""

    prompt_index: int
    messages: list[dict]
    prompt_ids: list[int]
    start: int = 0  # where the episode's own messages begin in ``messages``
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    versions: set = field(default_factory=set)
    turns: int = 0
    env_reward: float = 0.0
    info: dict[str, float] = field(default_factory=dict)
    end_reason: str | None = None
    finish_reason: str = "stop"
    last_text: str = ""
    last_ids: list[int] = field(default_factory=list)


class EpisodeRunner:
    """Runs multi-turn episodes with ``generate(prompt ids, sampling) -> completions per prompt``."""

    def __init__(self, cls: type[Environment], settings, tokenizer,
                 generate: Callable[[list[list[int]], Sampling], list[list[Completion]]]):
        self.cls, self.settings, self.tokenizer, self.generate = cls, settings, tokenizer, generate
        self.config = cls.Config.model_validate(settings.options)
        self.observation_tokens = ObservationTokens(tokenizer)
        self.records: list[dict] = []  # per finished episode, until ``take_metrics``

    def run(self, prompts: list, sampling: Sampling, version: int | None = None,
            record: bool = True) -> tuple[list[Episode], int]:
        """``sampling.n`` episodes per prompt (``prompts``: objects with ``messages`` and ``ids``),
        prompt-major, and how many were dropped as stale (a turn sampled under weights other than
        ``version``; a prompt keeps its episodes only if all are current)."""
        s, clock = self.settings, time.monotonic()
        lives = [_Live(i, list(p.messages), list(p.ids), len(p.messages)) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        calls = _Calls(self.cls, self.config, s.timeout_s)
        handles: list = []
        try:
            handles = [calls.open() for _ in lives]
            resets = calls.submit(handles, "reset", [(list(lv.messages),) for lv in lives])
            first = replace(sampling, max_tokens=min(sampling.max_tokens, s.max_total_tokens))
            turn = [c for cs in self.generate([p.ids for p in prompts], first) for c in cs]
            for lv, out in zip(lives, calls.collect(handles, resets, starting=True)):
                if isinstance(out, _Failed):
                    lv.end_reason = out.reason
            active = list(zip(lives, handles))
            for k in range(1, s.max_turns + 1):
                self._add_turns([lv for lv, _ in active], turn)
                stepping = [(lv, h) for lv, h in active if lv.end_reason is None]
                outs = calls.collect([h for _, h in stepping], calls.submit(
                    [h for _, h in stepping], "step",
                    [(list(lv.messages), lv.last_text, list(lv.last_ids)) for lv, _ in stepping]))
                active = [(lv, h) for (lv, h), out in zip(stepping, outs) if self._answer(lv, out, clock)]
                if not active:
                    break
                room = max(s.max_total_tokens - len(lv.ids) for lv, _ in active)
                later = replace(sampling, n=1, max_tokens=min(sampling.max_tokens, room),
                                seed=None if sampling.seed is None else sampling.seed + k)
                turn = [cs[0] for cs in self.generate([lv.prompt_ids + lv.ids for lv, _ in active], later)]
            for lv, _ in active:  # only when max_turns ended the loop with episodes still going
                lv.end_reason = lv.end_reason or "max_turns"
        finally:
            calls.close(handles)
        return self._episodes(lives, sampling.n, version, record)

    def _add_turns(self, lives: list[_Live], completions: list[Completion]) -> None:
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        for lv, c, text in zip(lives, completions, texts):
            ids = list(c.token_ids)[: max(0, self.settings.max_total_tokens - len(lv.ids))]
            logps = list(c.logprobs)[: len(ids)] if c.logprobs is not None else [0.0] * len(ids)
            if len(ids) < len(c.token_ids):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
            lv.ids += ids
            lv.mask += [True] * len(ids)
            lv.logps += logps
            lv.versions.add(c.weights_version)
            lv.turns += 1
            lv.finish_reason = c.finish_reason if len(ids) == len(c.token_ids) else "length"
            lv.last_text, lv.last_ids = text, ids
            lv.messages.append({"role": "assistant", "content": text})

    def _answer(self, lv: _Live, out: Observation | _Failed, clock: float) -> bool:
        """Take the environment's answer to ``lv``'s last turn; whether the episode goes on."""
        s = self.settings
        if isinstance(out, _Failed):
            lv.end_reason = out.reason
            return False
        lv.env_reward += float(out.reward)
        for key, value in out.info.items():
            if isinstance(value, (int, float)):
                lv.info[key] = lv.info.get(key, 0.0) + float(value)
        if out.done:
            lv.end_reason = "done"
        elif lv.turns >= s.max_turns:
            lv.end_reason = "max_turns"
        elif time.monotonic() - clock > s.max_episode_s:
            lv.end_reason = "timeout"
        if lv.end_reason is not None:
            return False
        try:
            if out.token_ids is not None:
                obs = [int(t) for t in out.token_ids]
            else:
                obs = self.observation_tokens.bridge(lv.last_ids) + self.observation_tokens(
                    {"role": out.role, "content": out.text or ""})
        except Exception as exc:
            lv.end_reason = f"env_error: {exc!r}"
            return False
        if len(lv.ids) + len(obs) >= s.max_total_tokens:  # no room left for a model token after it
            lv.end_reason = "max_tokens"
            return False
        lv.ids += obs
        lv.mask += [False] * len(obs)
        text = out.text if out.text is not None else self.tokenizer.decode(obs, skip_special_tokens=True)
        lv.messages.append({"role": out.role, "content": text})
        return True

    def _episodes(self, lives: list[_Live], n: int, version: int | None, record: bool) -> tuple[list[Episode], int]:
        episodes, stale = [], 0
        for start in range(0, len(lives), n):
            group = lives[start : start + n]
            if version is not None and any(lv.versions != {version} for lv in group):
                stale += len(group)
                continue
            for lv in group:  # whole groups, an episode without a model token too (group baselines)
                reason = lv.end_reason or "max_turns"
                info = {"end_reason": reason, "turns": lv.turns, "env_reward": lv.env_reward,
                        "model_tokens": len(lv.logps), "observation_tokens": len(lv.ids) - len(lv.logps),
                        "info": dict(lv.info), "transcript": lv.messages[lv.start:]}
                e = Episode(lv.prompt_index, lv.prompt_ids, lv.ids, lv.last_text,
                            "length" if reason == "max_tokens" else lv.finish_reason,
                            min(lv.versions) if lv.versions else 0, np.asarray(lv.logps, dtype=np.float32),
                            loss_mask=np.asarray(lv.mask, dtype=bool), info=info)
                e.reward_terms[ENV_REWARD] = lv.env_reward
                episodes.append(e)
                if record:
                    self.records.append(info)
        return episodes, stale

    def take_metrics(self) -> dict[str, float]:
        """The ``env/`` metrics of the episodes run since the last call."""
        records, self.records = self.records, []
        return summarize(records)


def summarize(records: list[dict]) -> dict[str, float]:
    """``env/`` metrics of finished episodes (their ``Episode.info``): turns, multi-turn rate, end
    reasons, each ``info`` key's mean; none for no episodes."""
    if not records:
        return {}
    reasons = [r["end_reason"].split(":")[0] for r in records]
    m = {"env/episodes": float(len(records)),
         "env/turns": float(np.mean([r["turns"] for r in records])),
         "env/multi_turn_rate": float(np.mean([r["turns"] > 1 for r in records])),
         "env/reward": float(np.mean([r["env_reward"] for r in records])),
         "env/observation_tokens": float(np.mean([r["observation_tokens"] for r in records])),
         "env/errors": float(reasons.count("env_error")),
         "env/timeouts": float(reasons.count("env_timeout"))}
    for reason in END_REASONS:
        m[f"env/end/{reason}"] = float(reasons.count(reason))
    for key in sorted({k for r in records for k in r["info"]}):
        m[f"env/info/{key}"] = float(np.mean([r["info"].get(key, 0.0) for r in records]))
    return m


def runner(loop) -> EpisodeRunner:
    """The loop's episode runner (made on first use), generating with its rollout engines."""
    if getattr(loop, "_episode_runner", None) is None:
        settings = loop.cfg.environment
        cls = loop.ctx.plugins.environments.get(settings.name, where=f"stages[{loop.ctx.index}].{loop.ctx.name}"
                                                ".environment.name")
        loop._episode_runner = EpisodeRunner(
            cls, settings, loop.tokenizer,
            lambda ids, sampling: generate_sharded(loop.engines, ids, sampling, loop.timeouts.step_s))
    return loop._episode_runner


def take_metrics(loop) -> dict[str, Any]:
    """The step's ``env/`` metrics; none without an environment."""
    return runner(loop).take_metrics() if loop.cfg.environment is not None else {}
