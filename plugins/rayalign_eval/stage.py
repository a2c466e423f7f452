"""The ``evaluate_model`` stage: benchmarks, held-out loss, generation quality, a sample sheet, a table.

For every model it evaluates (the current one by default; ``models: [base, sft, current]`` adds
others of the run, or model directories) it:

1. answers the QA benchmark and the sample-sheet prompts greedily with the vLLM rollout workers,
   extracts the final answers (``answer_patterns``) and scores exact match;
2. runs the detector plugins over those answers (repetition, and with a knowledge base
   hallucination) and measures rep-4 and distinct-2;
3. scores every multiple-choice option and the held-out chat data by log-likelihood with a frozen
   copy of the model (held-out loss and perplexity).

It writes ``generations.jsonl``, ``choices.jsonl``, ``samples.md`` (the same prompts every run, each
model's answer under each), and ``comparison.md``/``comparison.json``: one row per model evaluated
by this and every earlier ``evaluate_model`` stage of the run, also copied to the run folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from rayalign.data.chat import tokenize_prompt
from rayalign.data.datasets import load_records, prompts_from_chat, split
from rayalign.data.sources import data_keys, load_now, load_produced
from rayalign.errors import ConfigError
from rayalign.evaluation.detectors import Sample, build_detectors, run_detectors
from rayalign.evaluation.references import load_knowledge
from rayalign.evaluation.text import distinct_n, rep_n, words
from rayalign.rollout.vllm_engine import Sampling
from rayalign.sampling import sample_completions
from rayalign.stage import Produces, Stage, StageConfig, StageResult
from rayalign.data.jsonl import write_jsonl

from rayalign_eval import compare
from rayalign_eval.benchmarks import QAItem, load_choices, load_qa
from rayalign_eval.extract import DEFAULT_PATTERNS, extract_answer, normalize_answer
from rayalign_eval.scoring import (choice_metrics, choice_sequences, heldout_metrics, heldout_sequences,
                                   score_sequences)


class EvaluateModelConfig(StageConfig):
    models: list[str] = Field(["current"], description="what to evaluate: 'current' (the model so far), 'base' "
                              "(the run's first model), an earlier stage's name, or a model directory")
    qa: str | None = Field(None, description="QA benchmark JSONL {id?, prompt, answer (or reference)}: exact "
                           "match on the extracted answer")
    choices: str | None = Field(None, description="multiple-choice JSONL {id?, question, choices, answer}: "
                                "log-likelihood accuracy")
    heldout: str | None = Field("sft", description="chat data for held-out loss and perplexity: a key under data: "
                                "(its held-out split), a JSONL path or synthetic:..., or an earlier stage's dataset "
                                "(e.g. curated_validation); null: none")
    sheet: str | None = Field(None, description="prompts JSONL {prompt} for the sample sheet (null: from the QA "
                              "benchmark, else the held-out data)")
    sheet_size: int = Field(8, ge=0, description="prompts on the sample sheet")
    answer_patterns: list[str] = Field(list(DEFAULT_PATTERNS), description="regexes whose first group is the "
                                       "final answer; the last match in an answer wins")
    fallback: Literal["last_number", "whole", "none"] = Field("last_number", description="when no pattern "
                                                              "matches: the last number, the whole answer, or none")
    max_tokens: int = Field(128, ge=1, description="new tokens per answer (greedy)")
    detectors: list[str] | None = Field(None, description="detector plugins over the answers (null: repetition, "
                                        "plus contradiction and unanswerable with a knowledge base, when installed)")
    detector_options: dict[str, dict] = Field({}, description="per detector: its options")
    knowledge: str | None = Field(None, description="knowledge base JSONL for hallucination detectors")
    max_length: int = Field(2048, ge=8, description="tokens per scored sequence")
    max_tokens_per_micro_batch: int = Field(4096, ge=8, description="packing budget when scoring")


class EvaluateModelStage(Stage):
    """Benchmarks, held-out loss/perplexity, repetition/hallucination, sample sheet, comparison across stages."""

    name = "evaluate_model"
    Config = EvaluateModelConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg, where = self.config, f"stages[{index}].evaluate_model"
        self.knowledge = load_knowledge(cfg.knowledge, run.seed) if cfg.knowledge else None
        names = cfg.detectors
        if names is None:
            wanted = ["repetition"] + (["contradiction", "unanswerable"] if self.knowledge else [])
            names = [n for n in wanted if n in plugins.detectors]
        self.detectors = build_detectors(plugins, names, cfg.detector_options, where)
        self.qa = load_qa(cfg.qa) if cfg.qa else []
        self.choices = load_choices(cfg.choices) if cfg.choices else []
        self.sheet = None
        if cfg.sheet:
            records, _ = load_records(cfg.sheet, "prompt", plugins.formats, run.seed)
            self.sheet = [r["prompt"] for r in records][: cfg.sheet_size]
        self.formats, self.heldout = plugins.formats, []
        if cfg.heldout in data_keys(run):  # the split the training stages held out
            records, _ = load_records(getattr(run.data, cfg.heldout), "chat", plugins.formats, run.seed)
            self.heldout = split(records, run.data.eval_fraction, run.seed)[1]
        elif cfg.heldout is not None:
            self.heldout = load_now(run, self.formats, cfg.heldout, "chat")  # None: an earlier stage's, in run()
            if self.heldout is None:
                artifacts.expect_dataset(cfg.heldout, f"{where}.heldout")

    def produces(self) -> Produces:
        return Produces(datasets=["evaluation_generations"])

    # -- what to evaluate ------------------------------------------------------------------------

    def _models(self, ctx) -> list[tuple[str, str]]:
        """(label, model path) per entry of ``models``."""
        trained = []  # (stage, model) of earlier stages that produced a model, in order
        for entry in ctx.artifacts.lineage:
            record = json.loads((Path(entry["dir"]) / "metrics.json").read_text())
            if record.get("model"):
                trained.append((entry["stage"], record["model"]))
        base = ctx.artifacts.lineage[0]["input_model"] if ctx.artifacts.lineage else ctx.artifacts.model
        out = []
        for i, name in enumerate(self.config.models):
            if name == "current":
                out.append((trained[-1][0] if trained else "base", ctx.artifacts.model))
            elif name == "base":
                out.append(("base", base))
            elif any(stage == name for stage, _ in trained):
                out.append((name, [m for stage, m in trained if stage == name][-1]))
            elif Path(name).is_dir():
                out.append((Path(name).name, str(Path(name).resolve())))
            else:
                raise ConfigError(f"stages[{ctx.index}].evaluate_model.models[{i}]", f"{name!r} is not 'current', "
                                  "'base', an earlier stage that produced a model, nor a model directory")
        return list(dict.fromkeys(out))  # a model named twice is evaluated once

    def _sheet_prompts(self) -> list[list[dict]]:
        """The sample sheet: fixed prompts, chosen by a hash of their text so every run shows the same."""
        if self.sheet is not None:
            return self.sheet
        pool = [q.prompt for q in self.qa] or [p["prompt"] for p in prompts_from_chat(self.heldout)]
        key = lambda p: hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()  # noqa: E731
        return sorted(pool, key=key)[: self.config.sheet_size]

    def run(self, ctx):
        cfg = self.config
        if self.heldout is None:
            self.heldout = load_produced(ctx, self.formats, cfg.heldout, "chat", f"stages[{ctx.index}].evaluate_model.heldout")
        sheet = self._sheet_prompts()
        rows, generations, choices, sheet_answers = [], [], [], {}
        for label, model in self._models(ctx):
            metrics, gen_rows, choice_rows, answers = self._evaluate(ctx, label, model, sheet)
            rows.append({"label": label, "model": model, "evaluated_in": f"{ctx.index:02d}-{ctx.name}",
                         "metrics": metrics})
            generations += gen_rows
            choices += choice_rows
            sheet_answers[label] = answers

        write_jsonl(ctx.work_dir / "generations.jsonl", generations)
        write_jsonl(ctx.work_dir / "choices.jsonl", choices)
        (ctx.work_dir / "samples.md").write_text(sample_sheet(sheet, sheet_answers))
        all_rows = compare.merge(compare.earlier_rows(ctx.artifacts.lineage, self.name), rows)
        lines = compare.table(all_rows)
        text = "# Model comparison\n\n" + "\n".join(lines) + "\n"
        (ctx.work_dir / "comparison.md").write_text(text)
        (ctx.work_dir / "comparison.json").write_text(json.dumps({"rows": all_rows}, indent=2))
        compare.write_atomic(ctx.work_dir.parent / "comparison.md", text)
        ctx.log.info("[%s] comparison across the run:\n%s", ctx.name, "\n".join(lines))
        for prompt in sheet[:2]:
            ctx.log.info("[%s] sample: %s\n%s", ctx.name, prompt[-1]["content"][:200],
                         "\n".join(f"    {label}: {answers[_key(prompt)][:200]}" for label, answers in
                                   sheet_answers.items()))
        current = rows[-1]["metrics"]
        return StageResult(metrics={**current, "models": {r["label"]: r["metrics"] for r in rows}, "table": lines},
                           datasets={"evaluation_generations": "generations.jsonl"})

    # -- one model -------------------------------------------------------------------------------

    def _evaluate(self, ctx, label: str, model: str, sheet: list[list[dict]]):
        from transformers import AutoTokenizer

        cfg = self.config
        tok = AutoTokenizer.from_pretrained(model)
        qa_keys = {_key(q.prompt) for q in self.qa}
        extra_sheet = [p for p in sheet if _key(p) not in qa_keys]
        prompts = [q.prompt for q in self.qa] + extra_sheet
        metrics: dict = {}
        gen_rows: list[dict] = []
        answers: dict[str, str] = {}
        if prompts:
            sampling = Sampling(n=1, temperature=0.0, max_tokens=cfg.max_tokens)
            completions = sample_completions(ctx, model, [tokenize_prompt(tok, p) for p in prompts], sampling,
                                             label=f"rollout-{_slug(label)}")
            texts = [cs[0].text for cs in completions]
            answers = {_key(p): t for p, t in zip(prompts, texts)}
            metrics.update(self._qa_metrics(self.qa, texts[: len(self.qa)], label, gen_rows))
            metrics.update(self._quality(ctx, prompts, completions, model, gen_rows, label))
        scored = [("choices", choice_sequences(tok, self.choices, cfg.max_length)),
                  ("heldout", heldout_sequences(tok, self.heldout, cfg.max_length))]
        choice_rows = []
        if any(seqs for _, seqs in scored):
            with ctx.cluster.reserve(ctx.name, ["reference"]) as placement:
                everything = [s for _, seqs in scored for s in seqs]
                scores = score_sequences(ctx, placement["reference"], model, everything,
                                         cfg.max_tokens_per_micro_batch, _slug(label))
            n_choice = len(scored[0][1])
            if self.choices:
                mc, choice_rows = choice_metrics(self.choices, scores[:n_choice])
                metrics.update(mc)
                for row in choice_rows:
                    row["label"] = label
            if scored[1][1]:
                metrics.update(heldout_metrics(scores[n_choice:]))
        return metrics, gen_rows, choice_rows, answers

    def _qa_metrics(self, items: list[QAItem], texts: list[str], label: str, rows: list[dict]) -> dict:
        if not items:
            return {}
        cfg = self.config
        correct = found = 0
        for item, text in zip(items, texts):
            answer, how = extract_answer(text, cfg.answer_patterns, cfg.fallback)
            ok = answer is not None and normalize_answer(answer) == normalize_answer(item.answer)
            correct += ok
            found += how not in ("none", "last_number", "whole")
            rows.append({"label": label, "id": item.id, "prompt": item.prompt, "completion": text,
                         "extracted": answer, "extracted_by": how, "answer": item.answer, "correct": ok})
        return {"exact_match": correct / len(items), "extracted": found / len(items), "qa_items": len(items)}

    def _quality(self, ctx, prompts, completions, model: str, rows: list[dict], label: str) -> dict:
        """Repetition and hallucination rates from the detector plugins, rep-4 and distinct-2."""
        qa = {_key(q.prompt): q for q in self.qa}
        samples = []
        for i, (p, cs) in enumerate(zip(prompts, completions)):
            item = qa.get(_key(p))
            extra = item.extra if item else {}
            samples.append(Sample(item.id if item else f"sheet-{i}", p, cs[0].text, item.answer if item else "",
                                  bool(extra.get("unanswerable", False)), extra.get("entity"), extra.get("attribute"),
                                  list(extra.get("facts", [])), finish_reason=cs[0].finish_reason,
                                  num_tokens=len(cs[0].token_ids), model=model))
        findings = run_detectors(self.detectors, samples, self.knowledge, ctx)
        kinds = {d.name: d.kind for d in self.detectors}
        for row, found in zip(rows, findings):  # QA rows come first, in prompt order
            row["findings"] = {n: f.rule for n, f in found.items()}
        n = max(1, len(samples))
        out = {"rep_4": sum(rep_n(words(s.completion), 4) for s in samples) / n,
               "distinct_2": distinct_n([s.completion for s in samples], 2),
               "mean_words": sum(len(words(s.completion)) for s in samples) / n,
               "cut_at_limit": sum(s.finish_reason == "length" for s in samples) / n}
        for kind in sorted(set(kinds.values())):
            out[f"{kind}_rate"] = sum(any(kinds[d] == kind for d in f) for f in findings) / n
        return out


def _key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label)[:40]


def sample_sheet(prompts: list[list[dict]], answers: dict[str, dict[str, str]]) -> str:
    lines = ["# Sample sheet", "", "The same prompts every run; each model's greedy answer.", ""]
    for i, prompt in enumerate(prompts, start=1):
        lines += [f"## {i}. {prompt[-1]['content']}", ""]
        for label, by_prompt in answers.items():
            lines += [f"**{label}**: {by_prompt.get(_key(prompt), '-')}", ""]
    return "\n".join(lines)
