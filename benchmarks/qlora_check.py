"""Check QLoRA on a GPU without Ray or DeepSpeed: 4-bit base, adapter training, adapter + merged output.

Builds a Qwen2-0.5B-shaped model with random weights locally (nothing downloaded), then through
``rayalign.workers.quantization``:

1. loads it in 4 bits (NF4, double quantisation) with LoRA adapters; checks the linear layers are
   4-bit and only the adapters train;
2. trains the adapters for a few AdamW steps on one repeated packed row (the loss must fall) and
   records peak memory next to the planner's QLoRA estimate;
3. saves the adapter and the merged bf16 model, reloads the merged one with transformers and checks
   its logits against the adapter over the bf16 base;
4. with vLLM installed, generates with the merged model and with the adapter (LoRARequest).

Writes ``$OUT/<gpu>-<yyyymmdd>-qlora_check.json`` (``common.write_result``: command, git state,
versions, device); exits 1 when a check fails.

    PYTHONPATH=/tmp/site:platform:plugins python benchmarks/qlora_check.py   # bitsandbytes in /tmp/site
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rayalign.memory import GiB, ModelShape, TrainingPlan, estimate


sys.path.insert(0, str(Path(__file__).parent))  # memory_validation and common, beside this file


def build_base(dest: Path, size: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from memory_validation import SHAPES

    from rayalign.data.synthetic import SyntheticWorld
    from rayalign.embedded import build_tokenizer

    tok = build_tokenizer(SyntheticWorld(0).corpus(), vocab_size=600)
    # The real vocabulary size (memory as in the real model); the tokenizer uses its first 600 ids.
    config = Qwen2Config(**SHAPES[size], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(dest)
    tok.save_pretrained(dest)
    AutoTokenizer.from_pretrained(dest)
    return dest


def main() -> int:
    import torch

    from memory_validation import sft_loss

    from rayalign.workers.quantization import load_qlora_model, save_qlora
    from rayalign.workers.trainer import LoraSpec, TrainSpec

    from common import write_result

    out_dir = Path(os.environ.get("OUT", "."))
    result: dict = {"benchmark": "qlora_check", "checks": {}}
    checks = result["checks"]
    work = Path(tempfile.mkdtemp(prefix="qlora-check-"))
    base = build_base(work / "base", "0.5b")
    seq, micro_batch = 2048, 2
    spec = TrainSpec(str(base), total_steps=10, qlora=LoraSpec(r=16, alpha=32))  # what `sft: {qlora: ...}` sends

    torch.cuda.reset_peak_memory_stats()
    model = load_qlora_model(spec, torch.device("cuda", 0))
    import bitsandbytes as bnb

    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    shape = ModelShape.from_dir(base)
    checks["linear_layers_4bit"] = n4 == 7 * shape.layers
    checks["only_adapters_train"] = sum(p.numel() for p in trainable) == shape.lora_params(16, spec.qlora.target_modules)

    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 600, (1, seq * micro_batch), device="cuda")
    positions = torch.arange(seq, device="cuda").repeat(micro_batch)[None]
    losses, started = [], time.time()
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        loss = sft_loss(logits, ids)
        del logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    result.update(losses=losses, seconds=round(time.time() - started, 2),
                  peak_gib=torch.cuda.max_memory_allocated() / GiB)
    plan = TrainingPlan(method="qlora", zero=0, seq=seq, micro_batch=micro_batch, lora_r=16)
    result["estimate_gib"] = estimate(shape, plan).training_peak / GiB
    checks["loss_falls"] = losses[-1] < losses[0]

    save_qlora(model, spec, str(work / "model"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16).cuda()
    over_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda(),
                                          work / "model" / "adapter")
    probe = ids[:, :256]
    with torch.no_grad():
        a, b = merged(probe).logits.float(), over_bf16(probe).logits.float()
    result["merged_vs_adapter_max_abs"] = (a - b).abs().max().item()
    checks["merged_matches_adapter"] = result["merged_vs_adapter_max_abs"] < 0.1
    checks["adapter_saved"] = (work / "model" / "adapter" / "adapter_config.json").exists()
    del model, merged, over_bf16
    torch.cuda.empty_cache()

    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        result["vllm"] = "not installed: skipped"
    else:
        greedy = SamplingParams(max_tokens=8, temperature=0)
        llm = LLM(str(work / "model"), enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=512)
        merged_out = llm.generate(["Hello"], greedy)[0].outputs[0]
        del llm
        llm = LLM(str(base), enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=512, enable_lora=True,
                  max_lora_rank=16)
        adapter = LoRARequest("adapter", 1, str(work / "model" / "adapter"))
        adapter_out = llm.generate(["Hello"], greedy, lora_request=adapter)[0].outputs[0]
        # Token ids, not only text: random weights mostly pick ids past the tokenizer's 600, which
        # decode to nothing, so an empty text says nothing about whether vLLM generated.
        result["vllm"] = {name: {"text": out.text, "token_ids": list(out.token_ids)}
                          for name, out in (("merged", merged_out), ("adapter", adapter_out))}
        checks["vllm_serves_both"] = all(len(out.token_ids) > 0 for out in (merged_out, adapter_out))

    result["ok"] = all(checks.values())
    print(json.dumps(result, indent=2))
    write_result(out_dir, "qlora_check", result)  # with the command, git state, versions and device
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
