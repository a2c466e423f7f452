"""``reward_eval``: score the current model's answers to held-out prompts with registered rewards.

A stage is a typed config, a ``prepare`` that checks inputs before any work (so a typo in a
reward name fails the run at once) and a ``run`` that does the work on the cluster and returns
metrics and artifacts. The pipeline handles output directories, lineage and resume.
"""

from __future__ import annotations

import ray
from pydantic import Field

from rayalign.data.datasets import load_records, prompts_from_chat, split
from rayalign.data.jsonl import write_jsonl
from rayalign.stage import Produces, Stage, StageConfig, StageResult


class RewardEvalConfig(StageConfig):
    num_prompts: int = Field(8, ge=1, description="held-out prompts to answer (at most)")
    max_new_tokens: int = Field(24, ge=1, description="tokens per greedy answer")
    rewards: dict[str, float] = Field({"mentions_reference": 1.0}, description="reward name -> weight")
    metrics: list[str] = Field(["exclamation_rate"], description="registered metrics to compute")


def answer(model_path: str, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers with transformers; runs as a Ray task next to the data, not in the driver."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = []
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tok.pad_token_id)
        out.append(tok.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


class RewardEvalStage(Stage):
    """Answer held-out prompts greedily and report weighted rewards and metrics."""

    name = "reward_eval"
    Config = RewardEvalConfig

    def prepare(self, run, plugins, artifacts, index):
        where = f"stages[{index}].reward_eval"
        self.rewards = {n: (plugins.rewards.get(n, where=f"{where}.rewards"), w) for n, w in self.config.rewards.items()}
        self.metrics = [plugins.metrics.get(m, where=f"{where}.metrics")() for m in self.config.metrics]
        chat, _ = load_records(run.data.sft, "chat", plugins.formats, run.seed)
        self.prompts = prompts_from_chat(split(chat, run.data.eval_fraction, run.seed)[1])[: self.config.num_prompts]

    def produces(self) -> Produces:
        """Declared up front, so a later stage's ``dataset: scored`` is checked before any work."""
        return Produces(datasets=["scored"])

    def run(self, ctx):
        task = ray.remote(num_cpus=1)(answer)
        messages = [p["prompt"] for p in self.prompts]
        completions = ray.get(task.remote(ctx.artifacts.model, messages, self.config.max_new_tokens),
                              timeout=ctx.run.timeouts.step_s)
        questions = [m[-1]["content"] for m in messages]
        references = [p.get("reference") for p in self.prompts]
        scores = [
            sum(w * fn(q, c, reference=r) for fn, w in self.rewards.values())
            for q, c, r in zip(questions, completions, references)
        ]
        write_jsonl(ctx.work_dir / "scored.jsonl", ({"prompt": q, "completion": c, "reference": r, "reward": s}
                                                    for q, c, r, s in zip(questions, completions, references, scores)))
        metrics = {m.name: m.compute(questions, completions, references) for m in self.metrics}
        metrics["mean_reward"] = sum(scores) / len(scores)
        ctx.log.info("[%s] mean reward %.3f over %d prompts", ctx.name, metrics["mean_reward"], len(scores))
        return StageResult(metrics=metrics, datasets={"scored": "scored.jsonl"})
