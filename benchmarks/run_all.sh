#!/usr/bin/env bash
# The GPU benchmarks (benchmarks/README.md): one part per invocation, each under 10 minutes on the GPU machine.
#
#   bash benchmarks/run_all.sh list          # the sequence, with what each part needs
#   bash benchmarks/run_all.sh <part>        # run one part; results go to $OUT (default benchmarks/results)
#   bash benchmarks/run_all.sh dry           # every part with --dry-run, on CPU (tiny shapes)
#
# On the GPU machine, after the wheelhouse is installed into /tmp/site (shared/gpu/README.md), run
# the parts of `list` in order, one `run` call each (the first installs the project: its stages are
# entry points). Single GPU (H100 or H200): check, sft, dpo, rollout, rollout-causes, grpo, async,
# rl-memory-0.5b, rl-memory-1.5b, memory, then sft-1.5b and dpo-1.5b if time is left. Four H200s: check, scaling.
# The whole `gpu` test suite: rl-memory-0.5b, rl-memory-1.5b, gpu-kernels, gpu-engines, gpu-recipes
# (each writes a gpu_tests-<part> result file: what each test did, for docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:platform:plugins${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
GIVEN_OUT=${OUT:-}
OUT=${OUT:-benchmarks/results}
if [[ -x .venv/bin/python ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
LIMIT=${LIMIT:-590}  # the GPU machine's per-command limit is 600 s

run() { timeout "$LIMIT" "$PY" "$@" --out "$OUT"; }
# The `gpu` tests of one part, each test's outcome recorded in $OUT/<gpu>-<date>-gpu_tests-<part>.json.
gpu_tests() { "$PY" benchmarks/gpu_tests.py --out "$OUT" --name "${part#gpu-}" --timeout $((LIMIT - 20)) -- -q -s "$@"; }

# Stages are plugins found through entry points, which a bare PYTHONPATH does not provide: on a
# fresh GPU machine the project is installed first (editable, no dependencies: /tmp/site has them).
ensure_installed() {
  local probe='from rayalign.plugins import get_plugin_manager; stages = get_plugin_manager().stages
assert {"sft", "dpo", "grpo"} <= set(stages), sorted(stages); print("stages:", ", ".join(stages))'
  if "$PY" -c "$probe" >/dev/null 2>&1; then return 0; fi
  echo "run_all.sh: rayalign's stages not found through entry points: installing the project (pip -e, no deps)" >&2
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e .
  "$PY" -c "$probe" || { echo "run_all.sh: installed, but the stages still do not load" >&2; exit 1; }
}

part=${1:-list}
case "$part" in
  check|sft|sft-choices|dpo|rollout|rollout-causes|grpo|async|rl-memory-*|gpu-*|memory|sft-1.5b|dpo-1.5b|scaling|dry)
    ensure_installed ;;
esac
case "$part" in
  list)
    cat <<'EOF'
part      machine          est. minutes  what
check     any GPU kind     1             nvidia-smi, imports and versions of the stack
sft       h100 or h200     4-5           (a) SFT tokens/s: rayalign vs TRL default vs TRL padding_free, 0.5B
dpo       h100 or h200     3-4           (b) DPO pairs/s: rayalign (reference once) vs TRL DPOTrainer, 0.5B
rollout   h100 or h200     6-8           (c) output tokens/s: the stages' rollout path through Ray vs raw vLLM, 0.5B,
                                         and on the same engine what detokenizing / Completion objects cost
rollout-causes h100/h200   7-9           (c) a side per other suspect: raw vLLM with its engine core in-process,
                                         eager, 4 CPUs per rollout actor, engine core in a child of the actor
grpo      h100 or h200     6-8           (e) GRPO step time: rayalign grpo stage vs TRL GRPOTrainer, colocated, 0.5B
async     h100 or h200     4-6           GRPO step time and reward curve, sync (K=0) vs async (K=1, K=2), trainer and
                                         vLLM splitting one GPU by memory (resources.split_gpus), 0.5B, eager vLLM
rl-memory-0.5b h100/h200   6-9           gpu tests: tests/test_gpu_rl_memory.py, the colocated GRPO benchmark
                                         settings, device peak per phase (generate, score, train, sync), 0.5B,
                                         and 0.5B with the optimizer offloaded
rl-memory-1.5b h200        5-8           the same at the 1.5B shape
gpu-kernels any GPU kind   2-4           gpu tests: varlen attention, chunked head and CE, Liger, RL objectives
gpu-engines any GPU kind   4-6           gpu tests: vLLM engine sleep/wake and KV cache, a trainer and a sleeping
                                         engine on one GPU, CUDA IPC (and NCCL on two GPUs) weight sync
gpu-recipes any GPU kind   6-9           gpu tests: the colocated SFT -> RM -> GRPO recipe, the memory planner on
                                         three held-out configurations
memory    h200             7-9           the memory planner against the trainer's peaks: fit on some configurations,
                                         error on held-out ones (0.5B and 1.5B, full/LoRA/QLoRA, ZeRO-2/3)
sft-choices h100/h200     7-9           (a) what each opt-in choice buys against the defaults, 0.5B: compiled
                                         decoder layers, Liger's layer kernels alone, Liger's fused CE alone
sft-1.5b  h200             5-6           (a) at the 1.5B shape
dpo-1.5b  h200             4-5           (b) at the 1.5B shape
scaling   h200-x4          5-7           (f) SFT 1 -> 2 -> 4 GPUs, ZeRO-2, 0.5B
weight-sync (d) is benchmarks/weight_sync.py (results already in benchmarks/results/).
EOF
    ;;
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" - <<'EOF'
import importlib
for name in ("torch", "transformers", "trl", "deepspeed", "ray", "vllm", "peft", "datasets"):
    try:
        print(f"{name:13s} {importlib.import_module(name).__version__}")
    except Exception as exc:
        print(f"{name:13s} IMPORT FAILED: {type(exc).__name__}: {exc}")
EOF
    ;;
  sft)      run benchmarks/sft_throughput.py --shape 0.5b ;;
  dpo)      run benchmarks/dpo_throughput.py --shape 0.5b ;;
  rollout)  run benchmarks/rollout_throughput.py --shape 0.5b ;;
  rollout-causes)
            run benchmarks/rollout_throughput.py --shape 0.5b --name rollout_causes \
              --sides raw_vllm_inproc,rayalign_eager,rayalign_4cpu,rayalign_child ;;
  grpo)     run benchmarks/grpo_step.py --shape 0.5b ;;
  async)    run benchmarks/async_rl.py --shape 0.5b ;;
  rl-memory-0.5b|rl-memory-1.5b)
            gpu_tests tests/test_gpu_rl_memory.py -k "${part#rl-memory-}" ;;
  gpu-kernels) gpu_tests tests/test_packed_attention.py tests/test_fast_paths.py tests/test_rl_objectives.py ;;
  gpu-engines) gpu_tests tests/test_vllm_engine.py tests/test_gpu_colocate.py tests/test_weight_sync.py ;;
  gpu-recipes) gpu_tests tests/test_gpu_recipes.py tests/test_gpu_memory_validation.py ;;
  memory)   run benchmarks/memory_validation.py ;;
  sft-choices)
            run benchmarks/sft_throughput.py --shape 0.5b --name sft_choices --side-timeout 180 \
              --sides rayalign,rayalign_compile,rayalign_liger_layers,rayalign_liger_ce ;;
  sft-1.5b) run benchmarks/sft_throughput.py --shape 1.5b ;;
  dpo-1.5b) run benchmarks/dpo_throughput.py --shape 1.5b ;;
  scaling)  run benchmarks/sft_scaling.py --shape 0.5b --gpus 1,2,4 ;;
  dry)
    OUT=${GIVEN_OUT:-/tmp/rayalign-bench}  # CPU figures never land in benchmarks/results/
    for script in sft_throughput dpo_throughput rollout_throughput grpo_step async_rl sft_scaling; do
      run "benchmarks/$script.py" --dry-run
    done
    ;;
  *)
    echo "run_all.sh: unknown part '$part' (bash benchmarks/run_all.sh list)" >&2
    exit 2
    ;;
esac
