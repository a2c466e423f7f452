"""Sample answers to held-out prompts from the current model with the vLLM rollout workers."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from rayalign.data.chat import tokenize_prompt
from rayalign.data.datasets import held_out_prompts, load_records, prompts_from_chat, split
from rayalign.data.jsonl import write_jsonl
from rayalign.metrics import build_metrics
from rayalign.rollout.vllm_engine import Sampling
from rayalign.sampling import sample_completions
from rayalign.stage import Produces, Stage, StageConfig, StageResult


class GenerateConfig(StageConfig):
    num_prompts: int = Field(16, ge=1, description="held-out prompts to answer (at most)")
    n: int = Field(1, ge=1, description="samples per prompt")
    temperature: float = Field(0.0, ge=0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1, description="new tokens per sample")
    show: int = Field(3, ge=0, description="samples printed in the job log")
    metrics: list[str] = Field(["response_words", "distinct_2", "exact_match"], description="registered metrics")
    metric_options: dict[str, dict[str, Any]] = Field({}, description="options of the metrics by name "
                                                      "(`rayalign plugins show <metric>` lists them)")

    def check_plugins(self, plugins, where: str) -> None:
        """With the rest of the config: every metric exists and its options are its own."""
        build_metrics(plugins, self.metrics, self.metric_options, where)


class GenerateStage(Stage):
    """Writes ``generations.jsonl`` and the configured metrics; trains nothing."""

    name = "generate"
    Config = GenerateConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        self.metrics = build_metrics(plugins, cfg.metrics, cfg.metric_options, f"stages[{index}].generate")
        path = held_out_prompts(run.data)
        if path is not None:
            prompts, self.source = load_records(path, "prompt", plugins.formats, run.seed)
        else:  # the held-out split of the SFT data: questions the model did not train on
            chat, source = load_records(run.data.sft, "chat", plugins.formats, run.seed)
            prompts, self.source = prompts_from_chat(split(chat, run.data.eval_fraction, run.seed)[1]), source
        self.prompts = prompts[: cfg.num_prompts]

    def produces(self) -> Produces:
        return Produces(datasets=["generations"])

    def run(self, ctx):
        from transformers import AutoTokenizer

        cfg = self.config
        tok = AutoTokenizer.from_pretrained(ctx.artifacts.model)
        sampling = Sampling(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            seed=ctx.run.seed)
        answers = sample_completions(ctx, ctx.artifacts.model,
                                     [tokenize_prompt(tok, p["prompt"]) for p in self.prompts], sampling)
        rows = [{"prompt": p["prompt"], "completion": c.text, "reference": p.get("reference"),
                 "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
                for p, cs in zip(self.prompts, answers) for c in cs]
        write_jsonl(ctx.work_dir / "generations.jsonl", rows)
        prompts_text = [row["prompt"][-1]["content"] for row in rows]
        completions = [row["completion"] for row in rows]
        references = [row["reference"] for row in rows]
        metrics = {m.name: m.compute(prompts_text, completions, references) for m in self.metrics}
        for row in rows[: cfg.show]:
            ctx.log.info("[%s] Q: %s\n    A: %s\n    reference: %s", ctx.name, row["prompt"][-1]["content"],
                         row["completion"], row["reference"])
        ctx.log.info("[%s] %s", ctx.name, " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        metrics["samples"] = len(rows)
        return StageResult(metrics=metrics, datasets={"generations": "generations.jsonl"})
