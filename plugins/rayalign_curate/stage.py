"""The ``curate`` stage: several sources in, one clean, deduplicated, mixed dataset out.

Order of work: load every source (any registered format of the stage's ``kind``), run the quality
filters, drop exact and near duplicates across all sources and splits (held-out splits first, so a
test item that also occurs in training leaves training), mix the training sources by weight, and
write the datasets and the report. Later stages name the output (``sft: {dataset: curated}``); it is
Parquet when every source was, else JSONL.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rayalign.data.filters import Example, build_filters
from rayalign.data.sources import load_now, load_produced
from rayalign.errors import DataError
from rayalign.stage import Produces, Stage, StageConfig, StageResult
from rayalign.data.jsonl import write_jsonl

from rayalign_curate.dedup import Deduplicator
from rayalign_curate.filters import REFUSAL_PATTERNS
from rayalign_curate.mixture import mix
from rayalign_curate.report import (SourceCounts, conversation_stats, histogram_lines, refusal_warning,
                                    source_table)

SPLITS = ("test", "validation", "train")  # dedup priority: an item is kept in the first split it occurs in


class SourceConfig(StageConfig):
    path: str = Field(description="a dataset file or directory (JSONL, Parquet, save_to_disk), a key under "
                      "`data:` (sft, preference), `synthetic:...`, or a dataset an earlier stage produced")
    name: str | None = Field(None, description="label in the report and in each row's `source` (default: the "
                             "file's stem or the key)")
    split: Literal["train", "validation", "test"] = Field("train", description="held-out splits are deduplicated "
                                                          "against training and written as <output>_<split>")
    weight: float = Field(1.0, ge=0, description="share of the training mix (weights are normalised); use a small "
                          "weight for replay of general data")

    def label(self) -> str:
        is_file = "/" in self.path or self.path.endswith((".jsonl", ".parquet"))
        return self.name or (Path(self.path).stem if is_file else self.path)


class CurateConfig(StageConfig):
    kind: Literal["chat", "preference"] = Field("chat", description="what every source holds (any registered "
                                                "format of that kind: messages, Alpaca, ShareGPT, prompt/completion; "
                                                "prompt/chosen/rejected)")
    sources: list[SourceConfig] = Field(min_length=1, description="datasets to curate and mix")
    output: str = Field("curated", description="name of the training dataset artifact; held-out splits are "
                        "<output>_validation and <output>_test")
    filters: list[str] = Field(["length", "char_ratio"], description="registered quality filters, in order")
    filter_options: dict[str, dict] = Field({}, description="per filter: its options")
    exact_dedup: bool = Field(True, description="drop records whose normalised text occurred before")
    near_dedup: bool = Field(True, description="drop records within `threshold` Jaccard similarity of an earlier one")
    threshold: float = Field(0.8, gt=0, le=1, description="near-duplicate Jaccard similarity of character shingles")
    num_perm: int = Field(128, ge=8, description="MinHash permutations (more: sharper LSH, slower)")
    shingle: int = Field(5, ge=1, description="characters per shingle")
    dedup_on: Literal["prompt", "full"] = Field("prompt", description="'prompt': the same question twice is a "
                                                "duplicate whatever the answers; 'full': prompt and answers")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description="hold out this share of every training source "
                                       "(after deduplication) as <output>_validation")
    mix_size: int | None = Field(None, ge=1, description="training examples in the mix (null: the source with the "
                                 "largest weight taken once, the others by their weights)")
    length_unit: Literal["tokens", "words"] = Field("tokens", description="unit of the length histogram "
                                                    "(tokens of the run's model tokenizer)")
    refusal_patterns: list[str] = Field(list(REFUSAL_PATTERNS), description="regexes of a refusal, for the report")
    refusal_target: float | None = Field(0.02, ge=0, le=1, description="expected share of refusals in the mix "
                                         "(null: no check)")
    refusal_tolerance: float = Field(0.05, ge=0, le=1, description="warn when the share is further than this from "
                                     "the target")

    @model_validator(mode="after")
    def _unique_labels(self) -> "CurateConfig":
        labels = [s.label() for s in self.sources]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"two sources are labelled {repeated[0]!r}: give them distinct `name`s")
        if not any(s.split == "train" and s.weight > 0 for s in self.sources):
            raise ValueError("no training source with a weight above 0")
        return self


class CurateStage(Stage):
    """Normalise, filter, deduplicate (also across splits) and mix datasets; writes a report."""

    name = "curate"
    Config = CurateConfig
    needs_model = False

    def prepare(self, run, plugins, artifacts, index):
        cfg, where = self.config, f"stages[{index}].curate"
        self.filters = build_filters(plugins.filters, cfg.filters, cfg.filter_options, where)
        self.formats, self.loaded = plugins.formats, {}
        for i, source in enumerate(cfg.sources):
            records = load_now(run, self.formats, source.path, cfg.kind)
            if records is not None:
                self.loaded[i] = records
            else:  # an earlier stage's dataset, loaded in run(); the name is checked now
                artifacts.expect_dataset(source.path, f"{where}.sources[{i}].path")

    def produces(self) -> Produces:
        """The mix, and a held-out split where a source or ``validation_fraction`` may fill one."""
        cfg = self.config
        splits = {s.split for s in cfg.sources} | ({"validation"} if cfg.validation_fraction > 0 else set())
        return Produces(datasets=[cfg.output] + [f"{cfg.output}_{s}" for s in ("validation", "test") if s in splits])

    def _load_all(self, ctx) -> list[list[dict]]:
        for i, source in enumerate(self.config.sources):
            if i not in self.loaded:
                self.loaded[i] = load_produced(ctx, self.formats, source.path, self.config.kind,
                                               f"stages[{ctx.index}].curate.sources[{i}].path")
        return [self.loaded[i] for i in range(len(self.config.sources))]

    def run(self, ctx):
        cfg = self.config
        records = self._load_all(ctx)
        counts = [SourceCounts(s.label(), s.split, read=len(r)) for s, r in zip(cfg.sources, records)]
        dropped: list[dict] = []

        # 1. quality filters
        kept: list[list[Example]] = []
        for source, rows, c in zip(cfg.sources, records, counts):
            ok = []
            for row in rows:
                example = Example.of(row, c.source)
                reason = next(((f.name, r) for f in self.filters if (r := f.reject(example))), None)
                if reason:
                    c.filtered[f"{reason[0]}: {reason[1]}"] += 1
                    dropped.append({"source": c.source, "reason": f"filter {reason[0]}: {reason[1]}", **row})
                else:
                    ok.append(example)
            kept.append(ok)

        # 2. duplicates, held-out splits first
        dedup = Deduplicator(cfg.threshold, cfg.num_perm, cfg.shingle, near=cfg.near_dedup, seed=ctx.run.seed)
        order = [(i, j) for split in SPLITS for i, s in enumerate(cfg.sources) if s.split == split
                 for j in range(len(kept[i]))]
        owner: dict[int, tuple[int, int]] = {}
        survivors: list[list[Example]] = [[] for _ in cfg.sources]
        for n, (i, j) in enumerate(order):
            example = kept[i][j]
            text = example.prompt if cfg.dedup_on == "prompt" else "\n".join(
                [example.prompt, example.response, example.rejected or ""])
            dup = dedup.add(n, text) if (cfg.exact_dedup or cfg.near_dedup) else None
            if dup is None:
                owner[n] = (i, j)
                survivors[i].append(example)
                continue
            oi, oj = owner[dup.of]
            c = counts[i]
            if cfg.sources[oi].split != c.split:
                c.leaked += 1
            elif dup.kind == "exact":
                c.exact_duplicates += 1
            else:
                c.near_duplicates += 1
            dropped.append({"source": c.source, "reason": f"{dup.kind} duplicate (similarity {dup.similarity:.2f}) of "
                            f"{counts[oi].source} ({cfg.sources[oi].split}) #{oj}", **example.record})
        for c, s in zip(counts, survivors):
            c.kept = len(s)
        held_out = self._hold_out(survivors, counts, ctx.run.seed)

        # 3. the training mix
        train = {c.source: s for c, s, src in zip(counts, survivors, cfg.sources) if src.split == "train" and src.weight > 0}
        empty = [name for name, s in train.items() if not s]
        if empty:
            raise DataError(empty[0], "no examples left after filtering and deduplication; see the report's "
                            "filtered counts or lower the filters")
        weights = {c.source: src.weight for c, src in zip(counts, cfg.sources)}
        mixed, plans = mix(train, weights, cfg.mix_size, ctx.run.seed)
        for p in plans:
            c = next(c for c in counts if c.source == p.source)
            c.in_mix, c.share = p.taken, p.share

        # 4. outputs, in the format the sources came in (Parquet in, Parquet out)
        suffix = output_suffix(records)
        datasets = {cfg.output: f"{cfg.output}{suffix}"}
        _write(ctx.work_dir / datasets[cfg.output], mixed)
        for split in ("validation", "test"):
            held = [e for c, s in zip(counts, survivors) if c.split == split for e in s]
            held += held_out if split == "validation" else []
            if held:
                datasets[f"{cfg.output}_{split}"] = f"{cfg.output}_{split}{suffix}"
                _write(ctx.work_dir / datasets[f"{cfg.output}_{split}"], held)
        write_jsonl(ctx.work_dir / "dropped.jsonl", dropped)

        stats = conversation_stats(mixed, self._length_fn(ctx), cfg.refusal_patterns)
        warning = refusal_warning(stats["refusal_share"], cfg.refusal_target, cfg.refusal_tolerance)
        report = {"sources": [c.row() for c in counts], "mix": stats, "refusal_warning": warning,
                  "dedup": {"threshold": cfg.threshold, "bands": dedup.bands, "rows": dedup.rows,
                            "on": cfg.dedup_on},
                  "datasets": datasets}
        (ctx.work_dir / "report.json").write_text(json.dumps(report, indent=2))
        self._log(ctx, counts, stats, warning)
        metrics = {
            "examples": len(mixed),
            "read": sum(c.read for c in counts),
            "filtered": sum(sum(c.filtered.values()) for c in counts),
            "exact_duplicates": sum(c.exact_duplicates for c in counts),
            "near_duplicates": sum(c.near_duplicates for c in counts),
            "leaked": sum(c.leaked for c in counts),
            "refusal_share": stats["refusal_share"],
            "mean_length": stats["mean_length"],
            "per_source": {c.source: c.in_mix if c.split == "train" else c.kept for c in counts},
        }
        return StageResult(metrics=metrics, datasets=datasets)

    def _hold_out(self, survivors: list[list[Example]], counts: list[SourceCounts], seed: int) -> list[Example]:
        """A seeded ``validation_fraction`` of each training source, taken out before mixing.

        After deduplication, so no near-duplicate of a held-out example stays in training.
        """
        fraction, held = self.config.validation_fraction, []
        for i, (s, c) in enumerate(zip(survivors, counts)):
            n = round(len(s) * fraction)
            if c.split != "train" or not n:
                continue
            order = list(range(len(s)))
            random.Random(f"{seed}-{i}").shuffle(order)
            held += [s[j] for j in sorted(order[:n])]
            survivors[i] = [s[j] for j in sorted(order[n:])]
            c.held_out = n
        return held

    def _length_fn(self, ctx):
        if self.config.length_unit == "words":
            return lambda text: len(text.split())
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ctx.artifacts.model)
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])

    def _log(self, ctx, counts, stats, warning) -> None:
        unit = self.config.length_unit
        lines = source_table(counts)
        lines += ["", f"mix: {stats['examples']} examples, mean length {stats['mean_length']:.1f} {unit}, turns "
                  f"{stats['turns']}, messages per role {stats['messages_per_role']}, refusals "
                  f"{stats['refusal_share']:.1%}", "length histogram:"]
        lines += histogram_lines(stats["length_histogram"], unit)
        reasons = Counter()
        for c in counts:
            reasons.update(c.filtered)
        if reasons:
            lines += ["filtered: " + ", ".join(f"{k} x{v}" for k, v in reasons.most_common())]
        ctx.log.info("[%s] curation report:\n%s", ctx.name, "\n".join(lines))
        if warning:
            ctx.log.warning("[%s] WARNING: %s", ctx.name, warning)


def output_suffix(sources: list) -> str:
    """``.parquet`` when every source was read from Parquet, so curated shards feed the next stage as
    they came; else ``.jsonl`` (mixed or embedded sources)."""
    formats = {getattr(getattr(r, "origin", None), "format", None) for r in sources}
    return ".parquet" if formats == {"parquet"} else ".jsonl"


def _write(path: Path, examples: list[Example]) -> None:
    """One row per example: its canonical record and ``source``, as JSONL or Parquet by the suffix."""
    rows = ({**e.record, "source": e.source} for e in examples)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), path)
        return
    write_jsonl(path, rows)
