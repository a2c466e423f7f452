"""Dataset formats, line-numbered errors, masks (token by token) and packing."""

import json

import pytest
import torch

from rayalign.data.chat import tokenize_completion, tokenize_conversation
from rayalign.data.datasets import load_records
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.validation import Policy
from rayalign.errors import DataError
from rayalign.plugins import get_plugin_manager
from rayalign.training.losses import IGNORE_INDEX, sequence_logps


def jsonl(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def load(path, kind, policy=None):
    return load_records(str(path), kind, get_plugin_manager().formats, 0, policy=policy)[0]


def test_formats_normalise_to_messages(tmp_path):
    path = jsonl(tmp_path, [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "2+2?", "completion": "4"},
    ])
    a, b = load(path, "chat")
    assert a["messages"][1] == {"role": "assistant", "content": "yo"}
    assert b["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    pairs = load(jsonl(tmp_path, [{"prompt": "q", "chosen": "good", "rejected": "bad"}], "p.jsonl"), "preference")
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "good"}]


@pytest.mark.parametrize(
    "lines, kind, message",
    [
        ([{"prompt": "q", "completion": "a"}, "{not json"], "chat", r"d\.jsonl:2: malformed JSON"),
        ([{"prompt": "q", "completion": "a"}, {"text": "x"}], "chat", r"d\.jsonl:2: missing fields .*messages"),
        ([{"prompt": "q", "chosen": "a"}], "preference", r"d\.jsonl:1: missing fields .*rejected"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "chat", r"d\.jsonl:1: field 'messages\[0\]\.role'"),
        ([{"messages": [{"role": "user", "content": 3}]}], "chat", r"d\.jsonl:1: field 'messages\[0\]\.content'"),
        ([{"messages": [{"role": "user", "content": "only a question"}]}], "chat",
         r"d\.jsonl:1: the conversation does not end with an assistant message"),
        ([{"prompt": "q", "chosen": "", "rejected": "b"}], "preference", r"d\.jsonl:1: field 'chosen': empty"),
        (["", "  "], "chat", r"d\.jsonl: no chat examples"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, lines, kind, message):
    # data.bad_records=fail: the first bad record stops the load (tests/test_bad_data.py: skip).
    with pytest.raises(DataError, match=message):
        load(jsonl(tmp_path, lines), kind, Policy("fail"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope.jsonl", "chat")


def test_assistant_mask_token_by_token(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where does Bob live?"},
        {"role": "assistant", "content": "Bob lives in Parvel."},
        {"role": "user", "content": "And his job?"},
        {"role": "assistant", "content": "Bob works as a baker."},
    ]
    t = tokenize_conversation(tokenizer, messages, max_length=512)
    tokens = tokenizer.convert_ids_to_tokens(t.input_ids)
    trained = [tok for tok, label in zip(tokens, t.labels) if label != IGNORE_INDEX]
    # Exactly the two answers and their end-of-turn tokens; no role headers, no user text.
    expected = (tokenizer.tokenize("Bob lives in Parvel.") + ["<|end|>"]
                + tokenizer.tokenize("Bob works as a baker.") + ["<|end|>"])
    assert trained == expected
    for tok, label, ids in zip(tokens, t.labels, t.input_ids):
        assert label in (IGNORE_INDEX, ids)
    # The token right after each "<|assistant|>\n" header is the first trained one.
    first = t.labels.index(next(label for label in t.labels if label != IGNORE_INDEX))
    assert tokens[first - 2 : first] == ["<|assistant|>", "Ċ"]


def test_completion_mask_ignores_prompt_history(tokenizer):
    prompt = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
              {"role": "user", "content": "Q2"}]
    t = tokenize_completion(tokenizer, prompt, [{"role": "assistant", "content": "A2"}], max_length=512)
    trained = tokenizer.convert_ids_to_tokens([i for i, label in zip(t.input_ids, t.labels) if label != IGNORE_INDEX])
    assert trained == tokenizer.tokenize("A2") + ["<|end|>"]


def test_truncation_keeps_labels_aligned(tokenizer):
    messages = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "ok"}]
    t = tokenize_conversation(tokenizer, messages, max_length=10)
    assert len(t.input_ids) == len(t.labels) == 10 and t.num_trained == 0


def test_packing_groups_respect_budget_and_cover_everything():
    lengths = [5, 9, 3, 12, 7, 1, 4]
    groups = group_by_tokens(lengths, max_tokens=12, seed=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 12 for g in groups)


def test_packed_row_layout_and_per_sequence_logps(tokenizer):
    a = tokenize_conversation(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 64)
    b = tokenize_conversation(tokenizer, [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d e"}], 64)
    row = collate_packed([a, b])
    assert row["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    assert row["sequence_ids"][0].tolist() == [0] * len(a) + [1] * len(b)
    assert row["labels"][0, len(a)].item() == IGNORE_INDEX  # never scored across the boundary
    # With uniform logits every trained token has log-prob -log(V): sums are -count*log(V).
    vocab = 7
    logits = torch.zeros(1, len(a) + len(b), vocab)
    labels = row["labels"].clamp(max=vocab - 1).masked_fill(row["labels"] == IGNORE_INDEX, IGNORE_INDEX)
    sums, counts = sequence_logps(logits, labels, row["sequence_ids"], 2)
    assert counts.tolist() == [a.num_trained, b.num_trained]
    assert torch.allclose(sums, -counts * torch.log(torch.tensor(float(vocab))))
