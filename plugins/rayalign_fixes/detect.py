"""Detect: run detector plugins over mined samples and record what each one flagged, and why."""

from __future__ import annotations

from pydantic import Field

from rayalign.evaluation.detectors import run_detectors
from rayalign.stage import Produces, Stage, StageResult

from rayalign_fixes.common import (DetectorOptions, expect_input, knowledge_input, read_samples, resolve_input,
                                   write_jsonl)


class DetectConfig(DetectorOptions):
    samples: str = Field("samples", description="dataset of samples: an earlier stage's name, or a JSONL path")
    knowledge: str | None = Field("knowledge", description="knowledge base: an earlier stage's name, a path, or null")


def rates(findings: list[dict], kinds: dict[str, str]) -> dict[str, float]:
    """Share of samples flagged by each detector and by each kind of detector."""
    n = max(1, len(findings))
    out = {f"{name}_rate": sum(name in f for f in findings) / n for name in kinds}
    for kind in sorted(set(kinds.values())):
        out[f"{kind}_rate"] = sum(any(kinds[d] == kind for d in f) for f in findings) / n
    return out


class DetectStage(Stage):
    """Writes ``detections.jsonl``: every sample with ``findings`` {detector: {kind, rule, details}}."""

    name = "detect"
    Config = DetectConfig
    needs_model = False

    def prepare(self, run, plugins, artifacts, index):
        self.detectors = self.config.load_detectors(plugins, f"stages[{index}].detect")
        expect_input(artifacts, self.config.samples, f"stages[{index}].detect.samples")
        expect_input(artifacts, self.config.knowledge, f"stages[{index}].detect.knowledge", optional_knowledge=True)

    def produces(self) -> Produces:
        return Produces(datasets=["detections"])

    def run(self, ctx):
        cfg = self.config
        where = f"stages[{ctx.index}].detect"
        rows = read_samples(resolve_input(ctx, cfg.samples, f"{where}.samples"))
        knowledge = knowledge_input(ctx, cfg.knowledge, f"{where}.knowledge")
        samples = [s for s, _ in rows]
        findings = run_detectors(self.detectors, samples, knowledge, ctx)
        kinds = {d.name: d.kind for d in self.detectors}
        out = []
        for (sample, row), found in zip(rows, findings):
            row = {**row, "findings": {name: {"kind": kinds[name], "rule": f.rule, "details": f.details}
                                       for name, f in found.items()}}
            out.append(row)
        write_jsonl(ctx.work_dir / "detections.jsonl", out)
        metrics = {"samples": len(samples), **rates(findings, kinds)}
        for row in [r for r in out if r["findings"]][:3]:  # a few examples in the job log
            rules = "; ".join(f"{k}: {v['rule']}" for k, v in row["findings"].items())
            ctx.log.info("[%s] %s: %s\n    flagged: %s", ctx.name, row["id"], row["completion"][:160], rules)
        ctx.log.info("[%s] %s", ctx.name, " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.endswith("_rate")))
        return StageResult(metrics=metrics, datasets={"detections": "detections.jsonl"})
