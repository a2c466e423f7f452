"""The per-GPU memory plan of an RL stage whose roles share the trainer's GPUs (``resources.colocate``).

The policy trainer, the critic, the reference and reward models and a vLLM engine sit on the same
GPU and take turns. One RL step has four phases; what each holds on the fullest GPU (rank 0, which
hosts every role) is summed from the training planner (``rayalign.memory``):

* ``generate``: the engine's whole share (``gpu_memory_utilization`` x the GPU's memory, plus its
  CUDA-graph pool) beside what the other processes keep: each trainer's weights, fp32 gradient
  partitions and optimizer states (unless offloaded to host memory), the frozen models' weights,
  and a CUDA context per process;
* ``score``: the engine asleep (see below); the policy, reference, critic and reward model run forward passes
  at once, each on packed rows of ``max_tokens_per_micro_batch`` tokens;
* ``train``: the policy's training peak (weights, gradients, optimizer, activations, logits), then
  the critic's, beside the others' resident memory;
* ``sync``: the engine's weights awake (its KV cache still asleep) and the trainer's exported copy
  of the weights (the CUDA IPC transport maps the whole model at once).

When everything fits beside the engine's whole share (with ``AWAKE_HEADROOM`` to spare), the
engines stay awake (``sleep_level`` 0):
no phase pays for sleeping, waking or returning cached blocks, and each phase holds the engine's
share instead of its asleep remainder. Sleeping is for when they do not fit.

These sums hold only because of what the RL loop does at run time: every colocated process returns
its cached CUDA blocks (``torch.cuda.empty_cache``) before the engines wake, the engines sleep at
level 2 (weights dropped: the sync reloads every weight anyway) and wake in two steps (weights,
load, then KV cache), and the optimizer states go to host memory around generation when the plan
turns that on. Without those, torch's caching allocators keep each process's own peak and vLLM's
wake-up asks for its share on top (the out-of-memory this module exists to prevent).

Levers, tried in this order until the plan fits: the engines sleep while the others work
(``resources.colocate_sleep``: null lets the plan decide), offload the optimizer states while the
engines generate (``resources.colocate_offload_optimizer``: null lets the plan decide), then CUDA
graphs off (``resources.rollout.enforce_eager``: null lets the plan decide; graphs are kept when
anything else fits, as eager decoding is several times slower). What no lever fixes is refused
before any worker starts, in one line naming the phase, its parts and the keys to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rayalign.memory import GiB, Estimate, ModelShape, TrainingPlan, estimate

PHASES = ("generate", "score", "train", "sync")
# A sleeping engine keeps its CUDA context and the buffers vLLM allocates outside its sleep pool.
ENGINE_ASLEEP = 1.0 * GiB
# Each trainer and frozen model's process: its CUDA context and cuBLAS workspaces. Not the trainer
# planner's fitted reserve (memory.CALIBRATION), which also holds a training step's allocator slack.
CUDA_CONTEXT = 1.0 * GiB
# vLLM's CUDA-graph pool: outside the sleep pool (it stays while the engine sleeps) and outside
# gpu_memory_utilization (captured after the KV cache is sized). Typically 0.3-1 GiB.
CUDA_GRAPHS = 1.0 * GiB
# Staying awake is chosen by itself (``resources.colocate_sleep: null``) only with this much room
# over the plan's peak: on one H200 the awake GRPO benchmark peaked at 94.2 GiB on the device where
# its plan said 76.0 (benchmarks/results/h200-20261203-grpo_step-0.5b.json), while its trainer
# alone, measured apart, held what the plan gives it. Until the planner accounts for the rest,
# an awake plan needs this margin; sleeping frees the engine's share whenever a phase does not
# need it.
AWAKE_HEADROOM = 1.3
# A forward pass without gradients (old log-probs, reference log-probs) keeps the bf16 logits of
# the whole row; the log-softmax and entropy run over chunks of positions (rayalign_rl.objectives)
# whose float32 temporaries stay under this.
INFERENCE_LOGITS_BYTES = 2
LOGPROB_CHUNK_TEMPORARIES = 4.0 * GiB


@dataclass(frozen=True)
class ColocatedSetup:
    """What the plan needs to know: the models on one GPU and the settings that size them."""

    policy: ModelShape
    training: TrainingPlan  # the policy's plan; ``gpu_memory_gib`` is the GPU's memory
    engine_fraction: float  # resources.rollout.gpu_memory_utilization
    max_model_len: int
    reference: ModelShape | None = None
    critic: ModelShape | None = None
    reward: ModelShape | None = None
    export_whole_model: bool = True  # CUDA IPC maps every bucket at once; NCCL/object store one at a time
    bucket_bytes: float = 256 * 2**20


@dataclass
class ColocatedPlan:
    setup: ColocatedSetup
    offload_optimizer: bool
    cuda_graphs: bool
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> part -> bytes per GPU
    # 0: the engines stay awake; 2: they sleep while the others work, dropping their weights (every
    # weight sync reloads every weight, so keeping a copy in host memory would be wasted work).
    sleep_level: int = 2

    @property
    def capacity(self) -> float:
        return self.setup.training.gpu_memory_gib * GiB

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    @property
    def kv_cache_bytes(self) -> float:
        return self.setup.engine_fraction * self.capacity - 2 * self.setup.policy.params - ENGINE_ASLEEP

    @property
    def kv_cache_fits_one_sequence(self) -> bool:
        return self.kv_cache_bytes >= self.setup.max_model_len * self.setup.policy.kv_bytes_per_token()

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity and self.kv_cache_fits_one_sequence

    def phase_line(self, phase: str) -> str:
        parts = sorted(self.phases[phase].items(), key=lambda kv: -kv[1])
        return f"{phase} {self.total(phase) / GiB:.1f} GiB (" + ", ".join(
            f"{name} {value / GiB:.1f}" for name, value in parts if value > 0) + ")"

    def summary(self) -> str:
        """One line for the log: every phase's total, the peak's parts, and the levers chosen."""
        others = ", ".join(f"{p} {self.total(p) / GiB:.1f}" for p in PHASES if p != self.peak_phase)
        return (f"peak {self.phase_line(self.peak_phase)} of {self.capacity / GiB:.1f} GiB per GPU; {others} GiB; "
                + ("engines stay awake" if self.sleep_level == 0 else f"engines sleep at level {self.sleep_level}")
                + f", optimizer offload {'on' if self.offload_optimizer else 'off'}, "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'}")


def _training(shape: ModelShape, plan: TrainingPlan, lm_head: bool) -> Estimate:
    est = estimate(shape, replace(plan, vllm_fraction=0.0))
    if not lm_head:  # a value head: one output per token instead of the vocabulary
        est.parts["logits and loss"] = plan.seq * plan.micro_batch * 4 * 3
    return est


def _forward(shape: ModelShape, tokens: int, lm_head: bool, logits: str = "full") -> float:
    """A forward pass without gradients: one layer's intermediates at a time, and the logits
    (``full``: the whole row's; ``labelled``: a chunk of positions at a time)."""
    layer = tokens * shape.activation_bytes_per_token_layer("full")
    if not lm_head:
        return layer
    kept = tokens * shape.vocab * INFERENCE_LOGITS_BYTES if logits == "full" else 0.0
    return layer + kept + LOGPROB_CHUNK_TEMPORARIES


def phases(setup: ColocatedSetup, offload_optimizer: bool, cuda_graphs: bool,
           sleep: bool = True) -> dict[str, dict[str, float]]:
    """Bytes per part of each phase on rank 0's GPU (see the module doc); ``sleep``: whether the
    engines sleep outside generation, else they keep their whole share throughout."""
    plan = setup.training
    tokens = plan.seq * plan.micro_batch
    capacity = plan.gpu_memory_gib * GiB
    policy = _training(setup.policy, plan, lm_head=True)
    critic = _training(setup.critic, plan, lm_head=False) if setup.critic else None
    frozen = {name: 2.0 * shape.params for name, shape in (("reference", setup.reference), ("reward model", setup.reward))
              if shape is not None}

    def resident(est: Estimate | None, offload: bool) -> float:
        if est is None:
            return 0.0
        return est.static - (est.parts["optimizer states"] if offload else 0.0)

    trainers = {"policy": policy} | ({"critic": critic} if critic else {})
    contexts = {"CUDA contexts": CUDA_CONTEXT * (len(trainers) + len(frozen))}  # the engine's is in its share
    graphs = CUDA_GRAPHS if cuda_graphs else 0.0
    awake = {"vLLM": setup.engine_fraction * capacity + graphs}
    resting = {"vLLM asleep": ENGINE_ASLEEP + graphs} if sleep else awake  # the engine outside generation

    def kept(est: Estimate, offload: bool) -> float:
        """What a trainer holds outside its own training: with sleeping engines, its resident state
        (its cached blocks are returned before they wake); with awake engines nothing returns them,
        so its caching allocator keeps its training peak through every phase."""
        return resident(est, offload) if sleep else est.training_peak

    generate = {name: kept(est, offload_optimizer) for name, est in trainers.items()}
    generate |= frozen | awake | contexts

    def scoring(est: Estimate, forward: float) -> float:
        return resident(est, False) + forward if sleep else max(est.training_peak, resident(est, False) + forward)

    score = {"policy": scoring(policy, _forward(setup.policy, tokens, lm_head=True, logits=plan.logits))}
    if critic:
        score["critic"] = scoring(critic, _forward(setup.critic, tokens, lm_head=False))
    for name, shape in (("reference", setup.reference), ("reward model", setup.reward)):
        if shape is not None:
            score[name] = frozen[name] + _forward(shape, tokens, lm_head=name == "reference", logits=plan.logits)
    score |= resting | contexts

    # The policy trains, then the critic; each beside the other's resident state. The frozen
    # models returned their forward blocks after scoring.
    train = {"policy": policy.training_peak, "critic": resident(critic, False)}
    if critic and not sleep:
        train["critic"] = critic.training_peak  # the critic's cache keeps its peak from the step before
    elif critic and critic.training_peak + resident(policy, False) > policy.training_peak + resident(critic, False):
        train = {"policy": resident(policy, False), "critic": critic.training_peak}
    train = {k: v for k, v in train.items() if k in trainers} | frozen | resting | contexts

    export = 2.0 * setup.policy.params if setup.export_whole_model else min(setup.bucket_bytes, 2.0 * setup.policy.params)
    sync = {name: kept(est, offload_optimizer) for name, est in trainers.items()}
    engine = {"vLLM weights": 2.0 * setup.policy.params} | resting if sleep else awake  # awake: inside its share
    sync |= {"exported weights": export} | frozen | engine | contexts
    return {"generate": generate, "score": score, "train": train, "sync": sync}


def plan_colocated(setup: ColocatedSetup, offload_optimizer: bool | None = None,
                   enforce_eager: bool | None = None, sleep: bool | None = None) -> ColocatedPlan:
    """The first plan that fits, trying the levers the config leaves open (None) in the module
    doc's order; when none fits, the one with every open lever pulled. Offloading the optimizer
    only helps engines that sleep (awake, theirs is the peak in every phase)."""
    sleeps = [False, True] if sleep is None else [sleep]
    offloads = [False, True] if offload_optimizer is None else [offload_optimizer]
    graphs = [True, False] if enforce_eager is None else [not enforce_eager]
    plans = [ColocatedPlan(setup, offload, cuda_graphs, phases(setup, offload, cuda_graphs, asleep),
                           sleep_level=2 if asleep else 0)
             for cuda_graphs in graphs for asleep in sleeps for offload in offloads
             if asleep or not offload or sleep is False]
    chosen = (p for p in plans if p.fits and (p.sleep_level or sleep is False or p.peak * AWAKE_HEADROOM <= p.capacity))
    return next(chosen, plans[-1])


def _largest_fitting(values: range, fits) -> int | None:
    """The largest value of an increasing range for which ``fits(value)`` holds (monotone), or None."""
    lo, hi, best = 0, len(values) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(values[mid]):
            best, lo = values[mid], mid + 1
        else:
            hi = mid - 1
    return best


def refusal(plan: ColocatedPlan, stage_key: str) -> str:
    """Why ``plan`` cannot run, in one line: the peak phase's parts, the other phases that do not
    fit, and which keys to change (with the values that would fit where one key suffices)."""
    setup, cap = plan.setup, plan.capacity
    if not plan.kv_cache_fits_one_sequence:
        need = (setup.max_model_len * setup.policy.kv_bytes_per_token() + 2 * setup.policy.params + ENGINE_ASLEEP) / cap
        return (f"colocated memory plan: resources.rollout.gpu_memory_utilization={setup.engine_fraction:g} gives vLLM "
                f"{setup.engine_fraction * cap / GiB:.1f} GiB of the GPU's {cap / GiB:.1f}, too little for its weights and "
                f"one sequence of max_model_len={setup.max_model_len} tokens of KV cache: raise it to at least "
                f"{int(need * 100 + 1) / 100:.2f} or lower resources.rollout.max_model_len")
    levers = [w for w, on in (("the optimizer offloaded", plan.offload_optimizer),
                              ("CUDA graphs off", not plan.cuda_graphs)) if on]
    tried = f" even with {' and '.join(levers)}" if levers else ""
    over = [p for p in PHASES if plan.total(p) > cap]
    fixes = []
    if "generate" in over or "sync" in over:
        others = plan.total("generate") - plan.phases["generate"]["vLLM"] + (CUDA_GRAPHS if plan.cuda_graphs else 0.0)
        fraction = int((cap - others) / cap * 100) / 100
        if "generate" in over and fraction >= 0.01:
            fixes.append(f"resources.rollout.gpu_memory_utilization <= {fraction:.2f}")
        if not plan.offload_optimizer:
            fixes.append("resources.colocate_offload_optimizer=true")
    if "score" in over or "train" in over:
        def fits_with(tokens: int) -> bool:
            trial = replace(setup, training=replace(setup.training, seq=tokens, micro_batch=1))
            sums = phases(trial, plan.offload_optimizer, plan.cuda_graphs, plan.sleep_level != 0)
            return max(sum(sums["score"].values()), sum(sums["train"].values())) <= cap

        tokens = _largest_fitting(range(256, setup.training.seq * setup.training.micro_batch, 256), fits_with)
        if tokens is not None:
            fixes.append(f"{stage_key}.max_tokens_per_micro_batch <= {tokens}")
        if not setup.training.grad_ckpt and "train" in over:
            fixes.append(f"{stage_key}.gradient_checkpointing=true")
    if plan.sleep_level == 0:
        fixes.append("resources.colocate_sleep=true")
    fixes.append("resources.colocate=false (the rollout workers on GPUs of their own)")
    also = [f"{p} {plan.total(p) / GiB:.1f}" for p in over if p != plan.peak_phase]
    return (f"colocated memory plan needs {plan.peak / GiB:.1f} GiB per GPU but the GPU has {cap / GiB:.1f} GiB{tried}: "
            f"{plan.phase_line(plan.peak_phase)}" + (f"; also over: {', '.join(also)} GiB" if also else "")
            + "; set " + " or ".join(fixes) + " (rayalign estimate-memory shows the trainer's parts)")
