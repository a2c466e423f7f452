"""Loading a large chat dataset through ``load_records``: wall time and peak memory, JSONL vs Parquet.

Writes ``--records`` seeded chat records (system, user, assistant; ``--words`` words per answer)
as one JSONL file and as Parquet shards in a temporary directory, then loads each through
``rayalign.data.datasets.load_records`` with the real formats registry, every format in a fresh
process of its own so its peak resident memory (``VmHWM``, the process's own ``ru_maxrss``) is its
own. Reports per format: wall seconds, peak resident MiB and the resident MiB before loading (after
imports), records kept, bytes on disk. With ``--tokenize`` each process then tokenizes the records
with the embedded model's tokenizer and chat template (``rayalign.data.chat_tokens``, worker
processes on every CPU, into an empty token cache) and loads them once more from that cache, as a
restarted run does; the peak then covers loading and tokenizing together, and the resident memory
just before tokenizing (records and tokenizer loaded) and just after (the tokens held) tells what the
held tokens themselves take. Runs on CPU; no Ray.

    PYTHONPATH=platform:plugins python benchmarks/dataset_streaming.py                  # 1M records
    PYTHONPATH=platform:plugins python benchmarks/dataset_streaming.py --records 100000 # a smaller run
    PYTHONPATH=platform:plugins python benchmarks/dataset_streaming.py --tokenize       # and tokenize
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("jsonl", "parquet")
WORDS = ("river", "stone", "light", "garden", "number", "window", "answer", "quiet", "orbit", "paper", "signal",
         "forest", "copper", "winter", "harbor", "engine", "letter", "silver", "market", "valley")


def records(n: int, words: int, seed: int):
    """Seeded chat records; answers of ``words`` words on average (uniform in [words/2, 3*words/2])."""
    rng = random.Random(seed)
    for i in range(n):
        answer = " ".join(rng.choices(WORDS, k=rng.randint(max(1, words // 2), words * 3 // 2)))
        yield {"id": i, "messages": [{"role": "system", "content": "You answer briefly."},
                                     {"role": "user", "content": f"Question {i}: " + " ".join(rng.choices(WORDS, k=12))},
                                     {"role": "assistant", "content": answer}]}


def write_files(directory: Path, n: int, words: int, seed: int, shard_rows: int) -> dict[str, str]:
    """The same records as ``data.jsonl`` and as ``parquet/shard-NNNNN.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl, shards = directory / "data.jsonl", directory / "parquet"
    shards.mkdir()
    batch: list[dict] = []
    shard = 0
    with open(jsonl, "w") as fh:
        for record in records(n, words, seed):
            fh.write(json.dumps(record) + "\n")
            batch.append(record)
            if len(batch) == shard_rows:
                pq.write_table(pa.Table.from_pylist(batch), shards / f"shard-{shard:05d}.parquet")
                batch, shard = [], shard + 1
    if batch:
        pq.write_table(pa.Table.from_pylist(batch), shards / f"shard-{shard:05d}.parquet")
    return {"jsonl": str(jsonl), "parquet": str(shards)}


def memory_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MiB.

    Not ``ru_maxrss``: Linux carries the parent's peak over ``fork``/``exec``, so a child started by
    a parent that held the generated data would report the parent's peak as its own.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def load_one(path: str, tokenize: bool, max_length: int) -> dict:
    """In the format's own process: load through ``load_records``, report time and memory; then,
    with ``tokenize``, tokenize into an empty cache and read the tokens back from it."""
    from rayalign.data.datasets import load_records
    from rayalign.plugins import PluginManager

    formats = PluginManager().formats
    baseline = memory_mib("VmRSS")
    started = time.perf_counter()
    loaded, _ = load_records(path, "chat", formats, seed=0)
    wall = time.perf_counter() - started
    out = {"wall_seconds": [wall], "peak_rss_mib": memory_mib("VmHWM"), "baseline_rss_mib": baseline,
           "records_kept": len(loaded), "records_read": loaded.ledger.read,
           "records_per_second": loaded.ledger.read / wall}
    if tokenize:
        from transformers import AutoTokenizer

        from rayalign.data.chat_tokens import tokenize_chats
        from rayalign.embedded import embedded_model_path

        tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path(0)))
        with tempfile.TemporaryDirectory(prefix="rayalign-token-cache-") as cache:
            os.environ["RAYALIGN_CACHE_DIR"] = cache
            out["rss_mib_before_tokenizing"] = memory_mib("VmRSS")  # records and tokenizer loaded
            started = time.perf_counter()
            kept, tokenized = tokenize_chats(loaded, tokenizer, max_length)
            out["tokenize_seconds"] = [time.perf_counter() - started]
            out["tokens"] = sum(len(t) for t in tokenized)
            out["records_tokenized"] = len(kept)
            out["peak_rss_mib_with_tokens"] = memory_mib("VmHWM")
            out["rss_mib_holding_tokens"] = memory_mib("VmRSS")  # after tokenizing, the tokens still held
            del kept, tokenized
            started = time.perf_counter()
            tokenize_chats(loaded, tokenizer, max_length)  # a restarted run: every record from the cache
            out["cached_tokens_seconds"] = [time.perf_counter() - started]
    return out


def disk_bytes(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=60, help="mean words per assistant answer")
    parser.add_argument("--shard-rows", type=int, default=250_000, help="rows per Parquet shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                        help="directory for the result JSON")
    parser.add_argument("--tokenize", action="store_true", help="also tokenize, then read the tokens from the cache")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per record when tokenizing")
    parser.add_argument("--name", default="dataset_streaming", help="result file's name (a run at another size "
                        "can sit beside the default's)")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # in a format's own process: the path to load
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load_one(args.load, args.tokenize, args.max_length)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    sides: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rayalign-streaming-") as tmp:
        started = time.perf_counter()
        paths = write_files(Path(tmp), args.records, args.words, args.seed, args.shard_rows)
        generate_s = time.perf_counter() - started
        print(f"wrote {args.records} records in {generate_s:.1f}s", flush=True)
        for fmt in FORMATS:
            argv = [sys.executable, __file__, "--load", paths[fmt], "--max-length", str(args.max_length)]
            proc = subprocess.run(argv + (["--tokenize"] if args.tokenize else []), capture_output=True, text=True)
            if proc.returncode != 0:
                sides[fmt] = {"error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
                continue
            sides[fmt] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "disk_bytes": disk_bytes(paths[fmt])}
            print(fmt, json.dumps(sides[fmt]), flush=True)
    common.write_result(args.out, args.name + ("-tokenize" if args.tokenize else ""), {
        "dry_run": False,
        "settings": {"records": args.records, "words": args.words, "shard_rows": args.shard_rows, "seed": args.seed,
                     "cpus": len(os.sched_getaffinity(0)), "tokenize": args.tokenize, "max_length": args.max_length},
        "generate_seconds": [generate_s],
        "sides": sides,
    })


if __name__ == "__main__":
    main()
