"""`fledge prepare` throughput and peak memory at several corpus sizes (run by hand).

    python bench/prepare_bench.py                     # 100 MB and 1 GB, bpe, 8192 tokens
    python bench/prepare_bench.py --sizes 100 --kind sentencepiece --train-mb 20

For each size it builds a corpus in a temporary folder from ../shared/data text
(tinyshakespeare and the Gutenberg books, real prose), repeated with small variations
(lines rotated, some lines with their words reversed, numbered headers) in files of about
16 MB, then runs `prepare` in a fresh subprocess and reports wall time, MB/s, MB/s per core
and the child's peak RSS (os.wait4's ru_maxrss). tokenizer.train_bytes is capped (--train-mb)
so every size trains on the same amount, and the peak-memory ratio between the largest and
smallest size shows whether memory grows with the corpus (target: within 10%).
With --reencode each size runs a second time with another split seed: the tokenizer is then
reused and only the shards are rebuilt, which times encoding alone. Temporary corpora are
deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOKS = ["tinyshakespeare/input.txt", "gutenberg/alice_wonderland.txt", "gutenberg/frankenstein.txt"]
FILE_BYTES = 16 << 20


def base_lines() -> list[str]:
    lines = []
    for name in BOOKS:
        text = (DATA / name).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        lines += text.splitlines(keepends=True)
    return lines


def variant(lines: list[str], copy: int) -> str:
    """One copy of the base text: rotated, with ~2% of lines' words reversed."""
    rng = random.Random(copy)
    start = rng.randrange(len(lines))
    rotated = lines[start:] + lines[:start]
    for i in rng.sample(range(len(rotated)), len(rotated) // 50):
        rotated[i] = " ".join(reversed(rotated[i].split())) + "\n"
    return f"== Copy {copy} ==\n\n" + "".join(rotated)


def build_corpus(folder: Path, megabytes: int) -> int:
    folder.mkdir(parents=True)
    lines, target, written, copy, index = base_lines(), megabytes << 20, 0, 0, 0
    while written < target:
        with open(folder / f"part-{index:04d}.txt", "w", encoding="utf-8") as f:
            size = 0
            while size < FILE_BYTES and written + size < target:
                chunk = variant(lines, copy).encode()[: target - written - size]
                f.write(chunk.decode("utf-8", "ignore"))
                size, copy = size + len(chunk), copy + 1
        written, index = written + size, index + 1
    return written


def run_child(corpus: Path, out: Path, args, seed: int) -> dict:
    """Run prepare in a fresh process; return its numbers with wall time and peak RSS."""
    cmd = [sys.executable, __file__, "--child", str(corpus), str(out), args.kind, str(args.vocab),
           str(args.train_mb), str(seed)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"prepare failed for {corpus} (exit status {status})")
    return {**json.loads(output.strip().splitlines()[-1]), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def child(corpus: str, out: str, kind: str, vocab: str, train_mb: str, seed: str) -> None:
    from fledge.prepare import prepare
    from fledge.recipe import load_recipe
    recipe = load_recipe(None, base={
        "data": {"sources": [corpus], "prepared_dir": out, "split_seed": int(seed)},
        "tokenizer": {"kind": kind, "vocab_size": int(vocab), "train_bytes": int(train_mb) << 20}})
    manifest = prepare(recipe, progress=False)
    print(json.dumps({"tokens": manifest["stats"]["tokens"], "text_bytes": manifest["stats"]["text_bytes"]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--kind", default="bpe", choices=("bpe", "sentencepiece", "char"))
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--train-mb", type=int, default=20, help="tokenizer.train_bytes in MB, for every size")
    parser.add_argument("--reencode", action="store_true", help="also time a re-run that reuses the tokenizer")
    parser.add_argument("--tmp", default=None, help="folder for the temporary corpora (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and outputs")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent: the benchmark builds its corpora from ../shared/data")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    root = Path(tempfile.mkdtemp(prefix="fledge-prepare-bench-", dir=args.tmp))
    rows = []
    try:
        for mb in (int(s) for s in args.sizes.split(",")):
            corpus = root / f"corpus-{mb}mb"
            nbytes = build_corpus(corpus, mb)
            runs = [("prepare", 1234)] + ([("re-encode", 99)] if args.reencode else [])
            for label, seed in runs:
                result = run_child(corpus, root / f"out-{mb}mb", args, seed)
                rows.append({"size_mb": nbytes / 2**20, "run": label, **result})
                print_row(rows[-1], cores, flush=True)
            if not args.keep:
                shutil.rmtree(corpus)
                shutil.rmtree(root / f"out-{mb}mb", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summarize(rows, cores, args)


def print_row(row: dict, cores: int, flush: bool = False) -> None:
    mbps = row["size_mb"] / row["wall_s"]
    print(f"{row['size_mb']:8.0f} MB  {row['run']:<10} {row['wall_s']:8.1f} s  {mbps:7.2f} MB/s  "
          f"{mbps / cores:6.2f} MB/s/core  peak RSS {row['peak_rss_mb']:7.0f} MB  "
          f"{row['tokens'] / row['text_bytes']:.3f} tokens/byte", flush=flush)


def summarize(rows: list[dict], cores: int, args) -> None:
    print(f"\nkind {args.kind}, vocab {args.vocab}, tokenizer.train_bytes {args.train_mb} MB, {cores} cores "
          f"(tokenizers uses all of them)")
    for run in ("prepare", "re-encode"):
        same = [r for r in rows if r["run"] == run]
        if len(same) >= 2:
            small, large = min(same, key=lambda r: r["size_mb"]), max(same, key=lambda r: r["size_mb"])
            print(f"{run}: peak RSS {large['size_mb']:.0f} MB / {small['size_mb']:.0f} MB corpus = "
                  f"{large['peak_rss_mb'] / small['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
