"""Typed run configuration: YAML file + ``key=value`` overrides, validated before any work.

A recipe config names the base model, the datasets, the resources of each worker role and the
chain of stages. Every stage's own block is validated against the schema the stage's plugin
declares, so ``stages[2].dpo.beta: expected float`` is reported before a worker starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from rayalign.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeSelector(Strict):
    """Which nodes may hold one worker's bundle on a multi-node cluster."""

    # Custom resources the bundle takes, so only nodes that declare them fit it: `ray start
    # --resources='{"pool_a": 8}'`, or `resources:` of a KubeRay group. A small amount (0.001)
    # only selects nodes; 1 of a resource each node has once keeps one worker per node.
    resources: dict[str, Annotated[float, Field(gt=0)]] = {}
    # Node-label selector: `ray start --labels=pool=a`, or `labels:` of a KubeRay group. Values
    # take Ray's label operators, e.g. "!spot" or "in(a100,h100)".
    labels: dict[str, str] = {}


class RoleResources(Strict):
    """Resources of one worker role. ``num_gpus`` is per worker; 0 runs on CPU."""

    num_workers: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0)
    # Where the workers may run: entry r constrains rank r, a single entry every rank, none
    # leaves it to `placement_strategy`.
    placement: list[NodeSelector] = []

    @model_validator(mode="after")
    def _one_selector_or_one_per_rank(self) -> "RoleResources":
        if len(self.placement) not in (0, 1, self.num_workers):
            raise PydanticCustomError(
                "placement_length",
                "{n} placement entries for {w} workers: give one entry for all ranks or one per rank",
                {"n": len(self.placement), "w": self.num_workers},
            )
        return self

    def selector(self, rank: int) -> NodeSelector | None:
        if len(self.placement) == 1:
            return self.placement[0]
        return self.placement[rank] if rank < len(self.placement) else None


class RolloutResources(RoleResources):
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)
    # A fixed KV cache per engine, in GiB. null: vLLM sizes it to fill `gpu_memory_utilization`, by
    # profiling a forward pass against the device's free memory, which assumes nothing else on the
    # GPU allocates or frees meanwhile. Set it where several runs share one GPU.
    kv_cache_memory_gib: float | None = Field(None, gt=0)
    max_model_len: int = Field(1024, ge=16)
    dtype: str = "auto"  # vLLM's: auto, bfloat16, float16, float32
    # How RL stages push new weights into the engines: auto picks object_store on CPU, cuda_ipc
    # when colocated on (or split with) the trainer's GPUs, nccl when the engines have GPUs of their own.
    weight_sync: Literal["auto", "object_store", "cuda_ipc", "nccl"] = "auto"
    # null: CUDA graphs on a GPU (decoding runs several times faster; the engine takes a minute or
    # two longer to start), eager on CPU. A colocated RL stage turns graphs off only when its memory
    # plan needs the graphs' pool, and says so in the log. true: eager everywhere.
    enforce_eager: bool | None = None
    # Where vLLM's engine core runs: in_process (the rollout actor's), child (a process of its own,
    # vllm.LLM's default), auto: in_process, which generated faster and started sooner in a rollout
    # actor on one H200 (docs/performance.md, row c).
    engine_core: Literal["auto", "in_process", "child"] = "auto"


class ResourcesConfig(Strict):
    trainer: RoleResources = RoleResources()
    reference: RoleResources = RoleResources()
    rollout: RolloutResources = RolloutResources()
    reward: RoleResources = RoleResources()  # reward-model workers (RL stages with a reward model)
    critic: RoleResources = RoleResources()  # value-model trainers (PPO)
    # Trainer, reference and rollout engines share the trainer's GPUs; vLLM sleeps while the
    # trainer works where memory needs it, so a single-GPU machine runs every recipe.
    colocate: bool = False
    # Colocated RL: move the trainers' optimizer states (Adam moments, fp32 master weights) to host
    # memory while the engines generate, and back before the update. null: when the stage's memory
    # plan needs it (it costs a copy each way per step).
    colocate_offload_optimizer: bool | None = None
    # Colocated RL: the engines sleep (release their share of the GPU) while the trainers work.
    # null: only when the stage's memory plan needs it; with room for both, they stay awake and a
    # step pays for no sleep, wake or cache release.
    colocate_sleep: bool | None = None
    # Trainer and rollout engines split the trainer's GPUs by memory, both awake: each trainer rank's
    # GPU also holds one engine, which takes `rollout.gpu_memory_utilization` of its memory (the
    # trainer the rest; `rollout.num_gpus` is not used). Unlike `colocate` no engine sleeps, so the
    # engines can generate while the trainers train: asynchronous RL (`async:`) on one GPU. Weights
    # sync through CUDA IPC. Needs as many engines as trainer ranks, one GPU each.
    split_gpus: bool = False
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Seconds to wait for a placement group before failing with what was asked for.
    placement_timeout_s: float = Field(120, gt=0)

    @model_validator(mode="after")
    def _split_or_colocate(self) -> "ResourcesConfig":
        if self.split_gpus and self.colocate:
            raise PydanticCustomError("split_gpus", "split_gpus and colocate both share the trainer's GPUs: choose "
                                      "one (colocate: engines sleep while the trainer works; split_gpus: both stay "
                                      "awake, each in its share of memory)")
        if self.split_gpus and self.trainer.num_gpus > 0 and (
                self.rollout.num_workers != self.trainer.num_workers or self.rollout.tensor_parallel_size != 1):
            raise PydanticCustomError("split_gpus", "split_gpus puts one engine on each trainer rank's GPU: needs "
                                      "rollout.num_workers equal to trainer.num_workers ({t}) and tensor_parallel_size 1",
                                      {"t": self.trainer.num_workers})
        return self

    # Derived settings below are plain properties, not fields: they stay out of the dumped config
    # (and so out of a resumed run's fingerprint), and every consumer reads the one meaning here.

    @property
    def colocated(self) -> bool:
        """Roles really share the trainer's GPUs: ``colocate`` is set and the trainer has GPUs.

        ``colocate`` on a CPU-only trainer has nothing to share, so every role keeps its own
        bundle, no engine sleeps and no memory plan is made.
        """
        return self.colocate and self.trainer.num_gpus > 0

    @property
    def split(self) -> bool:
        """Trainer and engines really split the trainer's GPUs: ``split_gpus`` is set and the trainer
        has GPUs (on a CPU-only trainer every role keeps its own bundle)."""
        return self.split_gpus and self.trainer.num_gpus > 0

    @property
    def weight_sync_transport(self) -> Literal["object_store", "cuda_ipc", "nccl"]:
        """``rollout.weight_sync``, with ``auto`` resolved from where the workers are: cuda_ipc when
        colocated or split, nccl when trainer and engines have GPUs of their own, object_store otherwise."""
        chosen = self.rollout.weight_sync
        if chosen != "auto":
            return chosen
        if self.colocated or self.split:  # each engine on its trainer rank's GPU
            return "cuda_ipc"
        if self.trainer.num_gpus == 0 or self.rollout.num_gpus == 0:
            return "object_store"
        return "nccl"


class DataConfig(Strict):
    """Dataset files (JSONL). ``null`` uses the embedded synthetic data."""

    sft: str | None = None
    preference: str | None = None
    unpaired: str | None = None  # {prompt, completion, label} examples (the kto stage); null: synthetic pairs unpaired
    prompts: str | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    # What a bad record (malformed JSON, missing/empty field, unknown role, no final assistant
    # turn, too long after the chat template, duplicate id) does: `skip` drops it, counted in the
    # stage's metrics and named (file:line, reason) in the log; `fail` stops the run at the first.
    bad_records: Literal["skip", "fail"] = "skip"
    # Even under `skip`, more bad records than this share of a file (or none valid) stop the run:
    # that is the wrong file or format, not a few bad lines.
    max_bad_fraction: float = Field(0.1, ge=0, le=1)


class TimeoutConfig(Strict):
    """Every remote call has a deadline, so a hung worker becomes an error that names it."""

    worker_start_s: float = Field(600, gt=0)
    step_s: float = Field(1800, gt=0)
    # One trainer -> rollout weight sync (every bucket, every engine), after each policy update.
    sync_s: float = Field(300, gt=0)


class ReliabilityConfig(Strict):
    """Checkpoints, restarts after lost workers, and what to do when the loss explodes."""

    checkpoint_every: int = Field(0, ge=0)  # optimizer steps between checkpoints; 0: none mid-stage
    keep_checkpoints: int = Field(2, ge=1)
    max_restarts: int = Field(2, ge=0)  # per stage: dead or hung workers survived from the last checkpoint
    max_consecutive_skips: int = Field(3, ge=1)  # non-finite steps in a row before a rollback
    # A loss this many times its running mean rolls back; off by default because a loss near zero
    # (DPO once most pairs are separated) makes one hard batch look like a 1000x spike.
    loss_spike_factor: float | None = Field(None, gt=1)
    lr_backoff: float = Field(0.5, gt=0, lt=1)  # LR multiplier applied at each rollback
    max_rollbacks: int = Field(3, ge=0)


class ResumeConfig(Strict):
    """``resume: true`` continues the run in ``output_dir``: finished stages are skipped and the
    current one restarts from its last checkpoint. It refuses settings that differ from the first
    start's (rayalign/resume_check.py) except those listed in ``allow_changes`` (``[lr]``: every
    stage's lr; ``[stages[1].dpo.lr]``: that one)."""

    enabled: bool = False
    allow_changes: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        # `resume: true` is the common spelling; a mapping (`resume: {allow_changes: [lr]}`) means on.
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, dict) and value and "enabled" not in value:
            return {**value, "enabled": True}
        return value

    def __bool__(self) -> bool:
        return self.enabled


class StageEntry(BaseModel):
    name: str
    config: Any  # the stage plugin's own pydantic model, once validated


class RunConfig(Strict):
    model: str | None = None  # local path or hub id; null builds the embedded tiny model
    # "{time}" becomes the start time, so repeated runs of a recipe never collide.
    output_dir: str = "runs/{time}"
    resume: ResumeConfig = ResumeConfig(enabled=False)  # true: continue the run in output_dir
    seed: int = 0
    data: DataConfig = DataConfig()
    resources: ResourcesConfig = ResourcesConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    reliability: ReliabilityConfig = ReliabilityConfig()
    # Experiment trackers the driver feeds (wandb, tensorboard, mlflow or a plugin's), and their
    # options by tracker name, validated against the tracker's schema before any work.
    trackers: list[str] = []
    tracker_options: dict[str, dict[str, Any]] = {}
    stages: list[dict[str, Any]] = Field(default_factory=list)


_PYDANTIC_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "missing required key",
    "float_parsing": "expected float",
    "float_type": "expected float",
    "int_parsing": "expected int",
    "int_type": "expected int",
    "int_from_float": "expected int",
    "bool_parsing": "expected bool",
    "bool_type": "expected bool",
    "string_type": "expected string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "list_type": "expected a list",
}


def format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        index = isinstance(part, int) or str(part).isdigit()
        out += f"[{part}]" if index else (f".{part}" if out else str(part))
    return out


def raise_validation_error(exc: ValidationError, prefix: str, source: str) -> None:
    err = exc.errors()[0]
    where = format_location(tuple(prefix.split(".")) + tuple(err["loc"]) if prefix else tuple(err["loc"]))
    message = _PYDANTIC_MESSAGES.get(err["type"], err["msg"])
    if err["type"] not in ("extra_forbidden", "missing"):
        message += f", got {err.get('input')!r}"
    raise ConfigError(f"{source}: {where}" if source else where, message) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text, "overrides look like key=value (e.g. data.sft=/data/sft.jsonl)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    return key.split("."), value


def apply_override(raw: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set ``parts`` in the raw config; a leading stage name (``dpo.beta=0.2``) finds its stage."""
    stage_names = [next(iter(s)) for s in raw.get("stages", []) if isinstance(s, dict) and s]
    if parts[0] not in RunConfig.model_fields and parts[0] in stage_names:
        if stage_names.count(parts[0]) > 1:
            raise ConfigError(text, f"stage {parts[0]!r} appears more than once; use stages.N.{parts[0]}...")
        parts = ["stages", str(stage_names.index(parts[0]))] + parts
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(text, f"{'.'.join(parts[: i + 1])}: no such list index")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(text, f"{'.'.join(parts)}: no such list index")
        node[int(last)] = value
    else:
        node[last] = value


def load_raw(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise ConfigError(str(path), "config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}", f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a mapping at the top level")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply ``key=value`` overrides and validate the run-level schema."""
    raw = load_raw(path)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(raw, parts, value, text)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise_validation_error(exc, "", str(path) if path else "")
    if "{time}" in cfg.output_dir:
        cfg.output_dir = cfg.output_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    for i, entry in enumerate(cfg.stages):
        if len(entry) != 1 or not isinstance(next(iter(entry.values())) or {}, dict):
            raise ConfigError(f"stages[{i}]", "each stage is a one-key mapping: {stage_name: {options}}")
    return cfg


def check_output_dir(output_dir: str) -> None:
    """Inside a Ray job, refuse a relative ``output_dir``: it would land in Ray's scratch space.

    ``ray job submit`` runs the driver with ``RAY_JOB_CONFIG_JSON_ENV_VAR`` set, in the job's
    unpacked copy of ``--working-dir`` (``.../runtime_resources/working_dir_files/_ray_pkg_...``),
    which Ray deletes with its session and which every node unpacks on its own. Outside a job a
    relative path means what it always does.
    """
    cwd = os.getcwd()
    scratch = "/runtime_resources/working_dir_files/" in cwd + "/"
    if Path(output_dir).expanduser().is_absolute() or not (scratch or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ):
        return
    if scratch:
        why = (f"this Ray job runs in Ray's temporary copy of its working directory ({cwd}), deleted with the "
               "session and unpacked separately on each node")
    else:
        why = f"this Ray job runs in {cwd}, where Ray started its driver, not where it was submitted"
    raise ConfigError("output_dir", f"{output_dir!r} is relative, and {why}; give an absolute path on storage "
                      f"every node sees, e.g. output_dir=$PWD/{output_dir} on the ray job submit line")


def validate_stages(cfg: RunConfig, registry, source: str = "") -> list[StageEntry]:
    """Resolve every stage name to its plugin and validate its options against its schema."""
    if not cfg.stages:
        raise ConfigError("stages", "no stages configured")
    entries = []
    for i, entry in enumerate(cfg.stages):
        name, options = next(iter(entry.items()))
        stage_cls = registry.get(name, where=f"stages[{i}]")
        try:
            entries.append(StageEntry(name=name, config=stage_cls.Config.model_validate(options or {})))
        except ValidationError as exc:
            raise_validation_error(exc, f"stages.{i}.{name}", source)
    return entries
