"""The ``distill`` stage: a teacher model answers questions, prompted with few-shot examples.

The rollout workers (vLLM) load the teacher, never the student; the answers become a new SFT
dataset (``distilled``, chat records) whose rows carry their provenance: teacher, prompt template
and the examples used, sampling settings, finish reason. ``provenance.json`` records the same for the
whole dataset. A later ``sft: {dataset: distilled}`` trains the student on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from rayalign.data.chat import tokenize_prompt
from rayalign.data.sources import load_now, load_produced
from rayalign.errors import ConfigError, DataError
from rayalign.rollout.vllm_engine import Sampling
from rayalign.sampling import sample_completions
from rayalign.stage import Produces, Stage, StageConfig, StageResult
from rayalign.data.jsonl import write_jsonl

from rayalign_distill.prompts import chat_prompt, cut_at_next_question, pick_shots, shots_from_chat, text_prompt


class DistillConfig(StageConfig):
    teacher: str = Field(description="the teacher: a model directory or hub id, 'base' (the run's model), or an "
                         "earlier stage's name")
    questions: str = Field("prompts", description="questions to answer: a key under data: (prompts JSONL "
                           "{prompt, reference?}; null: synthetic), a JSONL path, or an earlier stage's dataset")
    examples: str | None = Field("sft", description="example pairs for the few-shot prompt: chat data (a key under "
                                 "data:, a JSONL path, or an earlier stage's dataset); null: zero-shot")
    shots: int = Field(3, ge=0, description="examples per prompt")
    shot_selection: Literal["first", "random"] = Field("random", description="the first examples for every "
                                                       "question, or a seeded sample per question")
    format: Literal["chat", "text"] = Field("chat", description="chat: examples as earlier turns with the teacher's "
                                            "chat template; text: text_template blocks (base-model teachers)")
    system: str | None = Field(None, description="system message (chat) or instruction line (text) before the examples")
    text_template: str = Field("Question: {question}\nAnswer: {answer}", description="one example in text format")
    n: int = Field(1, ge=1, description="answers per question")
    temperature: float = Field(0.7, ge=0, description="0 is greedy")
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, description="new tokens per answer")
    drop_truncated: bool = Field(True, description="drop answers cut at max_tokens")
    min_chars: int = Field(1, ge=0, description="drop answers shorter than this")
    limit: int | None = Field(None, ge=1, description="answer only the first N questions (null: all)")
    output: str = Field("distilled", description="name of the dataset artifact")


class DistillStage(Stage):
    """Answers questions with a teacher model and few-shot prompts; writes an SFT dataset with provenance."""

    name = "distill"
    Config = DistillConfig
    needs_model = False

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        self.formats = plugins.formats
        self.questions = load_now(run, self.formats, cfg.questions, "prompt")
        self.examples = load_now(run, self.formats, cfg.examples, "chat") if cfg.examples else []
        # None: an earlier stage's dataset, loaded in run(); the name is checked now.
        if self.questions is None:
            artifacts.expect_dataset(cfg.questions, f"stages[{index}].distill.questions")
        if self.examples is None:
            artifacts.expect_dataset(cfg.examples, f"stages[{index}].distill.examples")
        if cfg.format == "text" and ("{question}" not in cfg.text_template or "{answer}" not in cfg.text_template):
            raise ConfigError(f"stages[{index}].distill.text_template", "needs both {question} and {answer}")

    def produces(self) -> Produces:
        return Produces(datasets=[self.config.output])

    def _teacher(self, ctx) -> str:
        name = self.config.teacher
        if name == "base":
            return ctx.artifacts.lineage[0]["input_model"] if ctx.artifacts.lineage else ctx.artifacts.model
        for entry in reversed(ctx.artifacts.lineage):
            if entry["stage"] == name:
                model = json.loads((Path(entry["dir"]) / "metrics.json").read_text()).get("model")
                if model:
                    return model
        if name in getattr(ctx.artifacts, "models", {}):
            return ctx.artifacts.models[name]
        if Path(name).is_dir():
            return str(Path(name).resolve())
        if name.startswith(("/", ".", "~")):
            raise ConfigError(f"stages[{ctx.index}].distill.teacher", f"{name!r} does not exist")
        return name  # a hub id: vLLM loads it (or says why not)

    def run(self, ctx):
        from transformers import AutoTokenizer

        cfg = self.config
        where = f"stages[{ctx.index}].distill"
        questions = self.questions
        if questions is None:
            questions = load_produced(ctx, self.formats, cfg.questions, "prompt", f"{where}.questions")
        questions = list(questions)[: cfg.limit]
        examples = self.examples
        if examples is None:
            examples = load_produced(ctx, self.formats, cfg.examples, "chat", f"{where}.examples")
        shots = shots_from_chat(examples)
        teacher = self._teacher(ctx)
        tok = AutoTokenizer.from_pretrained(teacher)

        prompts, token_prompts, used = [], [], []
        for i, q in enumerate(questions):
            question = q["prompt"][-1]["content"]
            chosen = pick_shots(shots, question, cfg.shots, cfg.shot_selection, ctx.run.seed, i)
            if cfg.format == "chat":
                messages = q["prompt"][:-1] + chat_prompt(question, chosen, cfg.system)
                token_prompts.append(tokenize_prompt(tok, messages))
                prompts.append(tok.decode(token_prompts[-1]))
            else:
                text = text_prompt(question, chosen, cfg.text_template, cfg.system)
                token_prompts.append(tok(text)["input_ids"])
                prompts.append(text)
            used.append([s.id for s in chosen])
        sampling = Sampling(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            seed=ctx.run.seed)
        completions = sample_completions(ctx, teacher, token_prompts, sampling, label="teacher")

        sampling_info = {"n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                         "seed": ctx.run.seed}
        rows, dropped = [], {"truncated": 0, "too_short": 0}
        for i, (q, cs) in enumerate(zip(questions, completions)):
            for c in cs:
                answer = c.text.strip() if cfg.format == "chat" else cut_at_next_question(c.text, cfg.text_template)
                if cfg.drop_truncated and c.finish_reason == "length":
                    dropped["truncated"] += 1
                    continue
                if len(answer) < max(1, cfg.min_chars):
                    dropped["too_short"] += 1
                    continue
                rows.append({"messages": q["prompt"] + [{"role": "assistant", "content": answer}],
                             "provenance": {"teacher": teacher, "question": i, "shots": used[i],
                                            "prompt": prompts[i], "finish_reason": c.finish_reason,
                                            "reference": q.get("reference")}})
        if not rows:
            raise DataError(f"stages[{ctx.index}].distill", f"the teacher kept no answer ({dropped['truncated']} cut at "
                            f"max_tokens={cfg.max_tokens}, {dropped['too_short']} shorter than min_chars)")
        write_jsonl(ctx.work_dir / f"{cfg.output}.jsonl", rows)
        provenance = {"teacher": teacher, "format": cfg.format, "system": cfg.system,
                      "template": cfg.text_template if cfg.format == "text" else "teacher chat template",
                      "shots": cfg.shots, "shot_selection": cfg.shot_selection, "examples": cfg.examples,
                      "questions": cfg.questions, "sampling": sampling_info, "dropped": dropped,
                      "example_prompt": prompts[0] if prompts else None}
        (ctx.work_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
        ctx.log.info("[%s] teacher %s answered %d questions: %d answers kept, dropped %s\n    example: %s\n    -> %s",
                     ctx.name, teacher, len(questions), len(rows), dropped,
                     rows[0]["messages"][-2]["content"][:160], rows[0]["messages"][-1]["content"][:160])
        return StageResult(metrics={"questions": len(questions), "answers": len(rows), "teacher": teacher,
                                    "dropped_truncated": dropped["truncated"], "dropped_short": dropped["too_short"]},
                           datasets={cfg.output: f"{cfg.output}.jsonl"})
