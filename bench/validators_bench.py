"""Validator throughput and acceptance on real data, one table row per validator and data set.

    python bench/validators_bench.py                # reads ../shared/data beside the repo
    python bench/validators_bench.py --data /path/to/shared/data --repeat 3

Rows: the 400 Cypher queries Neo4j 5 ran and the 885 NornicDB generator outputs (cypher), and
mutants of the 400 that are never valid (a bracket or opening quote deleted, a keyword
misspelled, a cut inside brackets; the unit tests' generator), whose "ok" are false accepts;
the 3,000 limn outputs (vocabulary, with purity and mean adherence); the NornicDB and
persona-chat JSONL lines (json); fledge's own source files (python). There is no real DOT or
SQL in shared/data, so those rows use seeded synthetic sets (stated in the table): DOT graphs
of 5 to 40 nodes with quoted labels, one in ten broken, timed one call at a time and through
validate_many (one dot process per batch); and SQL statements of common shapes. Times are the
best of --repeat runs, after one warm-up call; a validator's load time is shown apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

from fledge.validators import get_validator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_validators import cypher_mutants  # noqa: E402  (one mutant generator for the tests and this table)
SQL_SHAPES = [
    "SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name LIMIT {n}",
    "SELECT d.name, count(*) AS staff FROM employees e JOIN departments d ON d.id = e.dept_id GROUP BY d.name "
    "HAVING count(*) > {n}",
    "WITH recent AS (SELECT * FROM orders WHERE total > {n}) SELECT customer_id, sum(total) FROM recent "
    "GROUP BY customer_id",
    "INSERT INTO events (kind, payload) VALUES ('click', '{{\"x\": {n}}}')",
    "UPDATE accounts SET balance = balance - {n} WHERE id = 7",
    "SELECT a FROM t GROUP",                       # broken: truncated
    "SELECT p.title, (SELECT count(*) FROM comments c WHERE c.post_id = p.id) AS n FROM posts p WHERE p.id IN "
    "(1, 2, {n})",
    "SELECT * FROM t WHERE x = ",                  # broken
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per row; the best is kept")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist; give --data, the folder holding shared/data's files")
    rows = []
    for name, options, label, texts, batched in data_sets(args.data):
        started = time.perf_counter()
        validator = get_validator(name, **options)
        load = time.perf_counter() - started
        validator(texts[0])  # warm-up: lazy imports, first-use caches
        best, verdicts = float("inf"), []
        for _ in range(args.repeat):
            started = time.perf_counter()
            verdicts = validator.validate_many(texts) if batched else [validator(t) for t in texts]
            best = min(best, time.perf_counter() - started)
        rows.append(row(name + (" (validate_many)" if batched else ""), label, verdicts, best, load))
    print_table(rows)


def data_sets(data: Path):
    """(validator, options, label, texts, batched) for every row of the table."""
    neo4j = [r["cypher"] for r in csv.DictReader((data / "cypher" / "neo4j_accepted_queries.csv").open())]
    nornic = [json.loads(line)["output"]
              for line in (data / "nornicdb" / "cypher_training_count1000_seed42.jsonl").open()]
    yield "cypher", {}, "neo4j_accepted_queries.csv", neo4j, False
    yield "cypher", {}, "nornicdb outputs", nornic, False
    mutation_rng = random.Random(0)
    mutants = [text for query in neo4j for _, text in cypher_mutants(query, mutation_rng)]
    yield "cypher", {"extract": False}, "neo4j mutants (all invalid)", mutants, False
    limn = [json.loads(line)["output"] for line in (data / "limn" / "limn_train_first3000.jsonl").open()]
    yield "vocabulary", {"path": data / "limn" / "vocabulary.json"}, "limn outputs", limn, False
    lines = [line for path in ("nornicdb/cypher_training_count1000_seed42.jsonl",
                               "arianna/arianna_conversations.jsonl")
             for line in (data / path).read_text(encoding="utf-8").splitlines() if line.strip()]
    yield "json", {}, "nornicdb + arianna lines", lines, False
    sources = [p.read_text(encoding="utf-8") for p in sorted((REPO / "src").rglob("*.py"))
               if p.stat().st_size < 200_000]
    yield "python", {"extract": False}, "fledge source files", sources, False  # files, not chatty answers
    yield "regex", {"pattern": r"MATCH .+ RETURN .+"}, "nornicdb outputs", nornic, False
    rng = random.Random(0)
    sql = [rng.choice(SQL_SHAPES).format(n=rng.randrange(100)) for _ in range(1000)]
    yield "sql", {"dialect": "postgres"}, "synthetic, 1000", sql, False
    graphs = [synthetic_graph(rng) for _ in range(300)]
    yield "dot", {}, "synthetic, 300", graphs, False
    yield "dot", {}, "synthetic, 300", graphs, True


def synthetic_graph(rng: random.Random) -> str:
    """A DOT graph of 5-40 nodes with quoted labels; one in ten has a mistake a model makes."""
    directed = rng.random() < 0.7
    op = "->" if directed else "--"
    n = rng.randrange(5, 41)
    lines = [f'{"digraph" if directed else "graph"} G{rng.randrange(99)} {{', "  rankdir=LR;",
             '  node [shape=box, style="rounded,filled", fillcolor="#eef"];']
    lines += [f'  n{i} [label="step {i}: {{x}}"];' for i in range(n)]
    lines += [f"  n{rng.randrange(n)} {op} n{rng.randrange(n)};" for _ in range(n + rng.randrange(n))]
    mistake = rng.random()
    if mistake < 0.04:
        lines.insert(3, f"  a {'--' if directed else '->'} b;")
    elif mistake < 0.07:
        lines.insert(3, '  bad [label="unterminated];')
    elif mistake < 0.10:
        return "\n".join(lines)  # no closing brace
    return "\n".join(lines + ["}"])


def row(name: str, label: str, verdicts: list, seconds: float, load: float) -> dict:
    n = len(verdicts)
    result = {"validator": name, "data": label, "n": n, "ok": sum(v.ok is True for v in verdicts),
              "bad": sum(v.ok is False for v in verdicts), "none": sum(v.ok is None for v in verdicts),
              "ms": 1000 * seconds / n, "per_s": n / seconds, "load_s": load}
    scores = [v.score for v in verdicts if v.score is not None]
    if scores:
        result["extra"] = f"purity {result['ok'] / max(1, n - result['none']):.1%}, " \
                          f"adherence {sum(scores) / len(scores):.1%}"
    return result


def print_table(rows: list[dict]) -> None:
    header = f"{'validator':<26} {'data':<28} {'n':>5} {'ok':>5} {'bad':>5} {'none':>5} {'ms/item':>8} " \
             f"{'items/s':>8} {'load s':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['validator']:<26} {r['data']:<28} {r['n']:>5} {r['ok']:>5} {r['bad']:>5} {r['none']:>5} "
              f"{r['ms']:>8.2f} {r['per_s']:>8.0f} {r['load_s']:>6.2f}" + (f"  {r['extra']}" if "extra" in r else ""))


if __name__ == "__main__":
    main()
