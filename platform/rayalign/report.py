"""A run's report: one self-contained ``report.html`` in its output directory.

Built only from what the run wrote (``config.yaml``, ``summary.json`` or else each finished stage's
``metrics.json``, and the stages' ``generations.jsonl`` and ``evaluation.jsonl``), so ``rayalign
report RUN_DIR`` rebuilds it at any time, also for a run that was killed. Nothing is fetched when
it opens: the plots are inline SVG drawn here, so the file works offline and can be attached to a
ticket. Every piece of run text is escaped.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import yaml

from rayalign.data.jsonl import iter_jsonl

# Curves over optimizer steps: one chart per group and stage, a line per key the history has.
CURVES: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "reward": ("reward", "reward_margin", "chosen_reward", "rejected_reward"),
    "reward accuracy": ("reward_accuracy",),
    "KL": ("kl",),
    "learning rate": ("lr",),
    "grad norm": ("grad_norm",),
}
# The fixes: stage metrics named for what they target. A stage that measures one against a baseline
# ("<name>_before", an evaluation) gets a before/after table of every metric it has both ways.
# Failure rates and losses improve downwards.
# seq_rep/rep_w/fact_error: the independent judges of the fixes (rayalign.evaluation.judges).
FIX_WORDS = ("repetition", "hallucination", "seq_rep", "fact_error")
LOWER_IS_BETTER = ("repetition", "hallucination", "seq_rep", "rep_w", "fact_error", "unchecked", "loss", "false_")
MAX_SAMPLES = 8
MAX_POINTS = 1000  # per line: longer histories are thinned so the file stays small
ARROW = '<li class="arrow" aria-hidden="true">&#8594;</li>'
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
  padding:0 16px;color:#1b1f24}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:16px 0 6px}
.meta{color:#57606a} .note{color:#57606a;font-style:italic}
table{border-collapse:collapse;margin:6px 0} th,td{border:1px solid #d0d7de;padding:4px 8px;
  text-align:left;vertical-align:top} th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.flow{display:flex;flex-wrap:wrap;align-items:center;gap:6px;list-style:none;padding:0}
.flow li{border:2px solid #d0d7de;border-radius:6px;padding:6px 10px} .flow li.arrow{border:0;padding:0}
.done{color:#116329} .failed{color:#a40e26} .not-run{color:#8c959f}
.flow li.done{border-color:#2da44e} .flow li.failed{border-color:#cf222e}
.badge{display:inline-block;border:2px solid;border-radius:10px;padding:0 8px;font-weight:600}
.better{color:#116329} .worse{color:#a40e26}
.plots{display:flex;flex-wrap:wrap;gap:12px}
svg.plot{border:1px solid #d0d7de;border-radius:4px;background:#fff}
pre{white-space:pre-wrap;word-break:break-word;margin:0}
pre.config{background:#f6f8fa;padding:10px;border-radius:4px}
.flag{color:#a40e26;font-size:12px;margin-top:4px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s"


# ---- reading a run -------------------------------------------------------------------------------

def load_run(run_dir: Path) -> dict[str, Any]:
    """The run's config, stage records (with ``index``/``dir``/``status``) and configured stage names."""
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    config_text = config_path.read_text() if config_path.exists() else ""
    config = (yaml.safe_load(config_text) if config_text else None) or {}
    if summary_path.exists():
        records = json.loads(summary_path.read_text())["stages"]
    else:  # killed before the summary: every finished stage still left its metrics.json
        records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("[0-9][0-9]-*/metrics.json"))]
    for i, record in enumerate(records):  # stages run in order, so the i-th record is stage i
        record["index"] = i
        record["dir"] = run_dir / f"{i:02d}-{record['stage']}"
        record.setdefault("status", "done")
    planned = [next(iter(s)) for s in config.get("stages", []) if isinstance(s, dict) and s]
    return {"config_text": config_text, "config": config, "stages": records, "planned": planned}


def read_samples(path: Path, by: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """The first sample per prompt, keyed by the prompt's text, in file order; grouped by the
    value of field ``by`` (an evaluation's ``model``), or all in group ""."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in iter_jsonl(path):
        out.setdefault(str(row.get(by, "")) if by else "", {}).setdefault(prompt_text(row.get("prompt")), row)
    return out


def made_by(model: str | None) -> str:
    """``00-sft`` for a model a stage of the run wrote, else the model's own name."""
    path = Path(model or "")
    if re.fullmatch(r"\d\d-.+", path.parent.name):
        return path.parent.name
    return path.name or "base model"


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and prompt:  # chat messages: the question is the last turn
        return str(prompt[-1].get("content", "")) if isinstance(prompt[-1], dict) else str(prompt[-1])
    return "" if prompt is None else str(prompt)


# ---- SVG line charts -----------------------------------------------------------------------------

def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    every = math.ceil(len(points) / MAX_POINTS)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], metric: str, stage: str) -> str:
    """A polyline chart of ``series`` (name -> finite (x, y) points, at least one), with axes, ticks
    and a legend."""
    width, height, left, right, top, bottom = 380, 230, 58, 12, 30, 34
    series = {k: thin(v) for k, v in series.items()}
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg class="plot" data-metric="{esc(metric)}" data-stage="{esc(stage)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
        f"<title>{esc(title)}</title>",
        f'<text x="{left}" y="16" font-size="13" font-weight="600">{esc(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#57606a"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#57606a"/>',
    ]
    for t in ticks(y0, y1):
        parts.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{width - right}" y2="{py(t):.1f}" stroke="#eaeef2"/>'
                     f'<text x="{left - 4}" y="{py(t) + 4:.1f}" font-size="10" text-anchor="end">{t:.3g}</text>')
    for t in ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">{t:.4g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" font-size="11" text-anchor="middle">step</text>')
    for i, (name, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline class="series" data-series="{esc(name)}" fill="none" stroke="{color}" '
                     f'stroke-width="2" points="{coords}"/>')
        if len(points) == 1:
            parts.append(f'<circle cx="{px(points[0][0]):.1f}" cy="{py(points[0][1]):.1f}" r="3" fill="{color}"/>')
        if len(series) > 1:
            y = top + 4 + 13 * i
            parts.append(f'<rect x="{width - right - 110}" y="{y - 8}" width="10" height="3" fill="{color}"/>'
                         f'<text x="{width - right - 96}" y="{y}" font-size="10">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---- sections ------------------------------------------------------------------------------------

def section_pipeline(run: dict[str, Any]) -> str:
    records = run["stages"]
    planned = run["planned"] or [r["stage"] for r in records]
    items, rows = [], []
    for i, name in enumerate(planned):
        record = records[i] if i < len(records) else {"stage": name, "status": "not run"}
        status = record["status"]
        css = status.replace(" ", "-")
        items.append(f'<li class="{css}" data-status="{esc(status)}">{i:02d} {esc(name)}<br>'
                     f'<small>{esc(status)} · {duration(record.get("seconds"))}</small></li>')
        scalars = {k: v for k, v in (record.get("metrics") or {}).items() if not isinstance(v, (list, dict))}
        results = esc(record["error"]) if "error" in record else ", ".join(
            f"{esc(k)}={esc(fmt(v))}" for k, v in scalars.items())
        model = record.get("model") or ""
        rows.append(f'<tr data-stage="{esc(name)}" data-status="{esc(status)}"><td class="num">{i:02d}</td>'
                    f'<td>{esc(name)}</td><td class="{css}">{esc(status)}</td>'
                    f'<td class="num">{duration(record.get("seconds"))}</td>'
                    f'<td>{esc(Path(model).parent.name + "/" + Path(model).name if model else "-")}</td>'
                    f"<td>{results}</td></tr>")
    return ('<section id="pipeline"><h2>Pipeline</h2>'
            f'<ol class="flow">{ARROW.join(items)}</ol>'
            '<table id="stages"><thead><tr><th>#</th><th>stage</th><th>status</th><th>duration</th>'
            f'<th>model out</th><th>results</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def section_curves(run: dict[str, Any]) -> str:
    body, drawn = "", set()
    for record in run["stages"]:
        history = (record.get("metrics") or {}).get("history") or []
        label = f"{record['index']:02d}-{record['stage']}"
        charts = []
        for group, keys in CURVES.items():
            series = {k: [(float(h.get("step", i + 1)), float(h[k])) for i, h in enumerate(history)
                          if isinstance(h.get(k), (int, float)) and math.isfinite(h[k])] for k in keys}
            series = {k: v for k, v in series.items() if v}
            if series:
                charts.append(line_chart(f"{label}: {group}", series, group, label))
                drawn.add(group)
        if charts:
            body += f'<h3>{esc(label)}</h3><div class="plots">{"".join(charts)}</div>'
    missing = [group for group in CURVES if group not in drawn]
    if missing:
        body += f'<p class="note">Not recorded by any stage of this run: {esc(", ".join(missing))}.</p>'
    return f'<section id="curves"><h2>Training curves</h2>{body}</section>'


def section_fixes(run: dict[str, Any]) -> str:
    """Evaluations of the fixes against their baselines; then other stages' fix measurements."""
    evaluations, measured = [], []
    for record in run["stages"]:
        numbers = {k: v for k, v in (record.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        fixes = [k for k in numbers if any(w in k for w in FIX_WORDS) and not k.endswith("_before")]
        label = f"{record['index']:02d}-{record['stage']}"
        paired = [k for k in numbers if f"{k}_before" in numbers]
        if any(k in paired for k in fixes):
            paired.sort(key=lambda k: k not in fixes)  # the fixes' own rows first
            rows = [(k, [numbers[f"{k}_before"], numbers[k]]) for k in paired]
            evaluations.append(f"<h3>{esc(label)}</h3>" + fix_table(["before", "after"], rows, change=True))
        elif fixes:
            measured.append((label, record["stage"], {k: numbers[k] for k in fixes}))
    body = "".join(evaluations)
    if measured:
        names = list(dict.fromkeys(k for _, _, values in measured for k in values))
        # Stages of one kind (two `generate`s) measure the same prompts, so their change means something.
        same_kind = len(measured) > 1 and len({kind for _, kind, _ in measured}) == 1
        title = "Measured by other stages" if evaluations else "Measured by stage"
        body += f"<h3>{title}</h3>" + fix_table([label for label, _, _ in measured],
                                                [(k, [values.get(k) for _, _, values in measured]) for k in names],
                                                change=same_kind)
    if not body:
        body = ('<p class="note">No stage of this run measured repetition or hallucination (a metric named '
                "*repetition* or *hallucination*), so there is no before/after table.</p>")
    return f'<section id="fixes"><h2>Fixes: before and after</h2>{body}</section>'


def fix_table(columns: list[str], rows: list[tuple[str, list[float | None]]], change: bool) -> str:
    """Rows of values, one per column; ``change`` adds last minus first, coloured where lower is better."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns) + ("<th>change</th>" if change else "")
    body = []
    for name, values in rows:
        cells = "".join(f'<td class="num">{esc(fmt(v))}</td>' for v in values)
        seen = [v for v in values if v is not None]
        if change:
            delta = seen[-1] - seen[0] if len(seen) > 1 else None
            css = ""
            if delta and any(w in name for w in LOWER_IS_BETTER):
                css = "better" if delta < 0 else "worse"
            cells += f'<td class="num"><span class="{css}">{"" if delta is None else f"{delta:+.4g}"}</span></td>'
        body.append(f'<tr data-metric="{esc(name)}"><td>{esc(name)}</td>{cells}</tr>')
    return (f'<table class="fix-table"><thead><tr><th>metric</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def section_samples(run: dict[str, Any]) -> str:
    """The generation stages side by side (same prompts), then each evaluation's models side by side."""
    tables, generated = [], []
    for record in run["stages"]:
        label = f"{record['index']:02d}-{record['stage']}"
        if record["status"] != "done":
            continue
        if (record["dir"] / "generations.jsonl").exists():
            rows = read_samples(record["dir"] / "generations.jsonl").get("", {})
            generated.append((f"{label} ({made_by(record.get('input_model'))})", rows))
        if (record["dir"] / "evaluation.jsonl").exists():
            models = read_samples(record["dir"] / "evaluation.jsonl", by="model")
            tables.append((f"{label}: the same prompts for each model, changed and flagged answers first",
                           [(column(m, rows), rows) for m, rows in models.items()]))
    if generated:
        note = ("each generation stage's answers, first stage on the left" if len(generated) > 1
                else "one generation stage only: no before/after comparison")
        tables.insert(0, (f"Generation stages: {note}", generated))
    if not tables:
        return '<section id="samples"><h2>Sample generations</h2><p class="note">No stage generated samples.</p></section>'
    return '<section id="samples"><h2>Sample generations</h2>' + "".join(
        f"<h3>{esc(title)}</h3>" + samples_table(sources) for title, sources in tables) + "</section>"


def column(model: str, rows: dict[str, dict[str, Any]]) -> str:
    """An evaluation's column: the model, and its role (before, after) where the rows name it."""
    label = next(iter(rows.values())).get("label")
    return f"{label}: {made_by(model)}" if label else f"model {made_by(model)}"


def samples_table(sources: list[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """Up to MAX_SAMPLES prompts, one column per source. First the prompts a fix changed (an answer
    flagged by one model and not by another), then those still flagged, then the rest."""
    prompts = list(dict.fromkeys(p for _, rows in sources for p in rows))
    flags = {p: [bool(rows.get(p, {}).get("findings")) for _, rows in sources] for p in prompts}
    changed = [p for p in prompts if len(set(flags[p])) > 1]
    flagged = [p for p in prompts if any(flags[p])]
    chosen = list(dict.fromkeys(changed + flagged + prompts))[:MAX_SAMPLES]
    head = "".join(f"<th>{esc(label)}</th>" for label, _ in sources)
    body = []
    for prompt in chosen:
        reference = next(rows[prompt].get("reference") for _, rows in sources if prompt in rows)
        cells = ""
        for _, rows in sources:
            row = rows.get(prompt, {})
            kinds = sorted({f.get("kind", name) if isinstance(f, dict) else name
                            for name, f in (row.get("findings") or {}).items()})
            flag = f'<div class="flag">flagged: {esc(", ".join(kinds))}</div>' if kinds else ""
            cells += f'<td><pre class="gen">{esc(row.get("completion", "-"))}</pre>{flag}</td>'
        body.append(f"<tr><td><pre>{esc(prompt)}</pre></td><td><pre>{esc(fmt(reference))}</pre></td>{cells}</tr>")
    return (f'<table class="sample-table"><thead><tr><th>prompt</th><th>reference</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def section_config(run: dict[str, Any]) -> str:
    text = run["config_text"] or "(config.yaml missing)"
    return f'<section id="config"><h2>Resolved config</h2><pre class="config">{esc(text)}</pre></section>'


def build_report(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    statuses = [r["status"] for r in run["stages"]]
    if "failed" in statuses:
        state = f"failed in stage {statuses.index('failed'):02d}"
    elif run["planned"] and len(statuses) < len(run["planned"]):
        state = "incomplete"
    else:
        state = "finished"
    css = "failed" if state.startswith("failed") else "done" if state == "finished" else "not-run"
    total = sum(r.get("seconds") or 0 for r in run["stages"])
    model = run["config"].get("model") or "embedded tiny model"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>rayalign report: {esc(run_dir.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>rayalign run {esc(run_dir.name)}</h1>"
        f'<p class="meta"><span id="run-status" class="badge {css}">{esc(state)}</span> '
        f"{statuses.count('done')} of {len(run['planned']) or len(statuses)} stages done · {duration(total)} · "
        f"model {esc(model)} · {esc(run_dir)} · report written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"
        + section_pipeline(run) + section_curves(run) + section_fixes(run) + section_samples(run)
        + section_config(run) + "</body></html>"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into ``run_dir`` (atomically) and return its path."""
    path = Path(run_dir) / "report.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(build_report(run_dir), encoding="utf-8")
    tmp.replace(path)
    return path
