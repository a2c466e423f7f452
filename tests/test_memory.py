"""Memory planner: parameter counts match transformers, ZeRO accounting, the CLI, the pipeline's refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from rayalign.errors import ConfigError
from rayalign.memory import LOGITS_BYTES, LOGITS_BYTES_CUDA, GiB, ModelShape, TrainingPlan, estimate

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
    z3 = parts(zero=3, gpus=4)
    assert z3["weights"] == p / 2 and z3["gradients"] == 1.5 * p and z3["optimizer states"] == 3 * p
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
    assert logits == 4096 * 151936 * LOGITS_BYTES_CUDA


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


def test_benchmark_estimates_and_cpu_step(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import memory_validation as mv
    finally:
        sys.path.pop(0)
    assert mv.main(["--dry-run", "--sizes", "0.5b,1.5b", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "memory_validation.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["estimate_gib"] > 1 for r in rows)
    assert {r["method"] for r in rows} == {"full", "lora"} and {r["grad_ckpt"] for r in rows} == {True, False}
    import torch

    for method in ("full", "lora"):  # the real training step, on CPU with a tiny shape
        case = mv.Case("tiny", "tiny", method, seq=16, micro_batch=2, grad_ckpt=method == "lora")
        out = mv.run_case(case, torch.device("cpu"), steps=3)
        assert out["losses"][-1] < out["losses"][0]  # it trains
    row = mv.compare({"name": "x", "seq": 8, "micro_batch": 1, "estimate_gib": 11.0, "measured_gib": 10.0})
    assert row["error"] == pytest.approx(0.1) and row["within_15pct"]


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
