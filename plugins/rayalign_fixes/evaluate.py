"""Evaluate: re-measure a model on held-out prompts against a baseline; a before/after table.

For each model (the baseline, e.g. the SFT model, and the current one) the stage samples every
held-out prompt with vLLM, judges the answers, runs the detectors, and scores the held-out general
chat data with a reference worker. The table goes to the job log and to ``report.md``.

The fix trains on what its detectors flag, so the rows the fix is judged by come from judges that
share nothing with them (``rayalign.evaluation.judges``):

- seq-rep-4: Welleck et al. 2019's share of repeated 4-grams per answer, in the model's tokens, averaged;
- rep-16: share of an answer's tokens that occur among the 16 before them, averaged;
- fact error rate: share of answers stating a fact the knowledge base contradicts, or any value for
  a question the data marks unanswerable (each sentence parsed into a claim by ``fact_sentences``);
- decline rate: share of the unanswerable questions answered with a decline;
- task accuracy: share of the answerable questions answered right: no decline, no fact error, and
  every reference fact stated (without facts: the reference itself, words compared);
- held-out general loss: mean token negative log-likelihood on general chat data the model did
  not train on (the forgetting check);

and, secondary, what the fix's own detectors flag: repetition rate (looping) and hallucination
rate (contradicts the reference facts, or answers an unanswerable question instead of declining).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.data.chat import tokenize_conversation, tokenize_prompt
from rayalign.data.datasets import load_records, split
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.sources import data_keys
from rayalign.errors import ConfigError
from rayalign.evaluation.detectors import Sample, run_detectors
from rayalign.evaluation.judges import FactJudge, mean, rep_w, seq_rep_n
from rayalign.evaluation.references import load_knowledge, load_prompt_set
from rayalign.evaluation.text import DECLINE_PATTERNS, declines, distinct_n, mentions, words
from rayalign.rollout.vllm_engine import Sampling
from rayalign.sampling import sample_completions
from rayalign.stage import Produces, Stage, StageResult
from rayalign.training.losses import shifted_token_logps
from rayalign.workers.reference import ReferenceWorker

from rayalign_fixes.common import DetectorOptions, write_jsonl

ROWS = [  # (metric, label, how its change is shown)
    ("seq_rep_4", "seq-rep-4 (judge)", "relative"),
    ("rep_w", "rep-16 (judge)", "relative"),
    ("fact_error_rate", "fact error rate (judge)", "relative"),
    ("fact_error_rate_answerable", "- on answerable questions", "relative"),
    ("fact_error_rate_unanswerable", "- on unanswerable questions", "relative"),
    ("decline_rate", "decline rate (unanswerable)", "points"),
    ("accuracy", "task accuracy (answerable)", "points"),
    ("general_loss", "held-out general loss", "relative"),
    ("false_decline_rate", "declines on answerable", "points"),
    ("unchecked_rate", "answers with no checkable fact", "points"),
    ("distinct_2", "distinct-2", "points"),
    ("repetition_rate", "repetition rate (fix's detector)", "relative"),
    ("hallucination_rate", "hallucination rate (fix's detectors)", "relative"),
]


def _embedded_claims() -> dict[str, str]:
    from rayalign.data.knowledge import CLAIM_SENTENCES

    return dict(CLAIM_SENTENCES)


class EvaluateConfig(DetectorOptions):
    prompts: str = Field("synthetic:knowledge/test", description="held-out reference prompt set (JSONL path)")
    tuned_on: str | None = Field(None, description="the prompt set the recipe's hyperparameters were tuned on; "
                                 "the report says so, and warns when it is the one measured (then no test)")
    knowledge: str | None = Field("synthetic:knowledge", description="knowledge base JSONL (null: none)")
    general: str | None = Field("synthetic:knowledge/general", description="general chat data for the forgetting "
                                "loss: a key under data: (its held-out split) or a JSONL path (all of it)")
    baseline: str | None = Field("sft", description="model to compare with: an earlier stage's name, "
                                 "'base' (the run's first model), a model path, or null")
    num_prompts: int | None = Field(None, ge=1, description="use the first N prompts (null: all)")
    max_tokens: int = Field(128, ge=1, description="new tokens per answer (greedy)")
    decline_patterns: list[str] = Field(list(DECLINE_PATTERNS), description="regexes of a decline")
    fact_sentences: dict[str, str] = Field(default_factory=_embedded_claims, description="attribute -> the "
                                           "sentence that states one of its values, with {e} (the entity's name) "
                                           "and {v} (the value): how the fact judge reads claims (default: the "
                                           "embedded knowledge task's answers; {}: no fact judge)")

    @field_validator("fact_sentences")
    @classmethod
    def _one_entity_one_value(cls, sentences: dict[str, str]) -> dict[str, str]:
        for attribute, template in sentences.items():
            if template.count("{e}") != 1 or template.count("{v}") != 1:
                raise ValueError(f"{attribute}: {template!r} must hold {{e}} and {{v}} once each")
        return sentences
    max_tokens_per_micro_batch: int = Field(4096, ge=8, description="packing budget for the general loss")


def token_nll(model, batch):
    """Summed negative log-likelihood of the labelled tokens of a packed row, and their count."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    logps, mask = shifted_token_logps(logits, batch["labels"])
    return -logps.sum(), mask.sum()


def is_correct(s: Sample, fact_errors: list[str], patterns) -> bool:
    if declines(s.completion, patterns) or fact_errors:
        return False
    if s.facts:
        return all(mentions(s.completion, f) for f in s.facts)
    return words(s.completion) == words(s.reference)


def change(before: float | None, after: float | None, how: str) -> str:
    if before is None or after is None:
        return "-"
    if how == "points":
        return f"{100 * (after - before):+.1f} pts"
    return f"{100 * (after - before) / before:+.0f}%" if before else "-"


def table(results: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """Markdown rows: metric, one column per model, and the change from the first to the last."""
    names = list(results)
    head = ["metric"] + [labels[n] for n in names] + (["change"] if len(names) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, how in ROWS:
        vals = [results[n].get(key) for n in names]
        cells = [label] + ["-" if v is None else f"{v:.3f}" for v in vals]
        if len(names) > 1:
            cells.append(change(vals[0], vals[-1], how))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


class EvaluateStage(Stage):
    """Writes ``report.md`` (the before/after table) and ``evaluation.jsonl`` (every judged answer)."""

    name = "evaluate"
    Config = EvaluateConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        where = f"stages[{index}].evaluate"
        self.detectors = cfg.load_detectors(plugins, where)
        self.knowledge = load_knowledge(cfg.knowledge, run.seed) if cfg.knowledge else None
        self.fact_judge = None
        if self.knowledge is not None and cfg.fact_sentences:
            self.fact_judge = FactJudge(self.knowledge, cfg.fact_sentences)
        self.prompts = load_prompt_set(cfg.prompts, self.knowledge, run.seed)[: cfg.num_prompts]
        # The right answers repeat too (a journey may revisit a city): what a perfect fix would score.
        self.floor = {"seq_rep_4": mean([seq_rep_n(words(p.reference)) for p in self.prompts]),
                      "rep_w": mean([rep_w(words(p.reference)) for p in self.prompts])}
        self.general = []
        if cfg.general is not None:
            if cfg.general in data_keys(run):  # the split the training stages held out
                records, _ = load_records(getattr(run.data, cfg.general), "chat", plugins.formats, run.seed)
                self.general = split(records, run.data.eval_fraction, run.seed)[1]
            else:
                self.general = load_records(cfg.general, "chat", plugins.formats, run.seed)[0]

    def produces(self) -> Produces:
        return Produces(datasets=["evaluation"])

    def _baseline(self, ctx) -> str | None:
        name = self.config.baseline
        if name is None:
            return None
        if name == "base":
            return ctx.artifacts.lineage[0]["input_model"] if ctx.artifacts.lineage else ctx.artifacts.model
        for entry in ctx.artifacts.lineage:
            if entry["stage"] == name:
                model = json.loads((Path(entry["dir"]) / "metrics.json").read_text()).get("model")
                if model:
                    return model
        if Path(name).is_dir():
            return str(Path(name).resolve())
        raise ConfigError(f"stages[{ctx.index}].evaluate.baseline",
                          f"{name!r} is no earlier stage that produced a model, nor a model directory")

    def run(self, ctx):
        models = {"after": ctx.artifacts.model}
        baseline = self._baseline(ctx)
        if baseline is not None and baseline != ctx.artifacts.model:
            models = {"before": baseline, **models}
        labels = {"before": f"before ({self.config.baseline})", "after": "after"}
        results, rows = {}, []
        for label, model in models.items():
            metrics, judged = self._measure(ctx, label, model)
            results[label] = metrics
            rows += judged
        results = self._general_loss(ctx, models, results)
        lines = table(results, labels)
        cfg = self.config
        if cfg.tuned_on == cfg.prompts:
            ctx.log.warning("[%s] measuring on %s, the prompts the hyperparameters were tuned on: no test",
                            ctx.name, cfg.prompts)
        split = [f"- prompts: `{cfg.prompts}`"
                 + (f"; hyperparameters tuned on `{cfg.tuned_on}`" if cfg.tuned_on else "")
                 + (" (the same: this is no test)" if cfg.tuned_on == cfg.prompts else "")]
        floor = (f"The reference answers themselves score seq-rep-4 {self.floor['seq_rep_4']:.3f} and rep-16 "
                 f"{self.floor['rep_w']:.3f}: the floor of a perfect fix.")
        report = "\n".join([f"# Evaluation on {len(self.prompts)} held-out prompts", ""] + split
                           + [f"- {labels[k]}: `{m}`" for k, m in models.items()] + [""] + lines + ["", floor]) + "\n"
        (ctx.work_dir / "report.md").write_text(report)
        write_jsonl(ctx.work_dir / "evaluation.jsonl", rows)
        ctx.log.info("[%s] before/after on %d held-out prompts:\n%s", ctx.name, len(self.prompts), "\n".join(lines))
        metrics = {f"{k}_before": v for k, v in results.get("before", {}).items()}
        metrics.update(results["after"])
        metrics.update({f"{k}_references": v for k, v in self.floor.items()})
        metrics.update(models=dict(models), table=lines, prompts=cfg.prompts, tuned_on=cfg.tuned_on)
        return StageResult(metrics=metrics, datasets={"evaluation": "evaluation.jsonl"})

    def _measure(self, ctx, label: str, model: str) -> tuple[dict, list[dict]]:
        from transformers import AutoTokenizer

        cfg = self.config
        tok = AutoTokenizer.from_pretrained(model)
        sampling = Sampling(n=1, temperature=0.0, max_tokens=cfg.max_tokens)  # greedy: needs no seed
        completions = sample_completions(ctx, model, [tokenize_prompt(tok, p.prompt) for p in self.prompts],
                                         sampling, label=f"rollout-{label}")
        samples = [Sample(p.id, p.prompt, cs[0].text, p.reference, p.unanswerable, p.entity, p.attribute, p.facts,
                          finish_reason=cs[0].finish_reason, num_tokens=len(cs[0].token_ids), model=model)
                   for p, cs in zip(self.prompts, completions)]
        findings = run_detectors(self.detectors, samples, self.knowledge, ctx)
        kinds = {d.name: d.kind for d in self.detectors}
        rows = []
        for s, found in zip(samples, findings):
            said = words(s.completion)
            facts = (self.fact_judge.judge(s.completion, s.entity, s.unanswerable, s.finish_reason != "length")
                     if self.fact_judge else None)
            row = {"label": label, **s.to_json(), "declined": declines(s.completion, cfg.decline_patterns),
                   "judges": {"seq_rep_4": seq_rep_n(said), "rep_w": rep_w(said),
                              **(facts.to_json() if facts else {})},
                   "findings": {n: {"kind": kinds[n], "rule": f.rule} for n, f in found.items()}}
            if not s.unanswerable:
                row["correct"] = is_correct(s, facts.errors if facts else [], cfg.decline_patterns)
            rows.append(row)
        n = max(1, len(rows))
        answerable = [r for r in rows if not r["unanswerable"]]
        unanswerable = [r for r in rows if r["unanswerable"]]
        share = lambda rs, f: sum(map(f, rs)) / len(rs) if rs else None  # noqa: E731
        judged = [r["judges"] for r in rows]
        metrics = {
            "seq_rep_4": mean([j["seq_rep_4"] for j in judged]),
            "rep_w": mean([j["rep_w"] for j in judged]),
            "fact_error_rate": share(judged, lambda j: bool(j["errors"])) if self.fact_judge else None,
            # where the errors are: wrong facts about what the table knows, or values it has none for
            "fact_error_rate_answerable": share(answerable, lambda r: bool(r["judges"]["errors"]))
            if self.fact_judge else None,
            "fact_error_rate_unanswerable": share(unanswerable, lambda r: bool(r["judges"]["errors"]))
            if self.fact_judge else None,
            "unchecked_rate": share(rows, lambda r: not r["declined"] and not r["judges"]["claims"])
            if self.fact_judge else None,
            "repetition_rate": sum(any(f["kind"] == "repetition" for f in r["findings"].values()) for r in rows) / n,
            "hallucination_rate": sum(any(f["kind"] == "hallucination" for f in r["findings"].values()) for r in rows) / n,
            "decline_rate": share(unanswerable, lambda r: r["declined"]),
            "accuracy": share(answerable, lambda r: r["correct"]),
            "false_decline_rate": share(answerable, lambda r: r["declined"]),
            "distinct_2": distinct_n([s.completion for s in samples], 2),
            # how the rates above weigh: what declines alone could change in the overall fact error rate
            "answerable_prompts": len(answerable),
            "unanswerable_prompts": len(unanswerable),
            "cut_at_limit": sum(s.finish_reason == "length" for s in samples) / n,
        }
        for r in [r for r in rows if r["findings"]][:2]:
            ctx.log.info("[%s] %s %s: %s\n    flagged: %s", ctx.name, label, r["id"], r["completion"][:160],
                         "; ".join(f"{k}: {v['rule']}" for k, v in r["findings"].items()))
        return metrics, rows

    def _general_loss(self, ctx, models: dict[str, str], results: dict[str, dict]) -> dict[str, dict]:
        if not self.general:
            return results
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(next(iter(models.values())))
        seqs = [tokenize_conversation(tok, r["messages"], 4096, where=f"general #{i}") for i, r in enumerate(self.general)]
        seqs = [s for s in seqs if s.num_trained]
        groups = group_by_tokens([len(s) for s in seqs], self.config.max_tokens_per_micro_batch, 0)
        batches = [collate_packed([seqs[i] for i in g]) for g in groups]
        with ctx.cluster.reserve(ctx.name, ["reference"]) as placement:
            for label, model in models.items():
                group = WorkerGroup(f"{ctx.actor_prefix}/scorer-{label}", ReferenceWorker, placement["reference"],
                                    lambda r: (model, int(placement["reference"].num_cpus)))
                try:
                    scored = group.run(lambda a, r: a.score.remote(token_nll, batches), ctx.run.timeouts.step_s)[0]
                finally:
                    group.shutdown()
                total, count = sum(float(s) for s, _ in scored), sum(float(c) for _, c in scored)
                results[label]["general_loss"] = total / max(1.0, count)
        return results
