"""The fast paths the GPU defaults take equal the plain ones: losses within 1e-5 and gradients within
1e-4 in fp32 on CPU where a path runs there; the kernels that only run on a GPU (varlen flash
attention, Liger's Triton kernels) are compared with the plain path by the ``gpu`` tests below,
which CI skips (run them on the GPU machine: ``pytest -m gpu tests/test_fast_paths.py``)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from rayalign.data.chat import tokenize_conversation
from rayalign.data.packing import collate_packed
from rayalign.data.synthetic import SyntheticWorld
from rayalign.training.linear_cross_entropy import linear_cross_entropy_sum
from rayalign.training.losses import IGNORE_INDEX
from rayalign.training.output_head import split_output_head
from rayalign_sft.loss import CrossEntropyLoss
from rayalign_sft.stage import SFTObjective

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs a GPU: CI is CPU-only (run on the GPU machine, docs/performance.md)")


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def sequences(tokenizer):
    return [tokenize_conversation(tokenizer, e["messages"], 256) for e in SyntheticWorld(0).chat_examples()[:6]]


@pytest.fixture(scope="module")
def sft_batch(sequences) -> dict:
    return collate_packed(sequences)


def loss_and_grads(model, objective, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = objective(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_same(a: tuple, b: tuple, loss_tol: float = LOSS_TOL, grad_tol: float = GRAD_TOL) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) < loss_tol, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    assert worst < grad_tol, worst


def test_linear_cross_entropy_has_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = IGNORE_INDEX  # untrained positions: no loss, no gradient
    count = int((targets != IGNORE_INDEX).sum())

    def run(fn):
        loss = fn() / count
        (0.7 * loss).backward()  # an upstream scale, as the trainer's per-micro-batch weight
        grads = [t.grad.clone() for t in (hidden, weight, bias)]
        for t in (hidden, weight, bias):
            t.grad = None
        return loss.item(), grads

    fused = run(lambda: linear_cross_entropy_sum(hidden, weight, bias, targets, rows=8))  # 8 does not divide 37
    plain = run(lambda: F.cross_entropy(hidden @ weight.t() + bias, targets, ignore_index=IGNORE_INDEX,
                                        reduction="sum"))
    assert abs(fused[0] - plain[0]) < LOSS_TOL
    for a, b in zip(fused[1], plain[1]):
        assert (a - b).abs().max().item() < GRAD_TOL
    assert fused[1][0][::5].abs().max().item() == 0.0
    with torch.no_grad():  # evaluation: the value only, no gradients kept
        assert abs(linear_cross_entropy_sum(hidden, weight, bias, targets).item() / count - plain[0]) < LOSS_TOL


def test_sft_labelled_paths_equal_the_full_logits(model, sft_batch):
    """``labelled`` takes the fused linear cross-entropy for the built-in loss and the chunked
    token log-probs for any other token loss; both equal the loss on the full logits."""

    class TokenLogpsOnly(CrossEntropyLoss):  # the same loss, through ``from_token_logps``
        name = "token_logps_only"
        token_mean_nll = False

    full = loss_and_grads(model, SFTObjective(CrossEntropyLoss(), logits="full"), sft_batch)
    assert_same(loss_and_grads(model, SFTObjective(CrossEntropyLoss(), logits="labelled"), sft_batch), full)
    assert_same(loss_and_grads(model, SFTObjective(TokenLogpsOnly(), logits="labelled"), sft_batch), full)


def test_a_model_whose_logits_are_not_its_heads_is_never_taken_apart(tiny_model_path, sft_batch):
    """A family that soft-caps or scales its logits keeps its own forward (``logits_to_keep``):
    the head's output alone would not be its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    assert split_output_head(model) is not None
    model.config.model_type = "gemma2"  # a family with final_logit_softcapping
    assert split_output_head(model) is None
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    try:
        labelled = loss_and_grads(model, SFTObjective(CrossEntropyLoss(), logits="labelled"), sft_batch)
    finally:
        hook.remove()
    assert seen == [int((sft_batch["labels"][0, 1:] != IGNORE_INDEX).sum())]  # the model's forward, kept positions
    assert_same(labelled, loss_and_grads(model, SFTObjective(CrossEntropyLoss(), logits="full"), sft_batch))


def test_auto_takes_the_full_logits_on_cpu(model, sft_batch):
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    try:
        with torch.no_grad():
            SFTObjective(CrossEntropyLoss(), logits="auto")(model, sft_batch)
    finally:
        hook.remove()
    assert seen == [torch.Size([1, sft_batch["input_ids"].shape[1], model.config.hidden_size])]


def test_attention_auto_is_varlen_on_cuda_and_sdpa_on_cpu(tiny_model_path):
    from rayalign.training.attention import resolve_attention

    assert resolve_attention("auto", "cpu", tiny_model_path) == "sdpa"
    assert resolve_attention("auto", "cuda", tiny_model_path) == "rayalign_packed"  # torch >= 2.10, Llama family
    assert resolve_attention("eager", "cuda", tiny_model_path) == "eager"  # an explicit choice is kept
    # rayalign's own varlen implementation is registered with transformers on the way, so it loads.
    from transformers import AttentionInterface

    assert resolve_attention("rayalign_packed", "cpu") == "rayalign_packed"
    assert "rayalign_packed" in AttentionInterface()


@pytest.mark.parametrize("attention", ["sdpa", "rayalign_packed"])
def test_compiled_decoder_layers_equal_the_eager_model(model, sequences, sft_batch, attention):
    # compile: true. The packed attention runs eagerly inside the compiled layers (a graph break).
    import rayalign.training.packed_attention  # noqa: F401  (registers rayalign_packed)
    from rayalign.training.compiled_layers import compile_decoder_layers

    from torch._dynamo.utils import counters

    eager = copy.deepcopy(model)
    eager.set_attn_implementation(attention)
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled) == model.config.num_hidden_layers
    torch._dynamo.reset()
    counters.clear()
    # A second row of another length: shapes are dynamic, and the answers stay the same.
    for batch in (sft_batch, collate_packed(sequences[:3])):
        for logits in ("full", "labelled"):
            objective = SFTObjective(CrossEntropyLoss(), logits=logits)
            assert_same(loss_and_grads(eager, objective, batch), loss_and_grads(compiled, objective, batch))
    assert counters["stats"]["unique_graphs"] > 0  # the layers did run compiled, not eagerly


@pytest.mark.parametrize("attention", ["sdpa", "rayalign_packed"])
def test_every_decoder_layer_shares_one_compilation(attention):
    # Were each layer compiled apart (a guard on something per layer), layers past torch's recompile
    # limit (8) would silently run eagerly: a 0.5B model has 24. Without a KV cache (the trainer
    # turns it off) the layers share their graphs, however many there are.
    import rayalign.training.packed_attention  # noqa: F401  (registers rayalign_packed)
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.training.compiled_layers import compile_decoder_layers

    layers = 10
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, num_hidden_layers=layers,
                                         use_cache=False))
    model.set_attn_implementation(attention)
    compile_decoder_layers(model)
    torch._dynamo.reset()
    counters.clear()
    for length in (40, 56):
        ids = torch.randint(0, 64, (1, length))
        positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])[None]  # two sequences
        model(input_ids=ids, position_ids=positions, use_cache=False).logits.sum().backward()
    assert 0 < counters["stats"]["unique_graphs"] < layers, dict(counters["stats"])


def test_liger_refuses_to_start_on_cpu_with_one_line(tiny_model_path, model):
    from rayalign.config import RunConfig
    from rayalign.errors import ConfigError
    from rayalign.plugins import get_plugin_manager
    from rayalign.stage import Artifacts
    from rayalign.training.liger import apply_liger_kernels
    from rayalign_dpo.stage import DPOStage
    from rayalign_sft.stage import SFTStage

    with pytest.raises(ConfigError, match=r"^config error: kernels: liger kernels are Triton kernels and need a "
                                          r"CUDA GPU; this trainer runs on cpu$"):
        apply_liger_kernels(copy.deepcopy(model), "cpu")
    run = RunConfig.model_validate({"model": tiny_model_path, "stages": [{"sft": {}}]})  # CPU trainers
    plugins = get_plugin_manager()
    cases = [(SFTStage(SFTStage.Config(logits="fused")), r"stages\[0\]\.sft\.logits"),
             (SFTStage(SFTStage.Config(kernels="liger")), r"stages\[0\]\.sft\.kernels"),
             (DPOStage(DPOStage.Config(kernels="liger")), r"stages\[0\]\.dpo\.kernels")]
    for stage, where in cases:
        with pytest.raises(ConfigError) as caught:
            stage.prepare(run, plugins, Artifacts(model=tiny_model_path), 0)
        message = str(caught.value)
        assert "\n" not in message and re.match(
            rf"config error: {where}: liger kernels are Triton kernels and need GPU trainers", message), message


# -- on the GPU machine ----------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
def test_linear_cross_entropy_on_gpu_in_bf16():
    torch.manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (0.05 * torch.randn(32000, 256, device="cuda")).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 32000, (3000,), device="cuda")
    targets[::7] = IGNORE_INDEX
    results = []
    for fn in (lambda: linear_cross_entropy_sum(hidden, weight, None, targets, rows=1024),
               lambda: F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE_INDEX,
                                       reduction="sum")):
        loss = fn() / 3000
        loss.backward()
        results.append((loss.item(), hidden.grad.float().clone(), weight.grad.float().clone()))
        hidden.grad = weight.grad = None
    (a, ha, wa), (b, hb, wb) = results
    assert abs(a - b) < 1e-3 * abs(b)
    assert (ha - hb).abs().max().item() < 1e-2 * hb.abs().max().item()
    assert (wa - wb).abs().max().item() < 1e-2 * wb.abs().max().item()


@needs_gpu
@pytest.mark.gpu
def test_the_trainers_gpu_defaults_train(tiny_model_path, sft_batch):
    """A real DeepSpeed ZeRO-2 trainer on the GPU with every default: varlen attention, bf16 weights,
    fused AdamW, the ZeRO bucket settings, logits auto (labelled). Its first loss is the fp32
    full-logits loss (to bf16 precision) and a few steps lower it."""
    import socket

    from rayalign.training.loop import to_numpy
    from rayalign.workers.trainer import TrainerWorker, TrainSpec

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    worker = TrainerWorker(0, 1)  # in this process (it caps torch's threads, as in an actor)
    spec = TrainSpec(model_path=tiny_model_path, total_steps=4, lr=1e-3, warmup_ratio=0.0)
    try:
        worker.setup(("127.0.0.1", port), spec, SFTObjective(CrossEntropyLoss(), logits="auto"))
        assert worker.spec.attn_implementation == "rayalign_packed"
        assert worker.engine.module.dtype == torch.bfloat16
        assert worker.engine.optimizer.optimizer.defaults.get("fused") is True
        worker.load_batches([to_numpy(sft_batch)])
        steps = [worker.train_step([0], [1.0]) for _ in range(4)]
    finally:
        worker.shutdown()
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        expected = SFTObjective(CrossEntropyLoss(), logits="full")(fp32, sft_batch)[0].item()
    assert abs(steps[0]["loss"] - expected) < 2e-2 * expected
    assert steps[-1]["loss"] < steps[0]["loss"] and all(s["skipped"] == 0 for s in steps)


@needs_gpu
@pytest.mark.gpu
def test_liger_kernels_and_fused_loss_match_the_reference_path(model, sft_batch):
    """``kernels: liger`` + ``logits: fused`` against the plain model on the full logits (fp32)."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install liger-kernel)")
    from transformers.models.llama import modeling_llama

    from rayalign.training.liger import apply_liger_kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    row = {k: v.cuda() for k, v in sft_batch.items()}
    reference = loss_and_grads(copy.deepcopy(model).cuda(), SFTObjective(CrossEntropyLoss(), logits="full"), row)
    # Liger also patches the Llama module's RoPE function and classes: restored for the tests after this one.
    saved = {k: getattr(modeling_llama, k) for k in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    try:
        liger = copy.deepcopy(model).cuda()
        apply_liger_kernels(liger, "cuda")
        assert liger.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
        assert liger.model.norm._get_name() == "LigerRMSNorm"
        assert modeling_llama.apply_rotary_pos_emb is not saved["apply_rotary_pos_emb"]
        fused = loss_and_grads(liger, SFTObjective(CrossEntropyLoss(), logits="fused"), row)
        assert_same(fused, reference, loss_tol=1e-4, grad_tol=1e-3)
        with torch.no_grad():  # evaluation (no gradients): the same loss
            assert abs(SFTObjective(CrossEntropyLoss(), logits="fused")(liger, row)[0].item() - reference[0]) < 1e-4
    finally:
        for k, v in saved.items():
            setattr(modeling_llama, k, v)


@needs_gpu
@pytest.mark.gpu
def test_compiled_layers_match_the_eager_model_on_gpu(model, sequences, sft_batch):
    """``compile: true`` on CUDA against the same model run eagerly, on two row lengths: in fp32 (the
    per-conversation attention) loss and gradients as on CPU's bounds for a GPU; in bf16 (varlen
    flash attention, the GPU defaults) the loss within 1%."""
    import rayalign.training.packed_attention  # noqa: F401  (registers rayalign_packed)
    from rayalign.training.compiled_layers import compile_decoder_layers

    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        eager = copy.deepcopy(model).to("cuda", dtype)
        eager.set_attn_implementation("rayalign_packed")
        compiled = copy.deepcopy(eager)
        compile_decoder_layers(compiled)
        objective = SFTObjective(CrossEntropyLoss(), logits="labelled")
        for batch in (sft_batch, collate_packed(sequences[:3])):
            row = {k: v.cuda() for k, v in batch.items()}
            ours, theirs = loss_and_grads(compiled, objective, row), loss_and_grads(eager, objective, row)
            if dtype == torch.float32:
                assert_same(ours, theirs, loss_tol=1e-4, grad_tol=1e-3)
            else:
                assert abs(ours[0] - theirs[0]) < 0.01 * abs(theirs[0]), (ours[0], theirs[0])
