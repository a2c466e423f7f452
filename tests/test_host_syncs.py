"""A training step reads its metrics from the device once, however many micro-batches it runs.

On a GPU every ``.item()`` (or ``float()``, ``.tolist()``, ``bool()``) of a device tensor makes the
host wait until the GPU has caught up, so the next micro-batch's kernels are queued only after the
queue drained. This machine has no GPU, so a ``TorchFunctionMode`` stands in for one: it counts
every such read made by rayalign's own code (transformers' and DeepSpeed's are theirs) during a
real ``TrainerWorker.train_step`` under DeepSpeed ZeRO-2 (gloo, in this process).
"""

from __future__ import annotations

import socket
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import REPO
from rayalign.data.chat import tokenize_completion, tokenize_conversation
from rayalign.data.packing import collate_packed
from rayalign.data.synthetic import SyntheticWorld
from rayalign.training.host_metrics import metrics_to_host
from rayalign.training.loop import to_numpy

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
OURS = (str(REPO / "platform"), str(REPO / "plugins"))
TORCH = str(Path(torch.__file__).parent)


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python made by rayalign's code, by file:line."""

    def __init__(self, also: tuple[str, ...] = ()):
        super().__init__()
        self.reads: Counter = Counter()
        self.names = HOST_READS | set(also)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.names:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back  # torch's own dispatch frames: find who asked
            if frame is not None and frame.f_code.co_filename.startswith(OURS):
                self.reads[f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def trainer(tiny_model_path):
    from rayalign.workers.trainer import TrainerWorker, TrainSpec
    from rayalign_sft.loss import CrossEntropyLoss
    from rayalign_sft.stage import SFTObjective

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    worker = TrainerWorker(0, 1)  # in this process (it caps torch's threads, as in an actor)
    spec = TrainSpec(model_path=tiny_model_path, total_steps=20, lr=1e-4, warmup_ratio=0.0, grad_accum=3, bf16=False)
    try:
        worker.setup(("127.0.0.1", port), spec, SFTObjective(CrossEntropyLoss()))
        yield worker
    finally:
        worker.shutdown()
        torch.set_num_threads(threads)


def sft_rows(tokenizer) -> list[dict]:
    examples = SyntheticWorld(0).chat_examples()[:6]
    return [to_numpy(collate_packed([tokenize_conversation(tokenizer, e["messages"], 256) for e in pair]))
            for pair in zip(examples[0::2], examples[1::2])]


def dpo_rows(tokenizer, model) -> list[dict]:
    from rayalign_dpo.losses import SigmoidDPOLoss
    from rayalign_dpo.stage import DPOObjective

    rows = []
    for p in SyntheticWorld(0).preference_pairs()[:3]:
        prompt = [{"role": "user", "content": p["prompt"]}]
        row = collate_packed([tokenize_completion(tokenizer, prompt, [{"role": "assistant", "content": a}], None)
                              for a in (p["chosen"], p["rejected"])])
        row["num_sequences"] = 2  # as DPOStage._batches counts them on the host
        with torch.no_grad():
            row["ref_chosen"], row["ref_rejected"] = DPOObjective(SigmoidDPOLoss()).logps(model, row)
        rows.append(to_numpy(row))
    return rows


@pytest.mark.parametrize("stage, logits", [("sft", "full"), ("sft", "labelled"), ("dpo", "full"), ("dpo", "labelled")])
def test_a_step_reads_its_metrics_from_the_device_once(trainer, tokenizer, tiny_model_path, stage, logits):
    from transformers import AutoModelForCausalLM

    from rayalign_dpo.losses import SigmoidDPOLoss
    from rayalign_dpo.stage import DPOObjective
    from rayalign_sft.loss import CrossEntropyLoss
    from rayalign_sft.stage import SFTObjective

    if stage == "sft":
        trainer.objective, rows = SFTObjective(CrossEntropyLoss(), logits=logits), sft_rows(tokenizer)
    else:
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        trainer.objective = DPOObjective(SigmoidDPOLoss(), sft_weight=0.5, logits=logits)
        rows = dpo_rows(tokenizer, reference)
    trainer.load_batches(rows)
    for n in (1, 3):  # one micro-batch, then three: the reads must not grow with them
        with HostReads() as counted:
            metrics = trainer.train_step(list(range(n)), [1.0] * n)
        assert sum(counted.reads.values()) == 1, dict(counted.reads)
        assert next(iter(counted.reads)).startswith("host_metrics.py:")
        assert metrics["loss"] == metrics["loss"] and metrics["grad_norm"] > 0  # real values came back
        assert metrics["count"] > 0 and isinstance(metrics["loss"], float)
    with HostReads() as counted:
        evaluated = trainer.evaluate([0, 1, 2])
    assert sum(counted.reads.values()) == 1 and len(evaluated) == 3 and isinstance(evaluated[0]["loss"], float)


def rl_row(tokenizer) -> dict:
    """Two packed answers with what the RL trainer's rows carry: old log-probs, advantages, values."""
    examples = SyntheticWorld(0).chat_examples()[:2]
    row = collate_packed([tokenize_conversation(tokenizer, e["messages"], 256) for e in examples])
    length = row["input_ids"].shape[1]
    generator = torch.Generator().manual_seed(0)
    for key in ("old_logps", "ref_logps", "advantages", "old_values", "returns"):
        row[key] = -torch.rand(1, length, generator=generator)
    row["num_sequences"] = 2
    return row


@pytest.mark.parametrize("objective", ["policy_token_mean", "policy_sequence_mean", "value", "reward"])
def test_rl_and_reward_objectives_leave_their_metrics_on_the_device(tokenizer, tiny_model_path, objective):
    """No read of a value into Python while a micro-batch's loss and metrics are computed: the
    trainer's one read per step (above) is all there is. ``nonzero`` counts too here: its output
    size is read back from the device."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rayalign_rl.losses import ClippedPolicyLoss, ClippedValueLoss
    from rayalign_rl.objectives import PolicyObjective, ValueObjective
    from rayalign_rm.loss import BradleyTerryLoss
    from rayalign_rm.stage import RewardObjective

    row = rl_row(tokenizer)
    if objective.startswith("policy"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        loss = ClippedPolicyLoss(0.2, 0.2, kl_coef=0.05, aggregation=objective.removeprefix("policy_"))
        fn = PolicyObjective(loss, kl_in_loss=True)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1, dtype=torch.float32)
        fn = ValueObjective(ClippedValueLoss()) if objective == "value" else RewardObjective(BradleyTerryLoss())
    with HostReads(also=("nonzero",)) as reads:
        value, metrics = fn(model, row)
        value.backward()
    assert not reads.reads, dict(reads.reads)
    assert metrics and all(isinstance(v, (torch.Tensor, float)) for v in metrics.values())
    host = metrics_to_host([metrics])[0]  # what the trainer does once a step
    assert all(isinstance(v, float) and v == v for v in host.values()), host
    assert host["count"] > 0
