"""Build negatives: a preference dataset from flagged samples and synthetic negatives, with provenance.

Rejected answers are (a) the model's own samples that a detector of the ``target`` kind flagged and
(b) synthetic negatives built from the references (``builders.py``). Chosen answers are the
reference, or with ``chosen: clean_sample`` a sample of the same prompt that no detector flagged.
Every pair says where it came from::

    {"prompt": [...], "chosen": "...", "rejected": "...", "unlikelihood": true,
     "provenance": {"prompt_id": "bavoren.journey", "source": "model", "model": "/runs/x/00-sft/model",
                    "sample": 2, "detector": "repetition", "rule": "loop: 'bavoren went to mirrow' x3 back to back",
                    "chosen_from": "reference"}}

With ``unsure_decline`` (hallucination fix), a question about a knowledge-base entity whose samples
the detectors flag (nearly) every time is one the model does not know: its guesses become rejected
answers and the decline the chosen one, so it learns to say so instead of inventing (as R-Tuning,
Zhang et al. 2024, teaches refusal on questions a model gets wrong). A decline on an answerable
question still counts as a miss in task accuracy, and the evaluation reports how often it happens.

``unlikelihood: true`` marks a rejected answer the model itself wrote that loops, so DPO's optional
unlikelihood term pushes its repeated tokens down (``dpo.unlikelihood``). Synthetic loops get DPO
only: in a looped short answer ("lives in Parvel lives in Parvel") the repeated token is the fact.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from rayalign.errors import ConfigError, DataError
from rayalign.evaluation.references import RefPrompt
from rayalign.stage import Produces, Stage, StageConfig, StageResult

from rayalign_fixes.builders import BUILDERS, OPT_IN
from rayalign_fixes.common import expect_input, knowledge_input, read_samples, resolve_input, write_jsonl


class NegativesConfig(StageConfig):
    target: Literal["repetition", "hallucination"] = Field(description="which kind of detector's flags to fix")
    detections: str = Field("detections", description="an earlier detect stage's dataset name, or a JSONL path")
    knowledge: str | None = Field("knowledge", description="knowledge base for synthetic swaps (name, path or null)")
    synthetic: list[str] | None = Field(None, description=f"synthetic builders ({', '.join(BUILDERS)}); "
                                                          "null: those of the target kind, less the opt-in "
                                                          f"{', '.join(sorted(OPT_IN))}")
    synthetic_per_prompt: int = Field(1, ge=0, description="synthetic negatives per prompt and builder")
    max_rejected_per_prompt: int = Field(2, ge=0, description="flagged samples used per prompt")
    detectors: list[str] | None = Field(None, description="detectors whose flags make rejected answers "
                                                          "(null: every detector of the target kind)")
    chosen: Literal["reference", "clean_sample"] = Field("reference", description="what the chosen answer is")
    unsure_decline: str | None = Field(None, description="a decline (e.g. \"I'm not sure.\") to prefer over the "
                                       "model's own answers to an answerable question about a knowledge-base entity "
                                       "when a hallucination detector flags at least `unsure_share` of its samples: "
                                       "the model does not know it, so it should say so (null: off)")
    unsure_share: float = Field(1.0, gt=0, le=1, description="share of a question's samples that must be flagged "
                                "for `unsure_decline`")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class NegativesStage(Stage):
    """Writes ``pairs.jsonl``, a preference dataset that ``dpo`` reads with ``dataset: pairs``."""

    name = "negatives"
    Config = NegativesConfig
    needs_model = False

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        defaults = [n for n, (k, _) in BUILDERS.items() if k == cfg.target and n not in OPT_IN]
        names = cfg.synthetic if cfg.synthetic is not None else defaults
        for i, name in enumerate(names):
            if name not in BUILDERS:
                raise ConfigError(f"stages[{index}].negatives.synthetic[{i}]",
                                  f"no synthetic builder {name!r} (known: {', '.join(BUILDERS)})")
        self.builders = names
        expect_input(artifacts, cfg.detections, f"stages[{index}].negatives.detections")
        expect_input(artifacts, cfg.knowledge, f"stages[{index}].negatives.knowledge", optional_knowledge=True)

    def produces(self) -> Produces:
        return Produces(datasets=["pairs"])

    def run(self, ctx):
        cfg = self.config
        where = f"stages[{ctx.index}].negatives"
        source = resolve_input(ctx, cfg.detections, f"{where}.detections")
        rows = read_samples(source)
        if any("findings" not in row for _, row in rows):
            raise DataError(source, "samples have no 'findings': run a detect stage on them first")
        knowledge = knowledge_input(ctx, cfg.knowledge, f"{where}.knowledge")
        by_prompt: dict[str, list] = {}
        for sample, row in rows:
            by_prompt.setdefault(sample.id, []).append((sample, row))
        prompts = {pid: RefPrompt(s.id, s.prompt, s.reference, s.unanswerable, s.entity, s.attribute, list(s.facts))
                   for pid, [(s, _), *_] in by_prompt.items()}
        rng = random.Random(ctx.run.seed * 1009 + ctx.index)
        pairs = []
        for pid, group in by_prompt.items():
            pairs += self._pairs(prompts[pid], group, list(prompts.values()), knowledge, rng)
        if not pairs:
            raise DataError(source, f"no preference pairs for target {cfg.target!r}: no sample was flagged by a "
                                    f"{cfg.target} detector and no synthetic builder applied")
        write_jsonl(ctx.work_dir / "pairs.jsonl", pairs)
        metrics = {"pairs": len(pairs), "prompts": len(by_prompt),
                   "prompts_with_pairs": len({p["provenance"]["prompt_id"] for p in pairs}),
                   "unlikelihood_pairs": sum(p["unlikelihood"] for p in pairs)}
        for p in pairs:
            key = f"pairs_{p['provenance']['detector'].replace(':', '_')}"
            metrics[key] = metrics.get(key, 0) + 1
        ctx.log.info("[%s] %s", ctx.name, " ".join(f"{k}={v}" for k, v in metrics.items()))
        return StageResult(metrics=metrics, datasets={"pairs": "pairs.jsonl"})

    def _pairs(self, p: RefPrompt, group: list, donors: list[RefPrompt], knowledge, rng) -> list[dict]:
        cfg = self.config
        preferred = (p.reference, "reference")
        if cfg.chosen == "clean_sample":
            clean = [s for s, row in group if not row["findings"] and s.completion.strip()]
            if clean:
                preferred = (clean[0].completion, f"sample {clean[0].sample}")
        unsure = self._unsure(p, group)
        # The model's guesses at what it does not know lose to a decline, not to a reference it cannot
        # learn from a few pairs; synthetic negatives still lose to the reference.
        own = (cfg.unsure_decline, f"unsure_decline: {unsure}") if unsure else preferred
        seen = {_norm(preferred[0]), _norm(own[0])}
        out = []

        def add(rejected: str, provenance: dict, chosen: tuple[str, str]) -> None:
            if _norm(rejected) in seen or not rejected.strip():
                return
            seen.add(_norm(rejected))
            out.append({"prompt": p.prompt, "chosen": chosen[0], "rejected": rejected,
                        # Unlikelihood is for the model's own loops (Welleck et al.): on a synthetic
                        # loop of a short answer it would push down the fact token itself.
                        "unlikelihood": provenance.pop("kind") == "repetition" and provenance["source"] == "model",
                        "provenance": {"prompt_id": p.id, **provenance, "chosen_from": chosen[1]}})

        flagged = 0
        for sample, row in group:
            hits = [(name, f) for name, f in row["findings"].items()
                    if f["kind"] == cfg.target and (unsure or cfg.detectors is None or name in cfg.detectors)]
            if hits and flagged < cfg.max_rejected_per_prompt:
                name, finding = hits[0]
                before = len(out)
                add(sample.completion, {"kind": finding["kind"], "source": "model", "model": sample.model,
                                        "sample": sample.sample, "detector": name, "rule": finding["rule"]}, own)
                flagged += len(out) - before
        for name in self.builders:
            kind, build = BUILDERS[name]
            for _ in range(cfg.synthetic_per_prompt):
                made = build(p, rng, knowledge=knowledge, donors=donors)
                if made is not None:
                    add(made[0], {"kind": kind, "source": "synthetic", "model": None, "sample": None,
                                  "detector": f"synthetic:{name}", "rule": made[1]}, preferred)
        return out

    def _unsure(self, p: RefPrompt, group: list) -> str | None:
        """Why the model does not know the answer to ``p`` (None: it may, or the option is off).

        Only answerable questions about a knowledge-base entity qualify: a fact one may not know. A
        question with no entity (arithmetic, a task) has an answer to work out, not to decline.
        """
        cfg = self.config
        if cfg.unsure_decline is None or cfg.target != "hallucination" or p.unanswerable or not p.entity:
            return None
        flagged = sum(any(f["kind"] == "hallucination" for f in row["findings"].values()) for _, row in group)
        if flagged < cfg.unsure_share * len(group):
            return None
        return f"{flagged} of {len(group)} samples flagged"
