"""Weight-sync time, trainer -> vLLM engine, on a Qwen2-shaped model with random bf16 weights.

    python benchmarks/weight_sync.py --shape 0.5b --transport cuda_ipc --out result.json   # one GPU, colocated
    python benchmarks/weight_sync.py --shape 0.5b --transport nccl --out result.json       # two GPUs

A real DeepSpeed trainer actor and a real vLLM engine actor (the RL stage's own classes, through
``WeightSync``), a few warm-up syncs, then ``--syncs`` timed ones; reports p50/min/max seconds
and the bytes moved. The model is built locally (transformers config, random init): no hub.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from memory_validation import SHAPES as QWEN2_SHAPES  # noqa: E402  (the published Qwen2 configs)

# Their "tiny" has head_dim 16; vLLM's CPU attention needs 64, so the CPU dry run uses its own.
SHAPES = {
    **{k: v for k, v in QWEN2_SHAPES.items() if k != "tiny"},
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def build_model(shape: str, dest: Path, vocab_size: int | None = None) -> str:
    """``shape``'s Qwen2 with random bf16 weights and the embedded tokenizer; ``vocab_size``
    replaces the shape's (the tokenizer's size: a random model then samples text, not ids the
    tokenizer cannot decode)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rayalign.embedded import embedded_model_path

    dims = {**SHAPES[shape], **({"vocab_size": vocab_size} if vocab_size else {})}
    config = Qwen2Config(max_position_embeddings=4096, torch_dtype="bfloat16", **dims)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(dest)
    # Any tokenizer will do: only loading and syncing weights is timed.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(embedded_model_path(0)).save_pretrained(dest)
    return str(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--transport", choices=["object_store", "cuda_ipc", "nccl"], default="cuda_ipc")
    parser.add_argument("--syncs", type=int, default=10)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import ray
    import torch

    from rayalign.cluster.runtime import Cluster
    from rayalign.cluster.worker_group import WorkerGroup
    from rayalign.config import ResourcesConfig
    from rayalign.rollout.vllm_engine import EngineConfig
    from rayalign.rollout.weight_sync import WeightSync
    from rayalign.workers.rollout import RolloutWorker
    from rayalign.workers.trainer import TrainerWorker, TrainSpec
    from rayalign_sft.loss import CrossEntropyLoss
    from rayalign_sft.stage import SFTObjective

    model = build_model(args.shape, Path(tempfile.mkdtemp()) / f"qwen2-{args.shape}")
    colocated = args.transport == "cuda_ipc"
    gpus = 1 if torch.cuda.is_available() else 0
    resources = {"trainer": {"num_cpus": 2, "num_gpus": gpus}, "rollout": {"num_cpus": 2, "num_gpus": 0 if colocated else gpus},
                 "colocate": colocated}
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 4))
    with Cluster(ResourcesConfig.model_validate(resources)).reserve("bench", ["trainer", "rollout"]) as placement:
        engine = EngineConfig(model=model, dtype="bfloat16", gpu_memory_utilization=0.3 if gpus else 0.15,
                              max_model_len=1024)
        engines = WorkerGroup("bench/rollout", RolloutWorker, placement["rollout"], lambda r: (engine, 2))
        engines.run(lambda a, r: a.ping.remote(), 900)
        trainers = WorkerGroup("bench/trainer", TrainerWorker, placement["trainer"], lambda r: (r, 1, 2))
        master = trainers.run(lambda a, r: a.free_address.remote(), 60)[0]
        spec = TrainSpec(model_path=model, total_steps=1, bf16=True)
        trainers.run(lambda a, r: a.setup.remote(master, spec, SFTObjective(CrossEntropyLoss())), 900)
        sync = WeightSync(trainers, engines, timeout_s=600, bucket_bytes=args.bucket_mb << 20, transport=args.transport)
        for _ in range(2):
            sync.sync()  # warm-up: first CUDA IPC mappings, NCCL channels, allocator growth
        stats = [sync.sync() for _ in range(args.syncs)]
        engines.shutdown()
        trainers.shutdown()
    seconds = [s.seconds for s in stats]
    result = {
        "benchmark": "weight_sync", "command": "python " + " ".join(sys.argv), "shape": args.shape, "transport": args.transport, "bucket_mb": args.bucket_mb,
        "bytes": stats[0].bytes, "buckets": stats[0].buckets, "syncs": args.syncs,
        "seconds_p50": statistics.median(seconds), "seconds_min": min(seconds), "seconds_max": max(seconds),
        "gbytes_per_s_p50": stats[0].bytes / statistics.median(seconds) / 1e9,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "ray": ray.__version__,
                     "vllm": metadata.version("vllm")},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
