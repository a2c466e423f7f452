"""Bad records under both policies: every problem kind named by file:line and reason, counted.

``data.bad_records: skip`` (default) drops and counts; ``fail`` stops at the first. Under skip, a
file with no valid record or more than ``data.max_bad_fraction`` bad still stops the run.
"""

import json
import subprocess
import sys

import pytest
import yaml

from rayalign.data.chat import tokenize_conversation
from rayalign.data.datasets import load_records
from rayalign.data.validation import DataChecks, Policy, data_checks, within_max_length
from rayalign.errors import DataError
from rayalign.plugins import get_plugin_manager

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
EXAMPLE = {"prompt": "hi", "completion": "hello", "label": True}  # unpaired (KTO)
LONG = {"messages": [{"role": "user", "content": "tell me " * 100}, {"role": "assistant", "content": "no"}]}
BAD_BYTES_PAIR = b'{"prompt": "hi", "chosen": "hello", "rejected": "caf\xe9"}'  # Latin-1, not UTF-8

# kind -> (dataset kind, the bad line, what the reason says)
BAD = {
    "malformed_json": ("chat", '{"messages": [', r"malformed JSON"),
    "not_an_object": ("chat", "[1, 2]", r"expected a JSON object"),
    "missing_field": ("chat", {"text": "x"}, r"missing fields for a chat record"),
    "missing_field/role": ("chat", {"messages": [{"content": "x"}, GOOD["messages"][1]]},
                           r"field 'messages\[0\]\.role': missing"),
    "missing_field/pair": ("preference", {"prompt": "q", "chosen": "a"}, r"missing fields .*rejected"),
    "empty_field": ("chat", {"prompt": "  ", "completion": "4"}, r"field 'prompt': empty text"),
    "empty_field/assistant": ("chat", {"messages": [GOOD["messages"][0], {"role": "assistant", "content": ""}]},
                              r"field 'messages\[1\]\.content': empty assistant message"),
    "empty_field/chosen": ("preference", {"prompt": "q", "chosen": "", "rejected": "b"}, r"field 'chosen': empty"),
    "wrong_type": ("chat", {"messages": [{"role": "user", "content": 3}, GOOD["messages"][1]]},
                   r"field 'messages\[0\]\.content': expected string"),
    "unknown_role": ("chat", {"messages": [{"role": "bot", "content": "x"}, GOOD["messages"][1]]},
                     r"field 'messages\[0\]\.role': expected one of system, user, assistant, tool, got 'bot'"),
    "no_final_assistant": ("chat", {"messages": GOOD["messages"] + [{"role": "user", "content": "and?"}]},
                           r"does not end with an assistant message \(last role: user\)"),
    "duplicate_id": ("chat", {**GOOD, "id": "a3"}, r"duplicate id 'a3' \(first on line 3\)"),
    # Columns count characters, as JSON's do: "été " before the Latin-1 byte is 4 characters, 6 bytes.
    "invalid_utf8": ("chat", b'{"prompt": "caf\xff", "completion": "x"}',
                     r"not valid UTF-8 \(byte 0xff at column 16\)"),
    "invalid_utf8/after_multibyte": ("chat", '{"prompt": "été '.encode() + b'\xe9", "completion": "x"}',
                                     r"not valid UTF-8 \(byte 0xe9 at column 17\)"),
    "chosen_equals_rejected": ("preference", {"prompt": "q", "chosen": "same", "rejected": "same"},
                               r"chosen equals rejected"),
    # One answer as a string, the other as a message list: the same answer once both are messages.
    "chosen_equals_rejected/forms": ("preference", {"prompt": "q", "chosen": "same",
                                                    "rejected": [{"role": "assistant", "content": "same "}]},
                                     r"chosen equals rejected"),
    "missing_field/unpaired": ("unpaired", {"prompt": "q", "completion": "a"}, r"missing fields .*label"),
    "wrong_type/label": ("unpaired", {"prompt": "q", "completion": "a", "label": "yes"},
                         r"field 'label': expected true \(desirable\) or false, got 'yes'"),
    "wrong_type/label_number": ("unpaired", {"prompt": "q", "completion": "a", "label": 1},
                                r"field 'label': expected true \(desirable\) or false, got 1"),
    "empty_field/completion": ("unpaired", {"prompt": "q", "completion": " ", "label": False},
                               r"field 'completion': empty"),
}


def write(path, lines):
    """One line per item: bytes as they are, str as UTF-8, anything else as JSON."""
    def encoded(x):
        return x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()

    path.write_bytes(b"".join(encoded(x) + b"\n" for x in lines))
    return path


def dataset_with(tmp_path, kind, bad_line, good=20, at=11):
    """``good`` valid records (ids a1, a2, ...) with ``bad_line`` at line ``at``."""
    good_record = {"chat": GOOD, "preference": PAIR, "unpaired": EXAMPLE}[kind]
    lines = [{**good_record, "id": f"a{i + 1}"} for i in range(good)]
    lines.insert(at - 1, bad_line)
    return write(tmp_path / "d.jsonl", lines)


def load(path, kind, policy):
    return load_records(str(path), kind, get_plugin_manager().formats, 0, policy=policy)[0]


@pytest.mark.parametrize("case", list(BAD))
def test_every_problem_is_named_counted_and_skipped(tmp_path, case, caplog):
    kind, line, reason = BAD[case]
    path = dataset_with(tmp_path, kind, line)
    records = load(path, kind, Policy("skip"))
    assert len(records) == 20 and records.ledger.read == 21
    problem = case.split("/")[0]
    assert records.ledger.counts() == {problem: 1}
    assert records.ledger.summary() == {"kind": kind, "read": 21, "kept": 20, "skipped": 1,
                                        "problems": {problem: 1}}
    assert [r.line for r in records] == [i for i in range(1, 22) if i != 11]  # the rest, in order, with lines
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith(f"bad record: {path}:11: ") for m in warnings), warnings
    assert any(m.startswith(f"{path}: 1 of 21 {kind} records are bad ({problem}: 1); skipped") for m in warnings)


@pytest.mark.parametrize("case", list(BAD))
def test_every_problem_fails_a_fail_run_naming_file_and_line(tmp_path, case):
    kind, line, reason = BAD[case]
    path = dataset_with(tmp_path, kind, line)
    with pytest.raises(DataError, match=rf"^data error: {path}:11: .*{reason}.*\(data\.bad_records=fail\)$"):
        load(path, kind, Policy("fail"))


def test_a_format_plugins_own_error_is_an_invalid_record(tmp_path):
    import types

    from rayalign.data.formats import DataFormat
    from rayalign.hookspecs import hookimpl
    from rayalign.plugins import PluginManager

    def convert(record):
        if record["score"] < 0:
            raise ValueError("field 'score': must not be negative")
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": str(record["score"])}]}

    plugin = types.ModuleType("scored_format")
    plugin.register_data_formats = hookimpl(lambda register: register(DataFormat("scored", "chat", ("score",), convert)))
    formats = PluginManager(extra_plugins=(plugin,)).formats
    path = write(tmp_path / "d.jsonl", [{"score": i} for i in range(20)] + [{"score": -1}])
    records, _ = load_records(str(path), "chat", formats, 0, policy=Policy("skip"))
    assert len(records) == 20 and records.ledger.problems[0].kind == "invalid"
    assert records.ledger.problems[0].where == f"{path}:21"
    with pytest.raises(DataError, match=r"d\.jsonl:21: field 'score': must not be negative"):
        load_records(str(path), "chat", formats, 0, policy=Policy("fail"))


def test_too_long_after_the_template_is_a_bad_record_not_a_truncation(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [GOOD, GOOD, LONG, GOOD])

    def tokenize(r):
        return tokenize_conversation(tokenizer, r["messages"], None, where=r.where)

    records = load(path, "chat", Policy("skip", max_bad_fraction=0.5))
    kept, tokenized = within_max_length(records, tokenize, max_length=64)
    assert [r.line for r in kept] == [1, 2, 4] and all(len(t) <= 64 for t in tokenized)
    assert records.ledger.counts() == {"too_long": 1}
    assert "tokens after the chat template, above max_length=64" in records.ledger.problems[0].reason
    assert records.ledger.problems[0].where == f"{path}:3"

    with pytest.raises(DataError, match=rf"^data error: {path}:3: \d+ tokens after the chat template, above "
                       r"max_length=64 \(data\.bad_records=fail\)$"):
        within_max_length(load(path, "chat", Policy("fail")), tokenize, max_length=64)


def test_skip_still_stops_when_too_much_or_everything_is_bad(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD] * 7 + ["{oops"] * 3)
    with pytest.raises(DataError, match=rf"^data error: {path}:8: malformed JSON .*; 3 of 10 records are bad "
                       r"\(30%\), above data\.max_bad_fraction=0\.1$"):
        load(path, "chat", Policy("skip"))
    assert len(load(path, "chat", Policy("skip", max_bad_fraction=0.3))) == 7  # at the limit: kept

    path = write(tmp_path / "d.jsonl", ["{oops", {"text": "x"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: malformed JSON .*; no valid chat record left: all 2 are bad"):
        load(path, "chat", Policy("skip", max_bad_fraction=1.0))
    with pytest.raises(DataError, match=r"d\.jsonl: no chat examples in the file"):
        load(write(tmp_path / "d.jsonl", ["", " "]), "chat", Policy("skip"))


def test_the_log_names_the_first_ten_then_gives_the_total(tmp_path, caplog):
    lines = [GOOD] * 200
    for i in range(15):
        lines[10 * i + 5] = "{oops"
    path = write(tmp_path / "d.jsonl", lines)
    records = load(path, "chat", Policy("skip"))
    assert len(records) == 185 and records.ledger.counts() == {"malformed_json": 15}
    # dict.fromkeys: caplog may see a record twice (its own handler and the root's).
    named = list(dict.fromkeys(r.getMessage() for r in caplog.records if r.getMessage().startswith("bad record: ")))
    assert len(named) == 10 and named[0].startswith(f"bad record: {path}:6: malformed JSON")
    assert (f"{path}: 15 of 200 chat records are bad (malformed_json: 15); the first 10 are named above; "
            "skipped (data.bad_records=skip)") in caplog.text


def test_a_stage_scope_applies_the_run_policy_and_collects_counts(tmp_path):
    path = dataset_with(tmp_path, "chat", "{oops")
    with data_checks(DataChecks(Policy("fail"))):
        with pytest.raises(DataError, match=r"d\.jsonl:11: malformed JSON"):
            load_records(str(path), "chat", get_plugin_manager().formats, 0)
    checks = DataChecks(Policy("skip"))
    with data_checks(checks):
        load_records(str(path), "chat", get_plugin_manager().formats, 0)
        load_records(None, "prompt", get_plugin_manager().formats, 0)  # synthetic: counted, nothing bad
    metrics = checks.metrics()
    assert metrics["bad_records"] == 1 and metrics["bad_record_kinds"] == {"malformed_json": 1}
    assert metrics["data_sources"][str(path)] == {"kind": "chat", "read": 21, "kept": 20, "skipped": 1,
                                                  "problems": {"malformed_json": 1}}
    assert metrics["data_sources"]["synthetic:prompts"]["skipped"] == 0


def test_dpo_skips_bad_pairs_and_keeps_unlikelihood_flags_on_their_own_lines(tmp_path, tiny_model_path):
    """A skipped line must not shift the ``unlikelihood`` marks of the pairs after it."""
    from rayalign.config import RunConfig
    from rayalign.stage import Artifacts
    from rayalign_dpo.stage import DPOConfig, DPOStage

    long_pair = {"prompt": "tell me " * 100, "chosen": "a", "rejected": "b"}
    lines = [PAIR] * 8 + ["{oops", long_pair, BAD_BYTES_PAIR, {**PAIR, "unlikelihood": True}] + [PAIR] * 9
    path = write(tmp_path / "p.jsonl", lines)
    run = RunConfig(data={"preference": str(path), "eval_fraction": 0, "max_bad_fraction": 0.2})
    stage = DPOStage(DPOConfig(max_length=64))
    checks = DataChecks(Policy.of(run.data))
    with data_checks(checks):
        stage.prepare(run, get_plugin_manager(), Artifacts(model=tiny_model_path), 0)
    assert len(stage.train) == 18 and [r["unlikelihood"] for r in stage.train].count(True) == 1
    assert stage.train[8].line == 12 and stage.train[8]["unlikelihood"] is True
    assert all(len(c) <= 64 and len(r) <= 64 for c, r in (p.tokens for p in stage.train))
    assert checks.metrics()["bad_record_kinds"] == {"malformed_json": 1, "too_long": 1, "invalid_utf8": 1}


def test_dpo_and_reward_model_read_their_pairs_from_one_cache_entry(tmp_path, tiny_model_path, monkeypatch):
    """A restarted preference stage tokenizes nothing and skips the same over-long pair (named file:line)."""
    from rayalign.config import RunConfig
    from rayalign.data import chat_tokens
    from rayalign.stage import Artifacts
    from rayalign_dpo.stage import DPOConfig, DPOStage
    from rayalign_rm.stage import RewardModelConfig, RewardModelStage

    monkeypatch.setenv("RAYALIGN_CACHE_DIR", str(tmp_path / "cache"))
    path = write(tmp_path / "p.jsonl", [PAIR] * 4 + [{"prompt": "tell me " * 100, "chosen": "a", "rejected": "b"}]
                 + [PAIR] * 5)
    run = RunConfig(data={"preference": str(path), "eval_fraction": 0, "max_bad_fraction": 0.2})

    def prepare(stage):
        checks = DataChecks(Policy.of(run.data))
        with data_checks(checks):
            stage.prepare(run, get_plugin_manager(), Artifacts(model=tiny_model_path), 0)
        return checks.metrics()["bad_record_kinds"], checks.ledgers[(str(path), "preference")].problems[0].where

    first = DPOStage(DPOConfig(max_length=64))
    assert prepare(first) == ({"too_long": 1}, f"{path}:5")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again: the cache missed")

    monkeypatch.setattr(chat_tokens, "tokenize_completion", no_tokenizing)
    again = DPOStage(DPOConfig(max_length=64))
    assert prepare(again) == ({"too_long": 1}, f"{path}:5")
    assert [r.tokens for r in again.train] == [r.tokens for r in first.train] and len(again.train) == 9
    rm = RewardModelStage(RewardModelConfig(max_length=64))  # the same pairs, tokenizer and max_length
    assert prepare(rm) == ({"too_long": 1}, f"{path}:5")
    assert rm.train == [r.tokens for r in first.train]


@pytest.fixture(scope="module")
def local_ray():
    from rayalign.testing import start_local_ray

    import ray

    started = start_local_ray()
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_counts_reach_metrics_json_through_a_real_sft_run(local_ray, tmp_path):
    from rayalign.testing import run_stage

    bad = [line for case, (kind, line, _) in BAD.items() if kind == "chat" and case != "duplicate_id"]
    lines = [{**GOOD, "id": f"a{i}"} for i in range(40)] + bad + [LONG, {**GOOD, "id": "a3"}]
    path = write(tmp_path / "sft.jsonl", lines)
    run = run_stage("sft", {"epochs": 1, "max_length": 64}, tmp_path=tmp_path,
                    data={"sft": str(path), "max_bad_fraction": 0.5})
    kinds = {"malformed_json": 1, "not_an_object": 1, "missing_field": 2, "empty_field": 2, "wrong_type": 1,
             "unknown_role": 1, "no_final_assistant": 1, "too_long": 1, "duplicate_id": 1, "invalid_utf8": 2}
    assert run.metrics["bad_records"] == sum(kinds.values()) == 13
    assert run.metrics["bad_record_kinds"] == kinds
    assert run.metrics["data_sources"][str(path)] == {"kind": "chat", "read": 53, "kept": 40, "skipped": 13,
                                                      "problems": kinds}
    assert run.metrics["train_examples"] + run.metrics["eval_examples"] == 40  # nothing else dropped
    summary = json.loads((run.dir.parent / "summary.json").read_text())
    assert summary["stages"][0]["metrics"]["bad_records"] == 13


def test_cli_one_line_error_and_nothing_written(tmp_path):
    """`rayalign run` under the default skip policy, with a file that is mostly bad: exit 2, one line."""
    data = write(tmp_path / "sft.jsonl", [GOOD] * 3 + ["{oops"] * 2)
    config = tmp_path / "c.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "data": {"sft": str(data)}, "stages": [{"sft": {}}]}))
    proc = subprocess.run([sys.executable, "-m", "rayalign.cli", "run", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"rayalign: data error: {data}:4: malformed JSON (Expecting property name enclosed in double "
                     "quotes at column 2); 2 of 5 records are bad (40%), above data.max_bad_fraction=0.1"], proc.stderr
    assert not out.exists()


BAD_BYTES = b'{"prompt": "caf\xff", "completion": "x"}'


def test_bad_bytes_are_one_bad_record_with_its_byte_and_column(tmp_path, caplog):
    path = dataset_with(tmp_path, "chat", BAD_BYTES)
    records = load(path, "chat", Policy("skip"))
    assert len(records) == 20 and records.ledger.counts() == {"invalid_utf8": 1}
    assert f"bad record: {path}:11: not valid UTF-8 (byte 0xff at column 16)" in caplog.messages
    assert (f"{path}: 1 of 21 chat records are bad (invalid_utf8: 1); skipped (data.bad_records=skip)"
            in caplog.messages)
    with pytest.raises(DataError) as exc:
        load(path, "chat", Policy("fail"))
    assert str(exc.value) == (f"data error: {path}:11: not valid UTF-8 (byte 0xff at column 16) "
                              "(data.bad_records=fail)")


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"\n")
    records = load(path, "chat", Policy("fail"))
    assert len(records) == 2 and records[0]["messages"] == GOOD["messages"]


def test_a_degenerate_pair_is_named_and_the_others_train(tmp_path, caplog):
    same = {"prompt": "q", "chosen": [{"role": "assistant", "content": "ok"}], "rejected": "ok"}
    path = write(tmp_path / "p.jsonl", [PAIR] * 12 + [same] + [PAIR] * 7)
    records = load(path, "preference", Policy("skip"))
    assert len(records) == 19 and [r.line for r in records] == [i for i in range(1, 21) if i != 13]
    assert records.ledger.counts() == {"chosen_equals_rejected": 1}
    assert f"bad record: {path}:13: chosen equals rejected (a pair must prefer one answer)" in caplog.messages
    # The same text from another role, or another text, is a real preference.
    other = [{"prompt": "q", "chosen": "ok", "rejected": [{"role": "user", "content": "ok"}]},
             {"prompt": "q", "chosen": "ok", "rejected": "okay"}]
    assert len(load(write(tmp_path / "o.jsonl", other), "preference", Policy("fail"))) == 2


def test_bad_bytes_under_fail_at_the_cli(tmp_path):
    """`python -m rayalign run` with a relative output_dir outside a Ray job: the data is what stops it."""
    data = dataset_with(tmp_path, "chat", BAD_BYTES)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "out", "data": {"sft": str(data), "bad_records": "fail"},
                                      "stages": [{"sft": {}}]}))
    proc = subprocess.run([sys.executable, "-m", "rayalign", "run", str(config)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"rayalign: data error: {data}:11: not valid UTF-8 (byte 0xff at column 16) "
                                        "(data.bad_records=fail)"]
    assert not (tmp_path / "out").exists()


def test_bad_bytes_in_a_reference_prompt_set_fail_naming_the_line(tmp_path):
    """Reference prompt sets (fix and eval stages) fail on their first bad record; bytes included."""
    from rayalign.evaluation.references import load_prompt_set

    path = write(tmp_path / "refs.jsonl", [{"id": "q1", "prompt": "Where?", "reference": "Here."},
                                           b'{"id": "q2", "prompt": "Wh\xffere?", "reference": "There."}'])
    with pytest.raises(DataError) as exc:
        load_prompt_set(str(path))
    assert str(exc.value) == f"data error: {path}:2: not valid UTF-8 (byte 0xff at column 27)"
