"""Memory planner: parameter counts match transformers, ZeRO accounting, the CLI, the pipeline's refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from rayalign.errors import ConfigError
from rayalign.memory import (CALIBRATION, DS_BUCKET, LABELLED_CHUNK_ELEMENTS, LOGITS_BYTES, Calibration, GiB,
                             ModelShape, TrainingPlan, estimate)

from conftest import REPO

QWEN2_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
LLAMA_UNTIED = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
                "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": False}


def hf_params(config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [QWEN2_05B, LLAMA_UNTIED])
def test_parameter_count_matches_transformers(config):
    assert ModelShape.from_config(config).params == hf_params(config)


def test_lora_parameter_count_matches_peft(tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                           LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_dir(tiny_model_path).lora_params(4, targets) == trainable


def test_zero_stages_shard_what_they_should():
    shape = ModelShape.from_config(QWEN2_05B)
    p = shape.params
    parts = lambda **kw: estimate(shape, TrainingPlan(seq=1024, **kw)).parts  # noqa: E731
    z0 = parts(zero=0)
    assert z0["weights"] == 2 * p and z0["gradients"] == 6 * p and z0["optimizer states"] == 12 * p  # 20 bytes/param
    z1 = parts(zero=1, gpus=4)
    assert z1["optimizer states"] == 3 * p and z1["gradients"] == 6 * p
    # At the loss, before backward: ZeRO-2 holds its reduce bucket, ZeRO-3 its bf16 gradient partition;
    # the fp32 gradients (and ZeRO-2's bf16 ones) come with the optimizer step.
    z2 = estimate(shape, TrainingPlan(seq=1024, zero=2, gpus=4))
    assert z2.parts["gradients"] == 2 * DS_BUCKET and z2.step_temporaries == 1.5 * p - 2 * DS_BUCKET + p
    z3 = estimate(shape, TrainingPlan(seq=1024, zero=3, gpus=4))
    assert z3.parts["weights"] == p / 2 and z3.parts["gradients"] == p / 2 and z3.parts["optimizer states"] == 3 * p
    assert z3.step_temporaries == p + p  # fp32 gradient partition, AdamW's sqrt(v)
    lora = parts(method="lora", zero=0)
    assert lora["optimizer states"] < 0.01 * z0["optimizer states"] and lora["weights"] > 2 * p
    qlora = parts(method="qlora", zero=0)
    assert 0.3 < qlora["weights"] / lora["weights"] < 0.6  # 4-bit layers, bf16 embeddings (a third of Qwen2-0.5B)


def test_activations_scale_with_tokens_and_checkpointing():
    shape = ModelShape.from_config(QWEN2_05B)
    act = lambda **kw: estimate(shape, TrainingPlan(zero=0, **kw)).parts["activations"]  # noqa: E731
    assert act(seq=2048, micro_batch=2) == pytest.approx(2 * act(seq=2048, micro_batch=1))
    assert act(seq=2048, grad_ckpt=True) < act(seq=2048) / 5
    logits = estimate(shape, TrainingPlan(seq=4096)).parts["logits and loss"]
    assert logits == 4096 * 151936 * CALIBRATION.logits_bytes


def test_colocated_vllm_counts_against_the_trainer_state():
    shape = ModelShape.from_config(QWEN2_05B)
    est = estimate(shape, TrainingPlan(zero=0, seq=512, vllm_fraction=0.5, gpu_memory_gib=80))
    assert est.vllm["weights"] + est.vllm["KV cache"] == pytest.approx(40 * GiB)
    assert est.peak > est.static + 40 * GiB and est.fits
    assert not estimate(shape, TrainingPlan(zero=0, seq=512, vllm_fraction=0.9, gpu_memory_gib=80)).fits


def test_cli_prints_parts_and_exits_1_when_it_does_not_fit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_05B))
    cmd = [sys.executable, "-m", "rayalign.cli", "estimate-memory", "--model", str(tmp_path), "--method", "full",
           "--zero", "0", "--gpus", "1", "--seq", "2048", "--micro-batch", "8", "--grad-ckpt"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    for part in ("weights", "gradients", "optimizer states", "activations", "logits and loss", "fits"):
        assert part in ok.stdout
    tight = subprocess.run(cmd + ["--gpu-memory", "24", "--vllm-colocated", "0.3"], capture_output=True, text=True)
    assert tight.returncode == 1 and "DOES NOT FIT" in tight.stdout and "vLLM KV cache" in tight.stdout
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no config.json" in bad.stderr


def test_pipeline_refuses_a_gpu_plan_that_cannot_fit(tmp_path, tiny_model_path, monkeypatch):
    """A 7B-shaped full fine-tune on one 24 GiB GPU stops before any output or worker, naming the stage."""
    from rayalign.config import RunConfig
    from rayalign.pipeline import run_pipeline

    model = tmp_path / "big"
    shutil.copytree(tiny_model_path, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, head_dim=128)
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("RAYALIGN_GPU_MEMORY_GIB", "24")
    cfg = RunConfig.model_validate({"model": str(model), "output_dir": str(tmp_path / "run"),
                                    "resources": {"trainer": {"num_gpus": 1}}, "stages": [{"sft": {"epochs": 1}}]})
    with pytest.raises(ConfigError, match=r"stages\[0\].sft: memory plan: full ZeRO-2 on 1 GPU\(s\).*does not fit in "
                                          r"24 GiB \(optimizer states \d+\.\d"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_planner_copies_the_trainers_constants():
    from rayalign.training.deepspeed_config import BUCKET_ELEMENTS
    from rayalign.training.linear_cross_entropy import CHUNK_ELEMENTS

    assert DS_BUCKET == BUCKET_ELEMENTS and LABELLED_CHUNK_ELEMENTS == CHUNK_ELEMENTS


def test_calibration_scales_its_parts_and_the_reserve():
    shape = ModelShape.from_config(QWEN2_05B)
    plan = TrainingPlan(seq=4096)
    base = estimate(shape, plan)
    other = estimate(shape, plan, Calibration(activation_scale=2.0, logits_bytes=5.0, cuda_reserve_gib=3.0))
    assert other.parts["activations"] == pytest.approx(2 * base.parts["activations"] / CALIBRATION.activation_scale)
    assert other.parts["logits and loss"] == 4096 * shape.vocab * 5.0
    assert other.peak - other.training_peak == 3 * GiB


def test_validation_split_covers_every_kind_on_both_sides():
    mv = benchmark("memory_validation")
    for split in ("fit", "held_out"):
        cases = [c for c in mv.MATRIX if c.split == split]
        assert {c.size for c in cases} == {"0.5b", "1.5b"} and {c.zero for c in cases} == {2, 3}
        assert {c.method for c in cases} == {"full", "lora", "qlora"} and {c.grad_ckpt for c in cases} == {True, False}
        assert "labelled" in {c.logits for c in cases}
    assert len({c.name for c in mv.MATRIX}) == len(mv.MATRIX)
    assert all(c.zero == 2 for c in mv.MATRIX if c.method == "qlora")  # ZeRO-3 cannot shard 4-bit weights


def test_fit_recovers_the_constants_that_made_the_peaks_and_reports_held_out_error():
    """Peaks made by the planner with known constants: the fit on the fit rows finds them again, the
    held-out rows are then exact with them and off with others, and the target is judged on held-out rows only."""
    mv = benchmark("memory_validation")
    truth = Calibration(activation_scale=1.2, logits_bytes=11.0, cuda_reserve_gib=4.0)
    rows = []
    for case in mv.MATRIX:
        shape = ModelShape.from_config({"model_type": "qwen2", **mv.SHAPES[case.size]})
        terms = mv.estimate_terms(shape, case.plan(8192))
        assert mv.predicted_allocated(terms, truth) == pytest.approx(estimate(shape, case.plan(8192), truth).training_peak)
        allocated = mv.predicted_allocated(terms, truth) / GiB
        rows.append({"name": case.name, "split": case.split, "terms": terms,
                     "measured": {"allocated_gib": allocated, "device_used_gib": allocated + truth.cuda_reserve_gib}})
    fitted = mv.fit_calibration([r for r in rows if r["split"] == "fit"])
    assert fitted.activation_scale == pytest.approx(1.2) and fitted.logits_bytes == pytest.approx(11.0)
    assert fitted.cuda_reserve_gib == pytest.approx(4.0)
    summary = mv.summarize(rows, fitted)
    assert summary["held_out_allocated_max_abs_error_fitted"] == pytest.approx(0, abs=1e-9)
    assert summary["held_out_device_max_abs_error_fitted"] == pytest.approx(0, abs=1e-9) and summary["target_met"]
    held = [r for r in rows if r["split"] == "held_out"]
    held[0]["measured"]["allocated_gib"] *= 1.25  # one held-out row the planner misses by 20%
    summary = mv.summarize(rows, fitted)
    assert summary["held_out_allocated_max_abs_error_fitted"] == pytest.approx(0.2) and not summary["target_met"]
    assert mv.fit_calibration(rows[:1]) is None  # one row cannot fix two constants


def test_dry_run_prints_every_configuration_without_running_anything(capsys):
    mv = benchmark("memory_validation")
    assert mv.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in mv.MATRIX) and "held_out" in out and "CALIBRATION = Calibration(" in out


def test_smoke_run_trains_through_the_trainer_and_records_every_row(tmp_path):
    """The tiny model through TrainerWorker and DeepSpeed on CPU: losses, no peaks (no CUDA), QLoRA skipped with why."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory_validation.py"), "--smoke", "--out",
                           str(tmp_path), "--only", "tiny lora ZeRO-3 ckpt labelled,tiny qlora ZeRO-2"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("cpu-*-memory_validation-smoke.json")).read_text())
    assert result["complete"] and result["dirty"] is not None and "--smoke" in result["command"]
    lora, qlora = result["rows"]
    assert lora["split"] == "fit" and len(lora["losses"]) == 2 and lora["settings_used"]["zero_stage"] == 3
    tiny = ModelShape.from_config({"model_type": "qwen2", **benchmark("weight_sync").SHAPES["tiny"]})
    assert lora["trainable_params"] == tiny.lora_params(16, list(TrainingPlan.lora_targets))  # counted before ZeRO-3
    assert "measured" not in lora and lora["estimate_current"]["training_total_gib"] > 0
    assert qlora["skipped"] == "QLoRA needs a GPU (workers/quantization.py)" and "losses" not in qlora
    assert result["summary"]["target_met"] is None and result["summary"]["fitted"] is None


@pytest.mark.parametrize("method, shape", [
    ("full", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2)),
    ("full", dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_key_value_heads=6)),
    ("lora", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2)),
])
def test_activation_coefficients_match_what_autograd_saves(method, shape):
    """The planner's per-layer activation bytes against a count of the tensors autograd saves (bf16, CPU)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from memory_validation import saved_activation_bytes
    finally:
        sys.path.pop(0)
    shape = {**shape, "vocab_size": 1000, "tie_word_embeddings": True}
    per_layer, outside = saved_activation_bytes(shape, method)
    model = ModelShape.from_config({**shape, "model_type": "qwen2", "num_hidden_layers": 1})
    assert model.activation_bytes_per_token_layer(method) == pytest.approx(per_layer, rel=0.04)
    assert model.activation_bytes_outside_layers(method) == pytest.approx(outside, rel=0.1, abs=600)


def test_logits_term_matches_the_measured_loss_peak():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from memory_validation import loss_peak_bytes
    finally:
        sys.path.pop(0)
    assert loss_peak_bytes() == pytest.approx(LOGITS_BYTES, rel=0.05)


def test_gpu_scripts_run_without_ray_and_use_the_sft_loss(tmp_path):
    """The GPU machine has torch, transformers and peft but no Ray, DeepSpeed or vLLM."""
    import torch

    from rayalign_sft.loss import CrossEntropyLoss

    code = ("import sys\n"
            "for m in ('ray', 'deepspeed', 'trl', 'vllm', 'bitsandbytes'): sys.modules[m] = None\n"
            f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
            "import memory_validation, qlora_check\n"
            f"sys.exit(memory_validation.main(['--dry-run', '--out', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from memory_validation import sft_loss
    finally:
        sys.path.pop(0)
    logits, labels = torch.randn(1, 12, 50), torch.randint(0, 50, (1, 12))
    labels[0, :4] = -100
    assert sft_loss(logits, labels).item() == pytest.approx(CrossEntropyLoss()(logits, labels)[0].item(), rel=1e-6)
