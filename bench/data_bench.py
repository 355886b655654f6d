"""Throughput and peak memory of `fledge data check` and deduplication on a million short rows.

    python bench/data_bench.py                       # 1,000,000 rows in 20 files under bench/out/data
    python bench/data_bench.py --rows 200000 --files 200 --phases check,merge-near

Rows are made from real data in ../shared/data (limn expressions, Cypher questions and queries)
with variations: words dropped, swapped or added, numbers appended, case changed; 5% of rows
are planted exact copies and 5% near copies (one word changed). Each phase runs in its own
process so its peak RSS is its own. Prints one line per phase and writes bench/out/data_bench.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PHASES = {
    "check": "full check: schema, exact + near duplicates, input == output, lengths, categories",
    "check-exact": "check without near duplicates",
    "merge-near": "merge with exact + near dedupe (two passes, writes the kept rows)",
}


def _sources() -> tuple[list[str], list[tuple[str, str]]]:
    corpus = json.loads((SHARED / "limn" / "raw_corpus.json").read_text(encoding="utf-8"))
    expressions = [e["content"] for e in corpus["expressions"] if 0 < len(e["content"]) < 120]
    with open(SHARED / "cypher" / "neo4j_accepted_queries.csv", encoding="utf-8", newline="") as f:
        cypher = [(r["question"], r["cypher"]) for r in csv.DictReader(f)]
    return expressions, cypher


def _vary(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    words = list(words)
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        i = rng.randrange(len(words)) if words else 0
        if action < 0.3 and len(words) > 2:
            del words[i]
        elif action < 0.6 and len(words) > 1:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        elif action < 0.85:
            words.insert(i, rng.choice(vocab))
        else:
            words.append(str(rng.randint(0, 999)))
    return words


def generate(out_dir: Path, rows: int, files: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    expressions, cypher = _sources()
    vocab = sorted({w for e in expressions for w in e.split()})
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.jsonl"):
        old.unlink()
    handles = [open(out_dir / f"part-{i:04d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    recent: list[dict] = []
    for n in range(rows):
        r = rng.random()
        if r < 0.05 and recent:
            row = rng.choice(recent)                                    # planted exact copy
        elif r < 0.10 and recent:
            base = rng.choice(recent)                                   # planted near copy
            words = base["output"].split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            row = {**base, "output": " ".join(words)}
        elif r < 0.85:
            words = _vary(rng.choice(expressions).split(), rng, vocab)
            cut = rng.randint(1, max(1, len(words) - 1))
            row = {"input": " ".join(words[:cut]), "output": " ".join(words[cut:]) or "end",
                   "metadata": {"type": rng.choice(["completion", "interpretation", "context"])}}
        else:
            question, query = rng.choice(cypher)
            words = _vary(question.split(), rng, vocab)
            row = {"input": " ".join(words), "output": query if rng.random() < 0.5 else query.lower(),
                   "metadata": {"type": "cypher"}}
        if len(recent) < 5000:
            recent.append(row)
        else:
            recent[rng.randrange(5000)] = row
        handles[n % files].write(json.dumps(row, ensure_ascii=False) + "\n")
    for h in handles:
        h.close()


def run_phase(phase: str, data: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from fledge.data.check import CheckConfig, check
    from fledge.data.split import MergeOptions, merge
    files = sorted(data.glob("part-*.jsonl"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if phase in ("check", "check-exact"):
        report = check(files, CheckConfig(near_duplicates=phase == "check", category_field="metadata.type",
                                          max_length=128))
        rows = report.rows + report.invalid
        found = {"duplicates": report.count("duplicates"), "near_duplicates": report.count("near_duplicates"),
                 "identity": report.count("identity")}
    else:
        report = merge(files, data.parent / "merged.jsonl", MergeOptions(dedupe="near"))
        rows = report.read
        found = {"exact_dropped": report.exact_dropped, "near_dropped": report.near_dropped}
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_before  # CPU seconds: steadier than wall time on a busy machine
    return {"phase": phase, "rows": rows, "files": len(files), "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds), "cpu_s": round(cpu, 1), "rows_per_cpu_s": round(rows / cpu),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), **found}  # ru_maxrss is KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "data"))
    ap.add_argument("--phases", default="check,check-exact,merge-near", help=f"comma list of {', '.join(PHASES)}")
    ap.add_argument("--reuse", action="store_true", help="keep the generated rows from a previous run")
    ap.add_argument("--phase", help=argparse.SUPPRESS)   # internal: run one phase in this process
    args = ap.parse_args()
    data = Path(args.out)
    if args.phase:
        print(json.dumps(run_phase(args.phase, data)))
        return 0
    if not SHARED.is_dir():
        print(f"needs the real data in {SHARED}", file=sys.stderr)
        return 2
    if not (args.reuse and any(data.glob("part-*.jsonl"))):
        start = time.perf_counter()
        generate(data, args.rows, args.files)
        print(f"generated {args.rows:,} rows in {args.files} files in {time.perf_counter() - start:.1f}s "
              f"({sum(f.stat().st_size for f in data.glob('part-*.jsonl')) / 1e6:.0f} MB)")
    results = []
    for phase in args.phases.split(","):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--out", str(data)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        extra = {k: v for k, v in result.items() if k not in ("phase", "rows", "files", "seconds", "rows_per_s",
                                                              "cpu_s", "rows_per_cpu_s", "peak_rss_mb")}
        print(f"{phase:<12} {result['rows']:>10,} rows  {result['seconds']:>6.1f}s wall {result['rows_per_s']:>8,} "
              f"rows/s  {result['cpu_s']:>6.1f}s CPU {result['rows_per_cpu_s']:>8,} rows/CPU-s  "
              f"peak RSS {result['peak_rss_mb']:>5,} MB  {extra}")
    (data.parent / "data_bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
