"""QLoRA: refused on CPU at validation with one line; the GPU path's config plumbing and its merge on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from rayalign.config import RunConfig, StageEntry
from rayalign.errors import ConfigError
from rayalign.training.qlora_requirements import NEEDS_GPU, require_gpu_for_qlora
from rayalign.workers.quantization import load_qlora_model, save_qlora
from rayalign_sft.stage import SFTConfig

from conftest import REPO


def test_cpu_run_with_qlora_stops_at_validation_with_one_line(tmp_path):
    config = tmp_path / "qlora.yaml"
    out = tmp_path / "run"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "stages": [{"sft": {"qlora": {"r": 8}}}]}))
    result = subprocess.run([sys.executable, "-m", "rayalign.cli", "run", str(config)], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "rayalign: config error: stages[0].sft.qlora: QLoRA needs a GPU (with bitsandbytes); "
        "resources.trainer.num_gpus is 0 (use `lora` on CPU)")
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("options, message", [
    ({"qlora": {"r": 8}, "lora": {"r": 8}}, "set either lora or qlora, not both"),
    ({"qlora": {"r": 8}, "zero_stage": 3}, "QLoRA trains with zero_stage 2"),
])
def test_qlora_config_errors_on_a_gpu_run(options, message):
    run = RunConfig.model_validate({"resources": {"trainer": {"num_gpus": 1}}})
    entries = [StageEntry(name="sft", config=SFTConfig.model_validate(options))]
    with pytest.raises(ConfigError, match=rf"stages\[0\].sft.qlora: {message}"):
        require_gpu_for_qlora(run, entries)


def test_qlora_options_reach_the_trainer_spec():
    spec = SFTConfig.model_validate({"qlora": {"r": 4, "target_modules": ["q_proj", "down_proj"]}}).spec("m", 10, 0)
    assert spec.qlora.r == 4 and spec.qlora.target_modules == ["q_proj", "down_proj"] and spec.lora is None


def test_loading_on_a_cpu_device_says_it_needs_a_gpu(tiny_model_path):
    import torch

    spec = SFTConfig.model_validate({"qlora": {"r": 4}}).spec(tiny_model_path, 10, 0)
    with pytest.raises(RuntimeError, match=NEEDS_GPU.replace("(", r"\(").replace(")", r"\)")):
        load_qlora_model(spec, torch.device("cpu"))


def test_save_writes_the_adapter_and_merges_it_into_the_bf16_base(tmp_path, tiny_model_path):
    """The merge path of save_qlora, with a LoRA model that is not quantised (no GPU here)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    spec = SFTConfig.model_validate({"qlora": {"r": 4}}).spec(tiny_model_path, 10, 0)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=spec.qlora.target_modules, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    save_qlora(model, spec, str(tmp_path / "model"))
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        want, got, before = model(ids).logits, merged(ids).logits.float(), base(ids).logits
    assert (got - want).abs().max() < 0.05  # bf16 rounding only
    assert (before - want).abs().max() > 0.2  # and the adapter is in it
    assert merged.config.use_cache and (tmp_path / "model" / "tokenizer_config.json").exists()
