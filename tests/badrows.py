"""Hostile rows for fuzz tests: JSON lines that once crashed fledge's readers, and ordinary bad ones.

    from badrows import BAD_LINES, write_mixed_jsonl
    path, good, bad = write_mixed_jsonl(tmp_path / "rows.jsonl", fields=("input", "output"))

`BAD_LINES` maps a name to the raw bytes of one line (without the newline). Each one is a
row no tool may accept as a valid record and none may crash on: every tool reports it as
an invalid row with file:line (or drops it under --drop-invalid and says how many).
`write_mixed_jsonl` interleaves them with valid rows at seeded positions and returns the
1-based line numbers of the bad ones, so a test can check rows in = rows out + rows reported.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEEP = 100_000  # nesting depth past Python's recursion limit (json.loads raises RecursionError)

BAD_LINES: dict[str, bytes] = {
    "deep_nesting": b'{"input": ' + b"[" * DEEP + b"]" * DEEP + b', "output": "x", "text": "x"}',
    "huge_integer": b'{"input": "a", "output": ' + b"9" * 5000 + b', "text": "a"}',
    "lone_surrogate": b'{"input": "a\\ud800b", "output": "c", "text": "a\\ud800b"}',
    "nan_literal": b'{"input": "a", "output": NaN, "text": NaN}',
    "infinity_literal": b'{"input": "a", "output": Infinity, "text": -Infinity}',
    "truncated_json": b'{"input": "a", "output": "b',
    "not_an_object": b'["input", "output"]',
    "bare_string": b'"just a string"',
    "number_row": b"42",
    "null_row": b"null",
    "trailing_garbage": b'{"input": "a", "output": "b", "text": "c"} trailing',
    "not_utf8": b'{"input": "caf\xe9", "output": "b", "text": "caf\xe9"}',
    "nul_byte_outside_string": b'{"input": "a",\x00 "output": "b"}',
    "missing_fields": b'{"other": "a"}',
    "wrong_types": b'{"input": {"nested": 1}, "output": [1, 2], "text": 7}',
    "object_as_output": b'{"input": "a", "output": {"a": 1}, "text": {"a": 1}}',
}


def valid_row(i: int) -> dict:
    return {"input": f"question {i} about things", "output": f"answer {i} in words", "text": f"document {i} text"}


def write_mixed_jsonl(path: Path, n_good: int = 40, seed: int = 0,
                      kinds: list[str] | None = None) -> tuple[Path, int, list[int]]:
    """Write `n_good` valid rows with every bad line of `kinds` (default: all) at seeded places.

    Returns (path, number of good rows, sorted 1-based line numbers of the bad rows).
    """
    kinds = list(BAD_LINES) if kinds is None else kinds
    rng = random.Random(seed)
    lines: list[bytes | None] = [json.dumps(valid_row(i)).encode() for i in range(n_good)]
    for kind in kinds:
        lines.insert(rng.randrange(len(lines) + 1), BAD_LINES[kind])
    bad = [i + 1 for i, line in enumerate(lines) if line in (BAD_LINES[k] for k in kinds)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, n_good, sorted(bad)
