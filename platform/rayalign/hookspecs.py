"""The plugin contract: every extension point of rayalign is one hook here.

Built-in stages, losses, data formats and metrics are ordinary plugins that implement these
hooks, loaded through the same ``rayalign`` entry-point group as third-party packages.

Each hook receives a ``register`` callback (the pattern of Simon Willison's ``llm``) instead of
returning a list, so a plugin registers as many things as it likes and a mistake points at the
line that made it.

Bump ``HOOKSPEC_VERSION`` when a hook's signature or meaning changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from rayalign.data.filters import Filter
    from rayalign.data.formats import DataFormat
    from rayalign.environments import Environment
    from rayalign.evaluation.detectors import Detector
    from rayalign.metrics import Metric
    from rayalign.stage import Stage
    from rayalign.tracking import Tracker
    from rayalign.training.advantages import AdvantageEstimator
    from rayalign.training.losses import Loss

PROJECT = "rayalign"
HOOKSPEC_VERSION = "1.6"  # 1.1: register_detectors; 1.2: register_filters; 1.3: register_trackers;
# 1.4: a loss declares its family and typed options; 1.5: rewards and metrics declare their options
# (checked before any work), register_advantage_estimators; 1.6: register_environments (multi-turn RL)

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_stages(register: Callable[[type["Stage"]], None]) -> None:
    """Register pipeline stages.

    Call ``register(StageClass)`` once per stage. ``StageClass.name`` is the name recipes use
    (``stages: [{sft: {...}}]``) and ``StageClass.Config`` is its pydantic config schema, which is
    validated before any worker starts.

    Example::

        @hookimpl
        def register_stages(register):
            register(MyStage)
    """


@hookspec
def register_losses(register: Callable[[type["Loss"]], None]) -> None:
    """Register training losses.

    Call ``register(LossClass)``, a subclass of ``rayalign.training.losses.Loss``;
    ``LossClass.name`` is what a stage's loss key names (``sft``, ``sigmoid``, ``ipo``...).
    ``family`` (``sft``, ``preference``, ``unpaired``, ``reward``, ``policy``, ``value``,
    ``token_penalty``) says which stages take it and what ``forward`` receives; the typed keyword
    arguments of ``__init__`` are its options, checked before any work; ``needs_reference = False``
    marks a reference-free preference loss, ``chosen_nll_tokens`` one that also takes the chosen
    answers' NLL. ``forward`` returns the scalar loss and a dict of 0-d tensor metrics, left on the
    device.
    """


@hookspec
def register_rewards(register: Callable[[str, Callable[..., float]], None]) -> None:
    """Register reward functions.

    Call ``register(name, fn)`` where ``fn(prompt: str, completion: str, reference: str | None = None,
    **options) -> float`` scores one completion against the prompt's reference answer. Its options
    are ``fn.Config``, a ``rayalign.rewards.RewardConfig`` (set with ``@reward_config(...)``), or
    else its named keyword parameters after ``reference``; a key that is neither is refused before
    any work, and ``**kwargs`` takes none. RL stages combine several by name with weights, each with
    its ``options``.
    """


@hookspec
def register_metrics(register: Callable[[type["Metric"]], None]) -> None:
    """Register generation metrics.

    Call ``register(MetricClass)``, a subclass of ``rayalign.metrics.Metric``; ``name`` is the key
    it writes into a stage's ``metrics.json``, ``Config`` its pydantic options schema
    (``metric_options.<name>``, checked before any work, read as ``self.config``), and
    ``compute(prompts, completions, references)`` returns a float.
    """


@hookspec
def register_data_formats(register: Callable[["DataFormat"], None]) -> None:
    """Register dataset formats.

    Call ``register(DataFormat(...))``. A format names the fields a JSONL record must have and
    converts one record into the platform's canonical form (chat ``messages`` for SFT;
    ``prompt``/``chosen``/``rejected`` message lists for preferences). The loader picks the first
    format whose ``matches(record)`` is true and reports the file and line of any record that
    fits none.
    """


@hookspec
def register_detectors(register: Callable[[type["Detector"]], None]) -> None:
    """Register detectors of bad answers (repetition loops, hallucinations, ...).

    Call ``register(DetectorClass)``, a subclass of ``rayalign.evaluation.detectors.Detector``.
    ``name`` is what a stage's ``detectors:`` list names; ``kind`` (``"repetition"`` or
    ``"hallucination"``) says which fix its flags feed; ``Config`` is its pydantic options schema
    (``detector_options.<name>`` in a stage). ``detect(samples, knowledge)`` returns, per sample, a
    ``Finding(rule, details)`` when it flags the sample and ``None`` otherwise. A detector that
    raises stops its stage with an error naming the detector and its plugin.
    """


@hookspec
def register_filters(register: Callable[[type["Filter"]], None]) -> None:
    """Register quality filters for data curation.

    Call ``register(FilterClass)``, a subclass of ``rayalign.data.filters.Filter``. ``name`` is
    what the ``curate`` stage's ``filters:`` list names; ``Config`` is its pydantic options schema
    (``filter_options.<name>``). ``reject(example)`` gets an ``Example`` (``messages``, ``prompt``,
    ``response``, ``record``, ``source``) and returns a short reason to drop it, or ``None`` to
    keep it; the curation report counts drops per filter and reason.
    """


@hookspec
def register_trackers(register: Callable[[type["Tracker"]], None]) -> None:
    """Register experiment trackers (dashboards such as W&B, TensorBoard, MLflow).

    Call ``register(TrackerClass)``, a subclass of ``rayalign.tracking.Tracker``. ``name`` is what
    a run's top-level ``trackers:`` list names; ``Config`` is its pydantic options schema
    (``tracker_options.<name>``); ``requires`` names the module it imports and ``install`` the line
    that installs it, shown before any work when that module is absent. On the driver, once per
    run, ``start(run)`` gets the run's config and the state saved by an earlier attempt (resume);
    then ``log_scalars(metrics, step)`` every training step and stage summary, with one global step
    that only increases, ``log_table(key, rows, step)`` for sample tables, and ``finish(failed)``.
    A tracker that raises is reported once and muted; the run goes on.
    """


@hookspec
def register_advantage_estimators(register: Callable[[type["AdvantageEstimator"]], None]) -> None:
    """Register advantage estimators for the RL stages (``ppo``, ``grpo``).

    Call ``register(EstimatorClass)``, a subclass of
    ``rayalign.training.advantages.AdvantageEstimator`` (or of ``GroupEstimator``, for one that
    compares the answers to one prompt). ``name`` is what a stage's ``advantage:`` key names;
    ``needs_critic`` asks for a critic whose values arrive in the batch (and whose targets
    ``estimate`` returns); ``min_group_size`` is the answers per prompt it needs; ``Config`` is its
    pydantic options schema, fed from the stage settings it declares and ``advantage_options``.
    ``estimate(batch)`` turns an ``AdvantageBatch`` (rewards, per-token KL, group size, values)
    into ``Advantages`` (one value per token of each answer). The name and options are checked
    before any work.
    """


@hookspec
def register_environments(register: Callable[[type["Environment"]], None]) -> None:
    """Register multi-turn environments for the RL stages (``ppo``, ``grpo``).

    Call ``register(EnvironmentClass)``, a subclass of ``rayalign.environments.Environment``.
    ``name`` is what a stage's ``environment.name`` names; ``Config`` is its pydantic options schema
    (``environment.options``, checked before any work). One instance serves one episode:
    ``reset(prompt)`` once, then ``step(conversation, last_turn_text, last_turn_token_ids)`` after
    every model turn, returning an ``Observation`` (the next message as text or token ids, a reward
    contribution, ``done``, ``info``). ``stateful = True`` runs each instance in a Ray actor of its
    own (``actor_options``). An environment that raises or times out ends only its episode, with
    the reason recorded.
    """
