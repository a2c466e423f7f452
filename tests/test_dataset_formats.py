"""Datasets as people store them: JSONL, Parquet (file or shards), save_to_disk, all checked alike.

Every input format loads to the same canonical records as the equivalent JSONL; a bad row of a
columnar file is named ``file:row``; tokenizations come from the cache on a second load and are
redone when the file changes; curate writes Parquet when it read Parquet. No Ray.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayalign.data import chat_tokens
from rayalign.data.datasets import load_records
from rayalign.data.readers import looks_like_hub_id
from rayalign.data.validation import Policy
from rayalign.errors import DataError
from rayalign.plugins import PluginManager


@pytest.fixture(scope="module")
def formats():
    return PluginManager().formats


def chat_rows(n: int) -> list[dict]:
    return [{"id": i, "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": f"What is {i} plus one?"},
                                   {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(n)]


def preference_rows(n: int) -> list[dict]:
    return [{"prompt": f"Name the number after {i}.",
             "chosen": [{"role": "assistant", "content": f"{i + 1}."}],
             "rejected": [{"role": "assistant", "content": f"{i - 1}."}]} for i in range(n)]


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Double {i}?"}], "reference": str(2 * i)} for i in range(n)]


ROWS = {"chat": chat_rows, "preference": preference_rows, "prompt": prompt_rows}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_shards(directory: Path, rows: list[dict]) -> str:
    directory.mkdir()
    half = len(rows) // 2
    write_parquet(directory / "shard-00000.parquet", rows[:half])
    write_parquet(directory / "shard-00001.parquet", rows[half:])
    return str(directory)


def write_saved(directory: Path, rows: list[dict]) -> str:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(directory))
    return str(directory)


WRITERS = {"parquet file": lambda tmp, rows: write_parquet(tmp / "data.parquet", rows),
           "parquet shards": lambda tmp, rows: write_shards(tmp / "shards", rows),
           "save_to_disk": lambda tmp, rows: write_saved(tmp / "saved", rows)}


def canonical(records) -> list[dict]:
    return [dict(r) for r in records]


# -- every format, every kind ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(ROWS))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_format_loads_to_the_records_jsonl_gives(tmp_path, formats, kind, writer):
    rows = ROWS[kind](6)
    expected, _ = load_records(write_jsonl(tmp_path / "data.jsonl", rows), kind, formats, seed=0)
    got, source = load_records(WRITERS[writer](tmp_path, rows), kind, formats, seed=0)
    assert canonical(got) == canonical(expected) and len(got) == 6
    assert got.ledger.read == 6 and got.ledger.kept == 6
    assert got.origin.format == {"parquet file": "parquet", "parquet shards": "parquet",
                                 "save_to_disk": "arrow"}[writer]
    assert all(re.fullmatch(r".+:\d+", r.where) for r in got)


def test_shards_number_rows_within_their_own_file(tmp_path, formats):
    got, _ = load_records(write_shards(tmp_path / "shards", chat_rows(6)), "chat", formats, seed=0)
    assert [r.where for r in got] == [f"{tmp_path}/shards/shard-0000{f}.parquet:{n}" for f in (0, 1) for n in (1, 2, 3)]


def test_a_null_cell_is_an_absent_field(tmp_path, formats):
    rows = prompt_rows(3)
    rows[1]["reference"] = None  # the column exists; this row has no reference
    got, _ = load_records(write_parquet(tmp_path / "p.parquet", rows), "prompt", formats, seed=0)
    assert "reference" not in got[1] and got[0]["reference"] == "0"


# -- bad rows: file:row, both policies ------------------------------------------------------------

def bad_chat_rows() -> list[dict]:
    rows = chat_rows(20)
    rows[2]["messages"] = rows[2]["messages"][:2]  # ends with the user: no_final_assistant
    return rows


def test_a_bad_parquet_row_is_skipped_and_named_file_row(tmp_path, formats, caplog):
    path = write_parquet(tmp_path / "bad.parquet", bad_chat_rows())
    got, _ = load_records(path, "chat", formats, seed=0, policy=Policy("skip"))
    assert len(got) == 19 and got.ledger.counts() == {"no_final_assistant": 1}
    assert got.ledger.problems[0].where == f"{path}:3"
    assert f"bad record: {path}:3: the conversation does not end with an assistant message" in caplog.text


def test_a_bad_parquet_row_stops_the_run_under_fail(tmp_path, formats):
    path = write_parquet(tmp_path / "bad.parquet", bad_chat_rows())
    with pytest.raises(DataError, match=re.escape(f"{path}:3: the conversation does not end")):
        load_records(path, "chat", formats, seed=0, policy=Policy("fail"))


def test_a_bad_row_in_a_second_shard_names_that_shard(tmp_path, formats):
    rows = preference_rows(20)
    rows[11]["rejected"] = rows[11]["chosen"]  # the second shard's 2nd row
    got, _ = load_records(write_shards(tmp_path / "shards", rows), "preference", formats, seed=0)
    assert [(p.where, p.kind) for p in got.ledger.problems] == [
        (f"{tmp_path}/shards/shard-00001.parquet:2", "chosen_equals_rejected")]


def test_duplicate_ids_across_shards_name_the_first(tmp_path, formats):
    rows = chat_rows(20)
    rows[15]["id"] = 4
    got, _ = load_records(write_shards(tmp_path / "shards", rows), "chat", formats, seed=0)
    problem = got.ledger.problems[0]
    assert problem.where.endswith("shard-00001.parquet:6")
    assert f"first at {tmp_path}/shards/shard-00000.parquet:5" in problem.reason


# -- directories, DatasetDicts, paths that are nothing ----------------------------------------------

def test_a_dataset_dict_directory_reads_its_train_split(tmp_path, formats):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(chat_rows(4)), "test": Dataset.from_list(chat_rows(2))}).save_to_disk(
        str(tmp_path / "dd"))
    got, _ = load_records(str(tmp_path / "dd"), "chat", formats, seed=0)
    assert len(got) == 4 and "/train/" in got[0].where


def test_a_dataset_dict_without_train_is_refused_naming_its_splits(tmp_path, formats):
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_list(chat_rows(2)), "test": Dataset.from_list(chat_rows(2))}
                ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="splits validation, test and no 'train' split") as info:
        load_records(str(tmp_path / "dd"), "chat", formats, seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "data/missing.jsonl", "/no/such/dir"])
def test_a_path_that_does_not_exist(tmp_path, formats, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"data error: {re.escape(name)}: file does not exist"):
        load_records(name, "chat", formats, seed=0)


def test_a_directory_with_nothing_to_read(tmp_path, formats):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no Parquet shards"):
        load_records(str(tmp_path), "chat", formats, seed=0)


def test_a_file_that_is_not_parquet(tmp_path, formats):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/x.parquet: not a readable Parquet file")):
        load_records(str(tmp_path / "x.parquet"), "chat", formats, seed=0)


def test_hub_ids_are_told_from_paths():
    assert looks_like_hub_id("HuggingFaceH4/ultrachat_200k") and looks_like_hub_id("trl-lib/ultrafeedback.v2")
    assert not looks_like_hub_id("data/train.jsonl") and not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("a/b/c") and not looks_like_hub_id("shards/part.parquet")


# -- the token cache ------------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Tokenizer calls, counted, with the cache under tmp_path."""
    monkeypatch.setenv("RAYALIGN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = chat_tokens.tokenize_conversation

    def counting(tok, messages, max_length, where="conversation"):
        calls.append(where)
        return real(tok, messages, max_length, where=where)

    monkeypatch.setattr(chat_tokens, "tokenize_conversation", counting)
    return calls


def test_a_second_load_takes_tokens_from_the_cache(tmp_path, formats, tokenizer, counted):
    rows = chat_rows(12)
    rows[5]["messages"][2]["content"] = "word " * 200  # too long for max_length: a bad record both times
    path = write_parquet(tmp_path / "chat.parquet", rows)
    first_records, _ = load_records(path, "chat", formats, seed=0)
    kept, first = chat_tokens.tokenize_chats(first_records, tokenizer, max_length=128)
    assert len(counted) == 12 and len(kept) == 11
    assert first_records.ledger.counts() == {"too_long": 1}
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 1

    again, _ = load_records(path, "chat", formats, seed=0)
    kept2, second = chat_tokens.tokenize_chats(again, tokenizer, max_length=128)
    assert len(counted) == 12  # nothing tokenized again
    assert second == first  # ids and labels, element by element
    assert all(t.input_ids.dtype == t.labels.dtype == np.int32 for t in second)  # arrays, not lists
    assert again.ledger.counts() == {"too_long": 1} and [r.where for r in kept2] == [r.where for r in kept]


def test_the_cache_is_redone_when_the_file_or_max_length_changes(tmp_path, formats, tokenizer, counted):
    rows = chat_rows(4)
    path = Path(write_jsonl(tmp_path / "chat.jsonl", rows))
    chat_tokens.tokenize_chats(load_records(str(path), "chat", formats, seed=0)[0], tokenizer, max_length=128)
    assert len(counted) == 4
    rows[1]["messages"][2]["content"] = "It is two."  # same size on disk would not matter: content is hashed
    write_jsonl(path, rows)
    _, tokenized = chat_tokens.tokenize_chats(load_records(str(path), "chat", formats, seed=0)[0], tokenizer,
                                              max_length=128)
    assert len(counted) == 8
    assert tokenized[1] == chat_tokens.tokenize_conversation(tokenizer, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 plus one?"},
        {"role": "assistant", "content": "It is two."}], None)
    chat_tokens.tokenize_chats(load_records(str(path), "chat", formats, seed=0)[0], tokenizer, max_length=64)
    assert len(counted) == 13  # another max_length is another entry (the 13th: the check just above)


def test_embedded_data_is_not_cached(tmp_path, formats, tokenizer, counted):
    records, _ = load_records(None, "chat", formats, seed=0)
    chat_tokens.tokenize_chats(records, tokenizer, max_length=512)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("scheme", [chat_tokens.SCHEME, chat_tokens.PAIR_SCHEME])
def test_workers_tokenize_as_this_process_does(tokenizer, monkeypatch, formats, tmp_path, scheme):
    monkeypatch.setattr(chat_tokens, "PARALLEL_MIN_RECORDS", 1)
    monkeypatch.setattr(chat_tokens, "CHUNK_RECORDS", 3)
    if scheme == chat_tokens.SCHEME:
        items = [(f"f:{i}", r["messages"]) for i, r in enumerate(chat_rows(7))]
    else:
        records, _ = load_records(write_jsonl(tmp_path / "p.jsonl", preference_rows(7)), "preference", formats, 0)
        items = [(r.where, (r["prompt"], r["chosen"], r["rejected"])) for r in records]
    here = chat_tokens.tokenize_all(items, tokenizer, 40, workers=1, scheme=scheme)
    assert chat_tokens.tokenize_all(items, tokenizer, 40, workers=2, scheme=scheme) == here
    assert len(here) == len(items) * (1 if scheme == chat_tokens.SCHEME else 2)


def test_an_entry_reads_back_as_views_of_flat_arrays(tmp_path, monkeypatch):
    from rayalign.data.chat import Tokenized

    monkeypatch.setenv("RAYALIGN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(chat_tokens.token_cache, "BATCH_ROWS", 3)  # several record batches
    entry = [Tokenized([i, i + 1, 7][: 1 + i % 3], [-100, i + 1, 7][: 1 + i % 3]) for i in range(8)]
    entry[4] = chat_tokens.TooLong(5000)
    chat_tokens.token_cache.store("k", entry)
    loaded = chat_tokens.token_cache.load("k", len(entry))
    assert loaded == entry and chat_tokens.token_cache.load("k", len(entry) + 1) is None
    held = [t for t in loaded if isinstance(t, Tokenized)]
    assert all(isinstance(t.input_ids, np.ndarray) and t.input_ids.base is not None for t in held)  # views
    assert not held[0].labels.flags.writeable  # shared: a stage copies before it changes any


# -- preference pairs in the token cache ----------------------------------------------------------

@pytest.fixture
def pair_calls(monkeypatch, tmp_path):
    """``tokenize_completion`` calls of ``tokenize_pairs``, counted, with the cache under tmp_path."""
    monkeypatch.setenv("RAYALIGN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = chat_tokens.tokenize_completion

    def counting(tok, prompt, completion, max_length, where="pair"):
        calls.append(where)
        return real(tok, prompt, completion, max_length, where)

    monkeypatch.setattr(chat_tokens, "tokenize_completion", counting)
    return calls


def pairs_with_a_long_one(n: int) -> list[dict]:
    rows = preference_rows(n)
    rows[3]["rejected"] = [{"role": "assistant", "content": "word " * 200}]  # only one side too long: bad pair
    return rows


def test_a_second_load_takes_pairs_from_the_cache(tmp_path, formats, tokenizer, pair_calls):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs_with_a_long_one(10))
    first_records, _ = load_records(path, "preference", formats, seed=0)
    kept, first = chat_tokens.tokenize_pairs(first_records, tokenizer, max_length=64)
    assert len(pair_calls) == 20 and len(kept) == 9 and len(list((tmp_path / "cache").glob("*.arrow"))) == 1
    assert [(p.where, p.kind) for p in first_records.ledger.problems] == [(f"{path}:4", "too_long")]
    r = kept[0]  # the same tokens as the stages' former closure made, uncached
    assert first[0] == (chat_tokens.tokenize_completion(tokenizer, r["prompt"], r["chosen"], None, r.where),
                        chat_tokens.tokenize_completion(tokenizer, r["prompt"], r["rejected"], None, r.where))
    del pair_calls[:]

    again, _ = load_records(path, "preference", formats, seed=0)
    kept2, second = chat_tokens.tokenize_pairs(again, tokenizer, max_length=64)
    assert pair_calls == []  # nothing tokenized again
    assert second == first and all(c.input_ids.dtype == np.int32 for c, _ in second)
    assert [(p.where, p.kind, p.reason) for p in again.ledger.problems] == [
        (p.where, p.kind, p.reason) for p in first_records.ledger.problems]  # the long pair, counted alike
    assert [r.where for r in kept2] == [r.where for r in kept]
    with pytest.raises(DataError, match=rf"{re.escape(path)}:4: \d+ tokens after the chat template, above "
                       r"max_length=64 \(data\.bad_records=fail\)"):
        chat_tokens.tokenize_pairs(load_records(path, "preference", formats, 0, policy=Policy("fail"))[0], tokenizer,
                                   max_length=64)
    assert pair_calls == []  # the fail policy stops on the cached length too


def test_the_pair_cache_is_redone_when_data_tokenizer_or_max_length_change(tmp_path, formats, tokenizer,
                                                                           pair_calls, monkeypatch):
    rows = preference_rows(4)
    path = Path(write_jsonl(tmp_path / "pairs.jsonl", rows))

    def tokenize(max_length=64):
        records = load_records(str(path), "preference", formats, seed=0)[0]
        before = len(pair_calls)
        chat_tokens.tokenize_pairs(records, tokenizer, max_length)
        return len(pair_calls) - before

    assert tokenize() == 8 and tokenize() == 0
    rows[2]["chosen"] = [{"role": "assistant", "content": "Four."}]
    write_jsonl(path, rows)
    assert tokenize() == 8 and tokenize() == 0  # the data changed
    assert tokenize(max_length=128) == 8  # another max_length
    # Another tokenizer: here only its chat template differs (a Jinja comment: the same tokens, another hash).
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template + "{# another template #}")
    assert tokenize() == 8 and tokenize() == 0
    # Chats and pairs of the same file never share an entry (schemes differ).
    records = load_records(str(path), "preference", formats, seed=0)[0]
    key = lambda scheme: chat_tokens.token_cache.cache_key(records.origin.files, [r.where for r in records],  # noqa
                                                           tokenizer, 64, scheme)
    assert key(chat_tokens.PAIR_SCHEME) != key(chat_tokens.SCHEME)


# -- curate: Parquet in, Parquet out --------------------------------------------------------------

def test_curate_writes_parquet_when_it_read_parquet(tmp_path, formats):
    from rayalign.config import DataConfig
    from rayalign.stage import Artifacts
    from rayalign_curate.stage import CurateConfig, CurateStage

    rows = [{"messages": [{"role": "user", "content": f"Which river flows through city number {i}?"},
                          {"role": "assistant", "content": f"The river of city {i} is the River {i}."}]}
            for i in range(12)]
    source = write_shards(tmp_path / "shards", rows)
    stage = CurateStage(CurateConfig(sources=[{"path": source}], length_unit="words", refusal_target=None,
                                     validation_fraction=0.25, near_dedup=False))
    run = SimpleNamespace(seed=0, data=DataConfig())
    stage.prepare(run, PluginManager(), Artifacts(), 0)
    work = tmp_path / "work"
    work.mkdir()
    ctx = SimpleNamespace(run=run, index=0, name="curate", work_dir=work, artifacts=Artifacts(),
                          log=logging.getLogger("rayalign"))
    result = stage.run(ctx)
    assert result.datasets == {"curated": "curated.parquet", "curated_validation": "curated_validation.parquet"}
    table = pq.read_table(work / "curated.parquet")
    assert table.column_names == ["messages", "source"] and table.num_rows == 9
    assert table.schema.field("messages").type == pa.list_(pa.struct([("role", pa.string()),
                                                                       ("content", pa.string())]))
    again, _ = load_records(str(work / "curated.parquet"), "chat", formats, seed=0)  # the next stage reads it
    assert len(again) == 9 and again.origin.format == "parquet"
