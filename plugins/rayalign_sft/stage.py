"""Supervised fine-tuning on chat data: assistant tokens only, packed rows, DeepSpeed trainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from rayalign.data.chat_tokens import tokenize_chats
from rayalign.data.datasets import load_records, split
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.sources import data_keys, dataset_path
from rayalign.errors import ConfigError, DataError
from rayalign.stage import Stage, StageResult
from rayalign.training.labelled_logps import label_targets, labelled_token_logps, wants_labelled
from rayalign.training.linear_cross_entropy import linear_cross_entropy_sum
from rayalign.training.loop import TrainerSession, TrainingConfig, check_kernels
from rayalign.training.losses import IGNORE_INDEX, Loss, build_loss
from rayalign.training.output_head import split_output_head

SFTLogitsMode = Annotated[Literal["auto", "full", "labelled", "fused"], Field(
    description="auto: labelled on a GPU where the loss allows it, else full; full: the model's logits at every "
                "position; labelled: the output head only where the next token is trained, cross-entropy and its "
                "gradient in chunks, logits never whole (the built-in `sft` loss; others by token log-probs); "
                "fused: the same by Liger's fused linear cross-entropy kernel (GPU, liger-kernel)")]


class SFTConfig(TrainingConfig):
    dataset: str = Field("sft", description="key under `data:` naming the chat dataset (null: synthetic), or a dataset "
                         "an earlier stage produces (`curated` from curate, `distilled` from distill)")
    eval_dataset: str | None = Field(None, description="an earlier stage's dataset used for the eval loss instead "
                                     "of a split of `dataset` (e.g. `curated_validation`)")
    loss: str = Field("sft", description="registered loss applied to the logits")
    epochs: int = Field(3, ge=1, description="passes over the training split")
    max_length: int = Field(1024, ge=8, description="tokens per conversation after the chat template; a longer one "
                            "is a bad record (`data.bad_records`), never truncated")
    logits: SFTLogitsMode = "auto"


@dataclass
class SFTObjective:
    """One packed row through the model, then the configured token loss, by the ``logits`` mode:

    - ``full``: on the model's logits;
    - ``labelled``: the loss from the labelled positions only. The mean NLL (``token_mean_nll``
      losses, as the built-in ``sft``) by ``linear_cross_entropy_sum`` on their hidden states:
      head, cross-entropy and gradients a chunk at a time, no logits kept and none recomputed.
      Any other loss by ``labelled_token_logps`` (training/labelled_logps.py);
    - ``fused``: as labelled, with Liger's fused linear cross-entropy kernel (training/liger.py);
    - ``auto``: labelled when the row is on a GPU and the loss allows it, else full.

    ``labelled=True`` is ``logits="labelled"``.
    """

    loss: Loss
    labelled: bool = False
    logits: str = "full"

    @property
    def mode(self) -> str:
        return "labelled" if self.labelled else self.logits

    def __call__(self, model, batch):
        mode = self.mode
        if mode == "fused":
            return self._nll_from_hidden(model, batch, liger=True)
        if wants_labelled(mode, batch, loss_allows=not self.loss.needs_logits):
            if self.loss.token_mean_nll:
                return self._nll_from_hidden(model, batch, liger=False)
            scored = labelled_token_logps(model, batch)
            return self.loss.from_token_logps(scored.logps, scored.mask)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return self.loss(logits, batch["labels"])

    def _nll_from_hidden(self, model, batch, liger: bool):
        split = split_output_head(model)
        if split is None:
            if liger:
                raise ConfigError("logits", "'fused' needs a causal LM whose logits are its output head's "
                                  "(Llama, Qwen, Mistral families), trained under ZeRO-2")
            scored = labelled_token_logps(model, batch)
            return self.loss.from_token_logps(scored.logps, scored.mask)
        targets, mask, positions = label_targets(batch)
        hidden = split.hidden_states(batch)[:, positions]
        hidden = hidden.reshape(-1, hidden.size(-1))
        kept = targets[:, positions].reshape(-1)  # IGNORE_INDEX where a row has no label there
        if liger:
            from rayalign.training.liger import fused_nll_sum

            total = fused_nll_sum(split, hidden, kept)
        else:
            total = linear_cross_entropy_sum(hidden, split.head.weight, split.head.bias, kept)
        return self.loss.from_nll_sum(total, mask.sum())

    def weight(self, batch) -> float:
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def pack(tokenized: list, max_tokens: int, seed: int) -> list[dict]:
    groups = group_by_tokens([len(t) for t in tokenized], max_tokens, seed)
    return [collate_packed([tokenized[i] for i in g]) for g in groups]


class SFTStage(Stage):
    """Fine-tune on conversations; loss on assistant turns; eval loss on a held-out split."""

    name = "sft"
    Config = SFTConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        self.loss = build_loss(plugins.losses, cfg.loss, "sft", cfg.loss_options, f"stages[{index}].sft.loss",
                               f"stages[{index}].sft.loss_options")
        self.loss_cls = type(self.loss)
        if cfg.logits == "labelled" and self.loss_cls.needs_logits:
            raise ConfigError(f"stages[{index}].sft.logits", f"'labelled' needs a loss that works from token "
                              f"log-probs; loss {cfg.loss!r} needs the logits (use logits: full)")
        if cfg.logits == "fused":
            if self.loss_cls.needs_logits or not self.loss_cls.token_mean_nll:
                raise ConfigError(f"stages[{index}].sft.logits", f"'fused' computes the mean token NLL (the `sft` "
                                  f"loss); loss {cfg.loss!r} is another (use logits: labelled or full)")
            check_kernels("liger", run, f"stages[{index}].sft.logits")
        check_kernels(cfg.kernels, run, f"stages[{index}].sft.kernels")
        self.formats, self.train = plugins.formats, None
        if cfg.dataset in data_keys(run) and cfg.eval_dataset is None:
            path = dataset_path(run, cfg.dataset, where=f"stages[{index}].sft.dataset")
            self._load(path, None, run, artifacts.model)
        # else: an earlier stage's dataset (curated, distilled), which exists once that stage ran: run() loads it.
        for key, name in (("dataset", cfg.dataset), ("eval_dataset", cfg.eval_dataset)):
            if name is not None and name not in data_keys(run):
                artifacts.expect_dataset(name, f"stages[{index}].sft.{key}", tried="no key under data:")

    def _load(self, path: str | None, eval_path: str | None, run, model: str) -> None:
        records, self.source = load_records(path, "chat", self.formats, run.seed)
        # Tokenized before any training, so an over-long conversation is a bad record of the
        # preflight (skipped and counted, or the run's one-line error), never a truncated one.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        # From the token cache when this data and tokenizer were seen before (a restarted run).
        tokenize = lambda rs: tokenize_chats(rs, tok, self.config.max_length)[1]  # noqa: E731
        if eval_path is None:
            self.train, self.eval = split(tokenize(records), run.data.eval_fraction, run.seed)
        else:
            self.train, self.eval = tokenize(records), tokenize(load_records(eval_path, "chat", self.formats, run.seed)[0])

    def _produced(self, ctx, name: str, key: str) -> str | None:
        if name in ctx.artifacts.datasets:
            return ctx.artifacts.datasets[name]
        if name in data_keys(ctx.run):
            return getattr(ctx.run.data, name)
        produced = ", ".join(sorted(ctx.artifacts.datasets)) or "none"
        raise ConfigError(f"stages[{ctx.index}].sft.{key}", f"{name!r} is no key under data: and no earlier stage "
                          f"produced a dataset of that name (produced: {produced})")

    def run(self, ctx):
        cfg = self.config
        if self.train is None:
            eval_path = self._produced(ctx, cfg.eval_dataset, "eval_dataset") if cfg.eval_dataset else None
            self._load(self._produced(ctx, cfg.dataset, "dataset"), eval_path, ctx.run, ctx.artifacts.model)
        train, held = self.train, self.eval
        if not train:
            raise DataError(self.source, "no training examples left after the held-out split (data.eval_fraction)")
        train_batches = pack(train, cfg.max_tokens_per_micro_batch, ctx.run.seed)
        eval_batches = pack(held, cfg.max_tokens_per_micro_batch, ctx.run.seed)
        objective = SFTObjective(self.loss, logits=cfg.logits)
        with ctx.cluster.reserve(ctx.name, ["trainer"]) as placement:
            session = TrainerSession(ctx, placement["trainer"], cfg, objective, train_batches, eval_batches)
            before, history, after = session.train_and_save(str(ctx.work_dir / "model"))
        ctx.log.info(
            "[%s] eval loss %.4f -> %.4f over %d steps",
            ctx.name, before.get("loss", float("nan")), after.get("loss", float("nan")), len(history),
        )
        return StageResult(
            model="model",
            metrics={
                "eval_loss_before": before.get("loss"),
                "eval_loss": after.get("loss"),
                "train_loss": history[-1]["loss"] if history else None,
                "steps": len(history),
                "train_examples": len(train),
                "eval_examples": len(held),
                "train_tokens": sum(len(t) for t in train),
                "history": history,
                **session.reliability,
            },
        )
