"""Jobs with one home each: round-robin sharding (rollout/sharding.py) and whole-file JSONL
(data/jsonl.py), used by every stage and module that shards or writes such files."""

from rayalign.data.jsonl import iter_jsonl, read_jsonl, write_jsonl
from rayalign.rollout.sharding import round_robin


def test_round_robin_gives_each_rank_every_nth_item_in_order():
    assert round_robin(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert round_robin(2, 4) == [[0], [1], [], []]
    assert sorted(i for shard in round_robin(50, 7) for i in shard) == list(range(50))


def test_the_rl_loop_shards_with_the_same_function():
    from rayalign_rl import loop

    assert loop._shards is round_robin


def test_jsonl_round_trip_append_and_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, ({"i": i, "text": "é"} for i in range(3))) == 3
    assert write_jsonl(path, [{"i": 3}], append=True) == 1
    with open(path, "a") as fh:
        fh.write("\n  \n")
    assert read_jsonl(path) == [{"i": 0, "text": "é"}, {"i": 1, "text": "é"}, {"i": 2, "text": "é"}, {"i": 3}]
    assert next(iter_jsonl(path)) == {"i": 0, "text": "é"}
