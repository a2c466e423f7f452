"""A resume continues the same run or stops: changed seed, ranks, grad_accum, stage list or data
contents are named in one line before any work; ``resume.allow_changes`` lets safe changes through
and records them."""

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from rayalign.config import RunConfig
from rayalign.errors import ConfigError
from rayalign.resume_check import CHANGES, check_resume, write_fingerprint

log = logging.getLogger("test")
SFT = {"sft": {"epochs": 1, "lr": 1e-4, "grad_accum": 1}}
DPO = {"dpo": {"beta": 0.1, "lr": 5e-7}}


def config(data_file, **changes) -> RunConfig:
    raw = {"seed": 0, "data": {"sft": str(data_file)}, "stages": [SFT, DPO]}
    raw.update(changes)
    return RunConfig.model_validate(raw)


@pytest.fixture
def started(tmp_path):
    """An output directory as the first start leaves it, and the data file it trained on."""
    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    out = tmp_path / "run"
    out.mkdir()
    write_fingerprint(out, config(data))
    return out, data


def test_the_same_settings_resume_silently(started):
    out, data = started
    check_resume(out, config(data, resume=True, timeouts={"step_s": 60}), [], log)  # deadlines decide nothing
    assert not (out / CHANGES).exists()


@pytest.mark.parametrize("change, named", [
    ({"seed": 1}, "seed 0 -> 1"),
    ({"resources": {"trainer": {"num_workers": 2}}}, "resources.trainer.num_workers 1 -> 2"),
    ({"stages": [{"sft": {**SFT["sft"], "grad_accum": 4}}, DPO]}, "stages[0].sft.grad_accum 1 -> 4"),
    ({"stages": [DPO, SFT]}, 'stages ["sft", "dpo"] -> ["dpo", "sft"]'),
    ({"stages": [SFT]}, "stages[1].dpo.beta 0.1 -> null"),
])
def test_a_changed_setting_is_refused_in_one_line_naming_it(started, change, named):
    out, data = started
    before = sorted(os.listdir(out))
    with pytest.raises(ConfigError) as exc:
        check_resume(out, config(data, **change), [], log)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"config error: resume: {out} was started with other settings")
    assert named in message and "resume.allow_changes" in message
    assert sorted(os.listdir(out)) == before  # nothing written


def test_changed_data_contents_are_refused_though_the_path_is_the_same(started):
    out, data = started
    data.write_text(data.read_text().replace("hello", "hello there"))
    with pytest.raises(ConfigError, match=r"data\.sft \(contents\) \""):
        check_resume(out, config(data), [], log)


def test_allowed_changes_pass_and_are_recorded(started):
    out, data = started
    lower = [{"sft": {**SFT["sft"], "lr": 5e-5}}, {"dpo": {**DPO["dpo"], "lr": 1e-7}}]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.sft\.lr .*stages\[1\]\.dpo\.lr"):
        check_resume(out, config(data, stages=lower), [], log)
    check_resume(out, config(data, stages=lower), ["lr"], log)  # every stage's lr
    check_resume(out, config(data, stages=[lower[0], DPO]), ["stages[0].sft.lr"], log)  # that one only
    with pytest.raises(ConfigError, match=r"stages\[1\]\.dpo\.lr"):
        check_resume(out, config(data, stages=lower), ["stages[0].sft.lr"], log)
    records = [json.loads(line) for line in (out / CHANGES).read_text().splitlines()]
    assert [sorted(r["changes"]) for r in records] == [["stages[0].sft.lr", "stages[1].dpo.lr"], ["stages[0].sft.lr"]]
    assert records[0]["changes"]["stages[1].dpo.lr"] == [5e-7, 1e-7]


def test_a_stage_appended_after_the_last_is_new_work_not_a_change(started):
    out, data = started
    check_resume(out, config(data, stages=[SFT, DPO, {"generate": {}}]), [], log)
    assert "stages" in json.loads((out / CHANGES).read_text())["changes"]


def test_resume_takes_true_or_a_mapping():
    assert RunConfig.model_validate({"resume": True}).resume.enabled
    assert not RunConfig.model_validate({}).resume
    cfg = RunConfig.model_validate({"resume": {"allow_changes": ["lr"]}})
    assert cfg.resume.enabled and cfg.resume.allow_changes == ["lr"]
    cfg.resume = True  # assignment is validated like the file
    assert cfg.resume.enabled


def test_the_command_stops_before_any_work_and_leaves_the_run_as_it_was(tmp_path):
    """`rayalign run` on a run with a finished stage, resumed with another seed: exit 2, one line, no Ray."""
    out = tmp_path / "run"
    first = {"output_dir": str(out), "stages": [{"sft": {"epochs": 1}}, {"generate": {}}]}
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(first))
    write_fingerprint(out, RunConfig.model_validate(first))
    (out / "00-sft").mkdir()
    (out / "00-sft" / "metrics.json").write_text("{}")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({**first, "seed": 7}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "rayalign", "run", str(config_file), "resume=true"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rayalign: config error: resume: {out} was started with other "
                                                   "settings: seed 0 -> 7"), proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
