"""Dataset formats, line-numbered errors, masks (token by token) and packing."""

import json

import numpy as np
import pytest
import torch

from rayalign.data.chat import Tokenized, tokenize_completion, tokenize_conversation
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
    first = t.labels.tolist().index(next(label for label in t.labels if label != IGNORE_INDEX))
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


def test_tokens_are_held_as_int32_arrays_and_pack_as_lists_did(tokenizer):
    seqs = [tokenize_conversation(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 64)
            for q, a in (("a", "b"), ("c d", "e f g"), ("h", "i"))]
    assert all(t.input_ids.dtype == t.labels.dtype == np.int32 for t in seqs)
    row = collate_packed(seqs)
    # The row the list version built: ids, positions restarting at 0, IGNORE_INDEX on each first label.
    ids, positions, labels, sequence_ids = [], [], [], []
    for k, t in enumerate(seqs):
        ids += t.input_ids.tolist()
        positions += range(len(t))
        labels += [IGNORE_INDEX] + t.labels.tolist()[1:]
        sequence_ids += [k] * len(t)
    expected = {"input_ids": ids, "position_ids": positions, "labels": labels, "sequence_ids": sequence_ids}
    assert set(row) == set(expected)
    for key, values in expected.items():
        assert row[key].dtype == torch.long and torch.equal(row[key], torch.tensor([values], dtype=torch.long)), key
    # Built from lists, from int32 arrays or from views of one flat buffer (the token cache's): the same batch.
    flat_ids, flat_labels = np.concatenate([t.input_ids for t in seqs]), np.concatenate([t.labels for t in seqs])
    flat_ids.flags.writeable = flat_labels.flags.writeable = False  # as the cache's are: collation must copy
    ends = np.cumsum([len(t) for t in seqs]).tolist()
    views = [Tokenized(flat_ids[s:e], flat_labels[s:e]) for s, e in zip([0] + ends[:-1], ends)]
    from_lists = [Tokenized(t.input_ids.tolist(), t.labels.tolist()) for t in seqs]
    for other in (collate_packed(views), collate_packed(from_lists)):
        assert all(torch.equal(row[key], other[key]) for key in row)
    assert views == seqs == from_lists


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
