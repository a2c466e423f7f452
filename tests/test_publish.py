"""The docs' benchmark figures are what ``benchmarks/publish.py`` writes from the committed result files.

Every figure README.md and docs/ quote from a benchmark sits in a ``<!-- publish:NAME -->`` region;
the renderer runs here in-process on the committed files and docs, so a hand-edited figure, a
stale table after a new result file, or a figure whose file is gone fails this test.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # as the benchmark scripts put it themselves

import publish  # noqa: E402

PERFORMANCE = "docs/performance.md"


def test_every_committed_doc_is_what_publish_writes():
    problems = publish.publish(REPO, write=False)
    assert not problems, ("\n".join(problems) + "\nrun `python benchmarks/publish.py` and commit the docs "
                          "(prose goes outside the <!-- publish:... --> regions)")


def test_every_region_names_the_files_it_was_written_from():
    results = publish.Results.load()
    for name in publish.REGIONS:
        body = publish.render_region(name, results)
        cited = [f for f in results.files if f"`{f.path}`" in body]
        assert cited, f"region '{name}' names no result file"
        for f in cited:
            assert (REPO / f.path).is_file(), f"region '{name}' names {f.path}, which is not committed"


def _repo_copy(tmp_path: Path) -> Path:
    """The docs and result files in a scratch repository, for edits the real ones must not see."""
    root = tmp_path / "repo"
    for doc in publish.doc_paths(REPO):
        (root / doc.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(doc, root / doc.relative_to(REPO))
    shutil.copytree(REPO / "benchmarks" / "results", root / "benchmarks" / "results")
    return root


def test_a_changed_result_file_changes_the_region_and_the_check_names_it(tmp_path):
    root = _repo_copy(tmp_path)
    path = root / "benchmarks" / "results" / "h200-20261203-grpo_step-0.5b.json"
    result = json.loads(path.read_text())
    before = publish.render_region("targets", publish.Results.load(root / "benchmarks" / "results"))
    assert "**3.09 s**" in before
    result["summary"]["step_seconds_median"]["rayalign"] = 2.5
    result["summary"]["time_vs_trl"] = 2.5 / result["summary"]["step_seconds_median"]["trl"]
    path.write_text(json.dumps(result))

    after = publish.render_region("targets", publish.Results.load(root / "benchmarks" / "results"))
    assert "**2.50 s**" in after and "**3.09 s**" not in after and "**0.46×**" in after
    problems = publish.publish(root, write=False)
    assert f"{PERFORMANCE}: region 'targets' differs from what benchmarks/publish.py writes" in problems
    assert "README.md: region 'readme-performance' differs from what benchmarks/publish.py writes" in problems

    assert publish.publish(root, write=True)  # rewrites, reporting what it rewrote
    assert publish.publish(root, write=False) == []
    assert "**2.50 s**" in (root / PERFORMANCE).read_text()


def test_a_newer_file_of_the_same_benchmark_replaces_the_older_one(tmp_path):
    root = _repo_copy(tmp_path)
    results = root / "benchmarks" / "results"
    old = json.loads((results / "h200-20261202-dpo_throughput-0.5b.json").read_text())
    old["when"] = "2026-12-09 10:00:00 UTC"
    old["summary"]["pairs_per_s_median"]["rayalign"] = 200.0
    (results / "h200-20261209-dpo_throughput-0.5b.json").write_text(json.dumps(old))
    body = publish.render_region("targets", publish.Results.load(results))
    assert "**200.0** pairs/s" in body and "h200-20261209-dpo_throughput-0.5b.json" in body
    assert "h200-20261202-dpo_throughput-0.5b.json" not in body


def test_the_gpu_tests_region_shows_the_newest_run_of_each_part_and_what_did_not_pass(tmp_path):
    root = _repo_copy(tmp_path)
    results = root / "benchmarks" / "results"
    run = json.loads((results / "h200-20261203-gpu_tests-kernels.json").read_text())
    run["when"] = "2026-12-09 10:00:00 UTC"
    first, second = list(run["tests"])[:2]
    run["tests"] = {first: {**run["tests"][first], "outcome": "failed", "reason": "AssertionError: loss 0.3 != 0.2"},
                    second: run["tests"][second]}
    run["unfinished"] = "tests/test_fast_paths.py::test_compiled_layers_match_the_eager_model_on_gpu"
    (results / "h200-20261209-gpu_tests-kernels.json").write_text(json.dumps(run))
    body = publish.render_region("gpu-tests", publish.Results.load(results))
    assert "h200-20261209-gpu_tests-kernels.json" in body and "h200-20261203-gpu_tests-kernels.json" not in body
    assert f"| `{first.split('/')[-1]}` | failed |" in body and "AssertionError: loss 0.3 != 0.2" in body
    assert "| `test_fast_paths.py::test_compiled_layers_match_the_eager_model_on_gpu` | unfinished" in body
    assert "| `engines` | not run yet |" in body  # a part with no file is named, not left out
    # The colocated GRPO peaks come from the tests' recorded properties, beside their plan.
    assert "| `test_colocated_grpo_fits_one_gpu_and_records_each_phase_peak[1.5b]` | generate |" in body


def test_a_run_on_the_tuning_split_never_becomes_the_fix_headline(tmp_path):
    # The newest fix_seeds file measured the eval split; the headline and the runs table keep to the
    # test split, and the tuning table shows the eval run.
    root = _repo_copy(tmp_path)
    results_dir = root / "benchmarks" / "results"
    tuning = results_dir / "trials" / "cpu-20261204-fix_seeds.json"
    newer = json.loads(tuning.read_text())
    newer["when"] = "2027-01-01T00:00:00+00:00"
    (results_dir / "cpu-20270101-fix_seeds.json").write_text(json.dumps(newer))
    results = publish.Results.load(results_dir)
    headline = publish.render_region("fix-seeds", results)
    assert "cpu-20261203-fix_seeds.json" in headline and "cpu-20270101-fix_seeds.json" not in headline
    runs = publish.render_region("fix-seeds-runs", results)
    assert "cpu-20270101-fix_seeds.json" not in runs and "cpu-20261204-fix_seeds.json" not in runs
    tuning_table = publish.render_region("fix-seeds-tuning", results)
    assert "cpu-20270101-fix_seeds.json" in tuning_table and "cpu-20261204-fix_seeds.json" in tuning_table
    assert "cpu-20261203-fix_seeds.json" not in tuning_table


def test_a_region_whose_file_is_missing_fails_naming_doc_region_and_file(tmp_path):
    root = _repo_copy(tmp_path)
    for path in (root / "benchmarks" / "results").rglob("cpu-*-fix_seeds.json"):
        path.unlink()
    readme = (root / "README.md").read_text()
    problems = publish.publish(root, write=True)
    assert any(p.startswith("README.md: region 'fix-seeds': no result file cpu-<yyyymmdd>-fix_seeds.json")
               for p in problems), problems
    assert (root / "README.md").read_text() == readme, "a doc was rewritten while a region could not be rendered"


def test_a_hand_edited_figure_inside_a_region_fails(tmp_path):
    root = _repo_copy(tmp_path)
    doc = root / "docs" / "practitioners.md"
    text = doc.read_text()
    assert "| 45,097 |" in text
    doc.write_text(text.replace("| 45,097 |", "| 55,097 |"))
    assert publish.publish(root, write=False) == [
        "docs/practitioners.md: region 'dataset-load' differs from what benchmarks/publish.py writes"]


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("<!-- /publish:sft-liger -->", ""), "not closed"),
    (lambda t: t + "\n<!-- /publish:sft-liger -->\n", "closes no open region"),
    (lambda t: t + "\n<!-- publish:sft-liger -->\n<!-- /publish:sft-liger -->\n", "region 'sft-liger' is in this doc twice"),
    (lambda t: t + "\n<!-- publish:no-such-table -->\n<!-- /publish:no-such-table -->\n",
     "no renderer for region 'no-such-table'"),
])
def test_broken_or_unknown_markers_fail_with_the_doc(tmp_path, edit, problem):
    root = _repo_copy(tmp_path)
    doc = root / PERFORMANCE
    doc.write_text(edit(doc.read_text()))
    problems = publish.publish(root, write=False)
    assert any(p.startswith(PERFORMANCE) and problem in p for p in problems), problems


def test_a_renderer_whose_region_was_deleted_from_the_docs_fails(tmp_path):
    root = _repo_copy(tmp_path)
    doc = root / PERFORMANCE
    text = doc.read_text()
    start, end = text.index("<!-- publish:sft-liger -->"), text.index("<!-- /publish:sft-liger -->")
    doc.write_text(text[:start] + text[end + len("<!-- /publish:sft-liger -->"):])
    assert "region 'sft-liger' has a renderer in benchmarks/doc_tables.py but is in no doc" in \
        " ".join(publish.publish(root, write=False))


def test_a_file_whose_fields_the_renderer_does_not_know_fails_naming_region_and_file(tmp_path):
    root = _repo_copy(tmp_path)
    path = root / "benchmarks" / "results" / "h200-20261203-sft_throughput-0.5b.json"
    result = json.loads(path.read_text())
    del result["summary"]["liger_vs_default"]
    path.write_text(json.dumps(result))
    problems = publish.publish(root, write=False)
    assert any(p.startswith(f"{PERFORMANCE}: region 'sft-liger': its renderer does not fit the file (KeyError")
               and "h200-20261203-sft_throughput-0.5b.json" in p for p in problems), problems


def test_a_result_file_for_a_target_without_a_row_asks_for_its_row(tmp_path):
    root = _repo_copy(tmp_path)
    results = root / "benchmarks" / "results"
    shutil.copy(results / "h200-20261203-grpo_step-0.5b.json", results / "h200-20261209-weight_sync-0.5b.json")
    problems = publish.publish(root, write=False)
    assert any("a weight_sync result file exists: write its target row" in p for p in problems), problems


def test_the_command_line_check_exits_1_and_names_the_region(tmp_path, monkeypatch, capsys):
    root = _repo_copy(tmp_path)
    doc = root / PERFORMANCE
    doc.write_text(doc.read_text().replace("| 72.6k |", "| 80.0k |"))
    monkeypatch.setattr(publish, "REPO", root)
    assert publish.main(["--check"]) == 1
    assert "docs/performance.md: region 'sft-liger' differs" in capsys.readouterr().err
    assert publish.main([]) == 0
    assert publish.main(["--check"]) == 0
