"""Bad input: one clear line naming the key/file/line, exit status 2, and no output directory.

Each case runs the real recipe script as a user would; all of them must fail before Ray starts.
"""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

RECIPE = REPO / "recipes" / "sft_then_dpo.py"
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD_PAIR = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
BOT_CHAT = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LONG_CHAT = {"messages": [{"role": "user", "content": "tell me " * 100}, {"role": "assistant", "content": "no"}]}

def run_recipe(tmp_path, *args):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(RECIPE), *args, f"output_dir={out}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    return proc, out

def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path

CASES = {
    "unknown key": (lambda t: ["dpo.betta=0.1"], r"stages\[2\]\.dpo\.betta: unknown key"),
    "wrong type": (lambda t: ["dpo.beta=abc"], r"stages\[2\]\.dpo\.beta: expected float"),
    "missing stages": (
        lambda t: ["--config", str(write_lines(t / "c.yaml", ["data: {sft: null}"]))],
        r"stages: no stages configured",
    ),
    # data.bad_records=skip (the default) still stops a run whose file is mostly bad: the wrong file.
    "malformed line": (
        lambda t: [f"data.sft={write_lines(t / 'sft.jsonl', [GOOD_CHAT, GOOD_CHAT, '{oops'])}"],
        r"sft\.jsonl:3: malformed JSON .*; 1 of 3 records are bad \(33%\), above data\.max_bad_fraction=0\.1$",
    ),
    "missing field": (
        lambda t: [f"data.preference={write_lines(t / 'p.jsonl', [GOOD_PAIR, {'prompt': 'x', 'chosen': 'y'}])}"],
        r"p\.jsonl:2: missing fields .*rejected.*1 of 2 records are bad",
    ),
    # data.bad_records=fail: one bad record among many stops the run, naming it.
    "malformed line, fail": (
        lambda t: [f"data.sft={write_lines(t / 'sft.jsonl', [GOOD_CHAT] * 30 + ['{oops'])}", "data.bad_records=fail"],
        r"sft\.jsonl:31: malformed JSON .*\(data\.bad_records=fail\)$",
    ),
    "unknown role, fail": (
        lambda t: [f"data.sft={write_lines(t / 'sft.jsonl', [GOOD_CHAT] * 5 + [BOT_CHAT] + [GOOD_CHAT] * 5)}",
                   "data.bad_records=fail"],
        r"sft\.jsonl:6: field 'messages\[0\]\.role': expected one of system, user, assistant, tool, got 'bot'",
    ),
    "too long, fail": (
        lambda t: [f"data.sft={write_lines(t / 'sft.jsonl', [GOOD_CHAT] * 3 + [LONG_CHAT] + [GOOD_CHAT] * 30)}",
                   "data.bad_records=fail", "sft.max_length=64"],
        r"sft\.jsonl:4: \d+ tokens after the chat template, above max_length=64 \(data\.bad_records=fail\)$",
    ),
    "bad policy": (lambda t: ["data.bad_records=drop"], r"data\.bad_records: Input should be 'skip' or 'fail'"),
    "empty dataset": (lambda t: [f"data.sft={write_lines(t / 'e.jsonl', [])}"], r"e\.jsonl: no chat examples"),
    "model path": (lambda t: ["model=/nonexistent/model"], r"model: path '/nonexistent/model' does not exist"),
    "unknown stage": (
        lambda t: ["--config", str(write_lines(t / "c.yaml", ["stages:", "  - sft: {}", "  - dpoo: {}"]))],
        r"stages\[1\]: no plugin provides stage 'dpoo'",
    ),
}

@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(tmp_path, case):
    make_args, pattern = CASES[case]
    proc, out = run_recipe(tmp_path, *make_args(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayalign: "), proc.stderr[-2000:]

    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()
