"""Log-likelihood scoring with a frozen copy of a model: multiple choice and held-out loss.

Both are per-sequence sums of assistant-token log-probs over packed rows, computed by a
``ReferenceWorker`` (the same actor DPO uses for its reference), so a model is scored on GPU or
CPU exactly as the trainers compute log-probs.
"""

from __future__ import annotations

import math

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.data.chat import tokenize_completion, tokenize_conversation
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.training.losses import sequence_logps
from rayalign.workers.reference import ReferenceWorker

from rayalign_eval.benchmarks import ChoiceItem


def sequence_scores(model, batch):
    """Summed log-prob of each packed sequence's labelled tokens, and how many there were."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return sequence_logps(logits, batch["labels"], batch["sequence_ids"], int(batch["sequence_ids"].max()) + 1)


def packed(sequences: list, max_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """Rows of at most ``max_tokens`` tokens, and which sequence each row's k-th sequence is."""
    groups = group_by_tokens([len(s) for s in sequences], max_tokens, 0)
    return [collate_packed([sequences[i] for i in g]) for g in groups], groups


def score_sequences(ctx, placement, model: str, sequences: list, max_tokens: int, label: str
                    ) -> list[tuple[float, float]]:
    """(sum of log-probs, token count) per sequence, in input order."""
    if not sequences:
        return []
    batches, groups = packed(sequences, max_tokens)
    group = WorkerGroup(f"{ctx.actor_prefix}/scorer-{label}", ReferenceWorker, placement,
                        lambda r: (model, int(placement.num_cpus)))
    try:
        results = group.run(lambda a, r: a.score.remote(sequence_scores, batches), ctx.run.timeouts.step_s)[0]
    finally:
        group.shutdown()
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(sequences)
    for g, (sums, counts) in zip(groups, results):
        for k, i in enumerate(g):
            out[i] = (float(sums[k]), float(counts[k]))
    return out


def choice_sequences(tok, items: list[ChoiceItem], max_length: int) -> list:
    return [tokenize_completion(tok, item.prompt, [{"role": "assistant", "content": c}], max_length,
                                where=f"choices {item.id}")
            for item in items for c in item.choices]


def choice_metrics(items: list[ChoiceItem], scores: list[tuple[float, float]]) -> tuple[dict, list[dict]]:
    rows, correct, correct_norm, k = [], 0, 0, 0
    for item in items:
        sums = [scores[k + j][0] for j in range(len(item.choices))]
        k += len(item.choices)
        per_char = [s / max(1, len(c)) for s, c in zip(sums, item.choices)]
        pick = max(range(len(sums)), key=sums.__getitem__)
        pick_norm = max(range(len(per_char)), key=per_char.__getitem__)
        correct += pick == item.answer
        correct_norm += pick_norm == item.answer
        rows.append({"id": item.id, "logprobs": sums, "predicted": pick, "predicted_norm": pick_norm,
                     "answer": item.answer, "correct": pick == item.answer})
    n = max(1, len(items))
    return {"mc_accuracy": correct / n, "mc_accuracy_norm": correct_norm / n}, rows


def heldout_sequences(tok, records: list[dict], max_length: int) -> list:
    seqs = [tokenize_conversation(tok, r["messages"], max_length, where=f"held-out #{i}") for i, r in enumerate(records)]
    return [s for s in seqs if s.num_trained]


def heldout_metrics(scores: list[tuple[float, float]]) -> dict:
    total, count = sum(s for s, _ in scores), sum(c for _, c in scores)
    loss = -total / max(1.0, count)
    return {"heldout_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "heldout_tokens": count}
