"""report.html: built from a run's outputs, rendered by a real headless browser, rewritten by the CLI.

The browser tests use a run directory written by hand (summary.json, config.yaml, generations),
so they need no training; one slow test runs the real pipeline and reads what it wrote.
"""

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from rayalign.report import COLORS, build_report, write_report

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium: apt-get install -y chromium (.ci/run does)")
EVIL = "<script>alert('x')</script> & \"quotes\""


def history(steps: int, **curves) -> list[dict]:
    """Per-step dicts as TrainerSession.fit records them; each curve is a function of the step."""
    return [{"step": s, "count": 90.0, **{k: f(s) for k, f in curves.items()}} for s in range(1, steps + 1)]


def fake_run(root: Path) -> Path:
    """SFT -> generate -> DPO -> evaluate -> generate -> a failed GRPO stage -> one never run."""
    run = root / "run-2026"
    run.mkdir()
    stages = [{"sft": {"epochs": 2}}, {"generate": {}}, {"dpo": {"beta": 0.1}}, {"evaluate": {}},
              {"generate": {}}, {"grpo": {}}, {"generate": {}}]
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "/models/qwen-0.5b", "output_dir": str(run),
                                                     "seed": 7, "stages": stages}, sort_keys=False))
    # NaN, as weighted_mean records a metric no micro-batch had: never plotted, never fatal.
    sft = history(40, loss=lambda s: 6 / s, lr=lambda s: 1e-3, grad_norm=lambda s: 5 / s ** 0.5 if s > 1 else float("nan"),
                  kl=lambda s: float("nan"))
    dpo = history(12, loss=lambda s: 0.69 - s / 40, reward_margin=lambda s: s / 10, chosen_reward=lambda s: s / 20,
                  rejected_reward=lambda s: -s / 20, reward_accuracy=lambda s: min(1.0, 0.5 + s / 20),
                  kl=lambda s: s / 100, lr=lambda s: 5e-7, grad_norm=lambda s: 1.0)
    records = [
        {"stage": "sft", "seconds": 95.2, "input_model": "/models/qwen-0.5b", "model": str(run / "00-sft/model"),
         "datasets": {}, "metrics": {"eval_loss_before": 6.2, "eval_loss": 0.31, "steps": 40, "history": sft}},
        {"stage": "generate", "seconds": 20.0, "input_model": str(run / "00-sft/model"), "model": None,
         "datasets": {"generations": str(run / "01-generate/generations.jsonl")},
         "metrics": {"distinct_2": 0.61, "repetition_rate": 0.4, "samples": 3}},
        {"stage": "dpo", "seconds": 61.0, "input_model": str(run / "00-sft/model"), "model": str(run / "02-dpo/model"),
         "datasets": {}, "metrics": {"reward_accuracy_before": 0.5, "reward_accuracy": 0.8, "history": dpo}},
        {"stage": "evaluate", "seconds": 5.0, "input_model": str(run / "02-dpo/model"), "model": None, "datasets": {},
         "metrics": {"repetition_rate_before": 0.3, "repetition_rate": 0.05,
                     "hallucination_rate_before": 0.4, "hallucination_rate": 0.45,
                     "accuracy_before": 0.6, "accuracy": 0.7, "decline_rate_before": None, "decline_rate": None,
                     "table": ["| metric | before | after |"], "samples": 30}},
        {"stage": "generate", "seconds": 19.0, "input_model": str(run / "02-dpo/model"), "model": None,
         "datasets": {"generations": str(run / "04-generate/generations.jsonl")},
         "metrics": {"distinct_2": 0.7, "repetition_rate": 0.1, "samples": 3}},
        {"stage": "grpo", "status": "failed", "seconds": 3.5, "error": "WorkerError: worker grpo/trainer/0: died"},
    ]
    (run / "summary.json").write_text(json.dumps({"stages": records, "lineage": []}))
    answers = {1: ["Alice lives in Paris Paris Paris", "Bob is 41", EVIL], 4: ["Alice lives in Lyon.", "Bob is 42.", "fine"]}
    questions = ["Where does Alice live?", "How old is Bob?", f"Tricky {EVIL}?"]
    for index, completions in answers.items():
        (run / f"{index:02d}-generate").mkdir()
        with open(run / f"{index:02d}-generate" / "generations.jsonl", "w") as fh:
            for q, c in zip(questions, completions):
                fh.write(json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
                                     "completion": c, "reference": "Lyon" if "Alice" in q else None, "num_tokens": 5}) + "\n")
    # An evaluation answers its own prompts with the baseline and the new model, and flags answers.
    (run / "03-evaluate").mkdir()
    with open(run / "03-evaluate" / "evaluation.jsonl", "w") as fh:
        for label, model, answer, findings in (
                ("before", run / "00-sft/model", "red red red red", {"loop": {"kind": "repetition"}}),
                ("after", run / "02-dpo/model", "Red.", {})):
            for q, a, f in (("Colour of the sky at dusk?", "blue", {}), ("Colour of Carol's car?", answer, findings)):
                fh.write(json.dumps({"label": label, "model": str(model), "prompt": [{"role": "user", "content": q}],
                                     "completion": a, "reference": "red", "findings": f}) + "\n")
    return run


class Dom(HTMLParser):
    """The browser's serialised DOM as (tag, attrs, text) elements, text including descendants'."""

    def __init__(self, markup: str):
        super().__init__()
        self.elements: list[tuple[str, dict, list[str]]] = []
        self.open: list[tuple[str, dict, list[str]]] = []
        self.markup = markup
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        element = (tag, dict(attrs), [])
        self.elements.append(element)
        if tag not in ("br", "meta", "hr", "img", "input", "link"):  # HTML's void elements never close
            self.open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), []))

    def handle_endtag(self, tag):
        if any(t == tag for t, _, _ in self.open):
            while self.open.pop()[0] != tag:
                pass

    def handle_data(self, data):
        for _, _, text in self.open:
            text.append(data)

    def find(self, tag: str, **attrs) -> list[tuple[str, dict, str]]:
        return [(t, a, "".join(x)) for t, a, x in self.elements
                if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]


def browser(url: str, *args: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={user_dir}", "--hide-scrollbars", *args, url],
        capture_output=True, text=True, timeout=120, check=True,
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run = fake_run(tmp)
    path = write_report(run)
    dom = browser(path.as_uri(), "--dump-dom", user_dir=tmp / "chromium").stdout
    return path, Dom(dom)


@needs_browser
def test_pipeline_table_shows_each_stage_status_and_duration(rendered):
    _, dom = rendered
    rows = dom.find("tr")
    stages = [(a["data-stage"], a["data-status"]) for _, a, _ in rows if "data-stage" in a]
    assert stages == [("sft", "done"), ("generate", "done"), ("dpo", "done"), ("evaluate", "done"),
                      ("generate", "done"), ("grpo", "failed"), ("generate", "not run")]
    text = {a["data-stage"] + a["data-status"]: t for _, a, t in rows if "data-stage" in a}
    assert "1m 35s" in text["sftdone"] and "eval_loss=0.31" in text["sftdone"]
    assert "WorkerError: worker grpo/trainer/0: died" in text["grpofailed"]
    assert dom.find("span", id="run-status")[0][2] == "failed in stage 05"
    assert len(dom.find("li", **{"class": "done"})) == 5  # the flow diagram, one box per stage


@needs_browser
def test_loss_reward_and_kl_are_plotted_per_training_stage(rendered):
    _, dom = rendered
    plots = {(a["data-stage"], a["data-metric"]) for _, a, _ in dom.find("svg", **{"class": "plot"})}
    assert plots == {(stage, metric) for stage in ("00-sft", "02-dpo") for metric in ("loss", "learning rate", "grad norm")} | {
        ("02-dpo", "reward"), ("02-dpo", "reward accuracy"), ("02-dpo", "KL")}
    lines = {a["data-series"]: a["points"].split() for _, a, _ in dom.find("polyline")}
    assert len(lines["loss"]) in (40, 12) and len(lines["kl"]) == 12
    assert set(lines) >= {"reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy", "lr", "grad_norm"}
    # SFT's loss falls, so its line descends on screen (SVG y grows downwards).
    sft_loss = next(a["points"].split() for _, a, _ in dom.find("polyline") if a["data-series"] == "loss"
                    and len(a["points"].split()) == 40)
    assert float(sft_loss[0].split(",")[1]) < float(sft_loss[-1].split(",")[1])


@needs_browser
def test_fix_tables_compare_an_evaluation_with_its_baseline_and_like_stages_with_each_other(rendered):
    _, dom = rendered
    section = re.search(r'<section id="fixes">.*?</section>', dom.markup, re.S).group(0)
    evaluation, measured = [Dom(t) for t in re.findall(r'<table class="fix-table">.*?</table>', section, re.S)]
    rows = {a["data-metric"]: t for _, a, t in evaluation.find("tr") if "data-metric" in a}
    # The evaluation's fix metrics first, then what else it reports before and after (not None, not lists).
    assert list(rows) == ["repetition_rate", "hallucination_rate", "accuracy"]
    changes = dict(zip(rows, [(a["class"], t) for _, a, t in evaluation.find("span")]))  # one per row, in order
    assert changes["repetition_rate"] == ("better", "-0.25")
    assert changes["hallucination_rate"] == ("worse", "+0.05")  # a regression is shown as one
    assert changes["accuracy"] == ("", "+0.1")  # no judgement where higher may be better
    assert [t for _, _, t in evaluation.find("th")] == ["metric", "before", "after", "change"]
    # The two generate stages measured the same prompts before and after DPO: compared too.
    assert [t for _, _, t in measured.find("th")] == ["metric", "01-generate", "04-generate", "change"]
    row = next(t for _, a, t in measured.find("tr") if a.get("data-metric") == "repetition_rate")
    assert "0.4" in row and "0.1" in row and "-0.3" in row
    assert [t for _, _, t in dom.find("h3")].count("03-evaluate") == 1


@needs_browser
def test_samples_before_and_after_side_by_side_and_escaped(rendered):
    path, dom = rendered
    headers = [t for _, _, t in dom.find("th")]
    assert "01-generate (00-sft)" in headers and "04-generate (02-dpo)" in headers
    row = next(t for _, a, t in dom.find("tr") if "Where does Alice live?" in t and "data-stage" not in a)
    assert "Alice lives in Paris Paris Paris" in row and "Alice lives in Lyon." in row
    assert "Be brief." not in row  # the question shown is the user's turn, not the system prompt
    assert EVIL in "".join(t for _, _, t in dom.find("td"))  # shown as text...
    assert not dom.find("script")  # ...never run: the report has no script at all
    # The evaluation's models side by side, the prompt with a flagged answer first.
    evaluation = Dom(re.findall(r'<table class="sample-table">.*?</table>', dom.markup, re.S)[1])
    assert [t for _, _, t in evaluation.find("th")] == ["prompt", "reference", "before: 00-sft", "after: 02-dpo"]
    first = evaluation.find("tr")[1][2]
    assert first.startswith("Colour of Carol's car?") and "red red red red" in first and "Red." in first
    assert [t for _, _, t in evaluation.find("div", **{"class": "flag"})] == ["flagged: repetition"]
    html = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # self-contained: nothing fetched


@needs_browser
def test_resolved_config_is_shown(rendered):
    _, dom = rendered
    config = dom.find("pre", **{"class": "config"})[0][2]
    assert yaml.safe_load(config)["seed"] == 7 and "/models/qwen-0.5b" in config


@needs_browser
def test_plots_are_drawn_on_screen(rendered, tmp_path):
    from PIL import Image

    path, _ = rendered
    shot = tmp_path / "report.png"
    browser(path.as_uri(), f"--screenshot={shot}", "--window-size=1280,2400", user_dir=tmp_path / "chromium")
    pixels = Image.open(shot).convert("RGB").tobytes()
    blue = tuple(int(COLORS[0][i : i + 2], 16) for i in (1, 3, 5))
    near = sum(1 for p in zip(pixels[0::3], pixels[1::3], pixels[2::3]) if sum(abs(a - b) for a, b in zip(p, blue)) < 60)
    assert near > 1000, f"only {near} pixels of the first plot colour: plots not drawn"


def test_cli_rewrites_report_also_for_a_run_killed_before_its_summary(tmp_path):
    run = fake_run(tmp_path)
    (run / "summary.json").unlink()  # killed: only the finished stages' metrics.json remain
    for index, name in ((0, "sft"), (1, "generate")):
        (run / f"{index:02d}-{name}").mkdir(exist_ok=True)
        (run / f"{index:02d}-{name}" / "metrics.json").write_text(json.dumps(
            {"stage": name, "seconds": 1.0, "input_model": None, "model": None, "datasets": {},
             "metrics": {"steps": 3, "history": history(3, loss=lambda s: 1 / s)} if name == "sft" else {}}))
    rayalign = Path(sys.executable).parent / "rayalign"
    proc = subprocess.run([rayalign, "report", str(run)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report.html")
    html = (run / "report.html").read_text()
    assert "2 of 7 stages done" in html and 'data-status="not run"' in html and 'data-metric="loss"' in html

    missing = subprocess.run([rayalign, "report", str(tmp_path / "nope")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "not a run directory" in missing.stderr


def test_report_says_so_when_nothing_was_measured(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"stages": [
        {"stage": "sft", "seconds": 1.0, "metrics": {"history": history(2, loss=lambda s: 1.0)}}]}))
    html = build_report(run)
    assert "No stage of this run measured repetition or hallucination" in html
    assert "No stage generated samples" in html and "Not recorded by any stage of this run: reward" in html


@pytest.mark.slow
def test_real_pipeline_writes_report_exports_metrics_and_marks_a_failed_stage(tmp_path):
    import ray

    from rayalign.config import RunConfig
    from rayalign.errors import ConfigError
    from rayalign.pipeline import run_pipeline
    from test_telemetry import series, wait_for_series

    out = tmp_path / "run"
    sft = {"sft": {"epochs": 1, "max_tokens_per_micro_batch": 128}}
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="rayalign-tests")
    try:
        run_pipeline(RunConfig(stages=[sft], output_dir=str(out)))
        html = (out / "report.html").read_text()
        assert 'data-stage="sft" data-status="done"' in html and 'data-metric="loss"' in html
        steps = json.loads((out / "summary.json").read_text())["stages"][0]["metrics"]["steps"]

        # Progress and the pipeline fed the dashboard's metrics while the stage ran.
        node = ray.nodes()[0]
        wait_for_series(node["MetricsExportPort"], [
            series("ray_rayalign_step", f"{steps:.1f}", stage="sft", role="trainer"),
            series("ray_rayalign_progress", "1.0", stage="sft", role="trainer"),
            series("ray_rayalign_loss", None, stage="sft", role="trainer"),
            series("ray_rayalign_lr", None, stage="sft", role="trainer"),
            series("ray_rayalign_grad_norm", None, stage="sft", role="trainer"),
            series("ray_rayalign_throughput_per_s", None, stage="sft", role="trainer"),
            series("ray_rayalign_stage_status", "2.0", stage="sft", role="driver"),
            series("ray_rayalign_eval_loss", None, stage="sft", role="driver"),
        ], node["NodeManagerAddress"])

        # Resume with a second stage that cannot be placed: SFT is kept, the report names the failure.
        failing = RunConfig(stages=[sft, {"generate": {}}], output_dir=str(out), resume=True)
        failing.resources.rollout.num_gpus = 1
        with pytest.raises(ConfigError, match="cannot fit"):
            run_pipeline(failing)
    finally:
        ray.shutdown()
    html = (out / "report.html").read_text()
    assert 'data-stage="sft" data-status="done"' in html
    assert 'data-stage="generate" data-status="failed"' in html and "GPU: needs 1" in html
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["stage"], s.get("status", "done")) for s in summary["stages"]] == [("sft", "done"), ("generate", "failed")]
