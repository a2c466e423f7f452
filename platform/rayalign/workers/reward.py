"""The reward-model actor: a frozen sequence-classification model that scores conversations.

Other stages send conversations as messages, not token ids, so a reward model with its own
tokenizer and chat template scores what the policy wrote as it was trained to read it.
"""

from __future__ import annotations

from rayalign.workers.base import Worker, pick_device


class RewardWorker(Worker):
    def __init__(self, model_path: str, max_length: int = 2048, max_tokens_per_batch: int = 8192, num_threads: int = 1):
        super().__init__(num_threads)
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = pick_device()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=dtype)
        self.model.to(self.device).eval()
        self.max_length, self.max_tokens = max_length, max_tokens_per_batch

    def score(self, conversations: list[list[dict]]) -> list[float]:
        """One scalar per conversation (prompt messages + the assistant's answer)."""
        import torch

        from rayalign.data.chat import Tokenized, tokenize_conversation
        from rayalign.data.packing import collate_packed, group_by_tokens
        from rayalign.training.scores import sequence_scores

        seqs = [tokenize_conversation(self.tokenizer, conv, self.max_length).input_ids for conv in conversations]
        scores = [0.0] * len(seqs)
        with torch.no_grad():
            for group in group_by_tokens([len(s) for s in seqs], self.max_tokens, seed=0):
                batch = collate_packed([Tokenized(seqs[i], list(seqs[i])) for i in group])
                out = sequence_scores(self.model, {k: v.to(self.device) for k, v in batch.items()})
                for i, value in zip(group, out.tolist()):
                    scores[i] = value
        return scores
