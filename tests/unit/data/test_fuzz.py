"""Fuzz: a seeded corpus of hostile rows in every file format, through the real CLI entry point.

Every bad row of `badrows.BAD_LINES` (and more: blank and whitespace-only lines, a BOM, CRLF
line ends, bad elements of a JSON array, ragged and undecodable CSV rows) is mixed with good
rows. `data check`, `data merge --drop-invalid` and `data split --drop-invalid` must report each
bad row as file:line, never show a traceback, and account for every row: rows in = rows written
+ rows reported. Without --drop-invalid, merge and split stop with one line naming the first bad
row. Driven through `fledge.cli.main` in-process, and once through `python -m fledge`.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from badrows import BAD_LINES, valid_row, write_mixed_jsonl

from fledge.cli import main

REPO = Path(__file__).resolve().parents[3]

# JSONL lines no tool may accept, beyond badrows' table
EXTRA_BAD = [
    b'{"input": "a", "output": "b", "x": 1e999}',                                   # float overflow
    b'{"input": "a", "output": "b", "metadata": {"score": NaN}}',
    b"-Infinity",
    b'{"input": "a", "output": "b", "metadata": {"x": ' + b"[" * 500 + b"]" * 500 + b"}}",  # json reads it
    b'{"input": "a", "output": "b", "\\udfff": 1}',                                  # surrogate in a key
    b"\x0c",                                                                         # not JSON whitespace
    b'{"input": "a", "output": "b"} \r x',
    b'{"input": "a", "output": ""}',
    b'{"messages": [{"role": "user", "content": "hi"}]}',
    b"[]",
    b'\xef\xbb\xbf{"input": "bom-mid-file", "output": "b"}',                    # only line 1 may open with a BOM
]
# elements of a .json array that are bad rows but leave the array readable
ARRAY_BAD = [k for k in BAD_LINES if k not in ("truncated_json", "trailing_garbage", "not_utf8")]


@dataclass
class Corpus:
    files: list[Path]
    good: int
    bad: set[tuple[str, int]]          # (file, line) of every bad row

    def first_bad(self) -> tuple[str, int]:
        for f in self.files:
            lines = sorted(line for path, line in self.bad if path == str(f))
            if lines:
                return str(f), lines[0]
        raise AssertionError("no bad rows")


def _good(tag: str, i: int) -> dict:
    return {"input": f"{tag} question {i}", "output": f"{tag} answer {i}", "text": f"{tag} text {i}"}


def _extra_jsonl(path: Path, rng: random.Random) -> tuple[int, list[int]]:
    """A BOM opening the file, CRLF line ends, blank and whitespace-only lines, odd but valid text, and EXTRA_BAD."""
    good = [json.dumps(_good("extra", i), ensure_ascii=i % 2 == 0).encode() for i in range(12)]
    good.append(json.dumps({"input": "emoji \ud83d\ude00 and \u2028 and \x85", "output": "ok",
                            "text": "t"}).encode())
    lines: list[tuple[bytes, bool]] = [(g, False) for g in good] + [(b, True) for b in EXTRA_BAD]
    rng.shuffle(lines)
    for _ in range(5):
        lines.insert(rng.randrange(len(lines) + 1), (rng.choice([b"", b"   ", b"\t \t"]), False))
    blank = {b"", b"   ", b"\t \t"}
    data = b"\xef\xbb\xbf" + b"".join(line + b"\r\n" for line, _ in lines)
    path.write_bytes(data)
    bad = [n for n, (line, is_bad) in enumerate(lines, 1) if is_bad]
    assert sum(1 for line, is_bad in lines if not is_bad and line not in blank) == len(good)
    return len(good), bad


def _array_json(path: Path, rng: random.Random) -> tuple[int, list[int]]:
    """A .json array with bad elements between good ones, some good ones spread over lines."""
    elements = [(json.dumps(_good("array", i), indent=2 if i % 3 == 0 else None), False) for i in range(10)]
    elements += [(BAD_LINES[k].decode(), True) for k in ARRAY_BAD]
    rng.shuffle(elements)
    text, bad, line = "[\n", [], 2
    for k, (element, is_bad) in enumerate(elements):
        if is_bad:
            bad.append(line)
        text += element + (",\n" if k < len(elements) - 1 else "\n")
        line += element.count("\n") + 1
    path.write_text(text + "]\n", encoding="utf-8")
    return 10, bad


def _table_csv(path: Path, rng: random.Random) -> tuple[int, list[int]]:
    """A CSV with ragged, undecodable and empty-output rows, blank lines and a two-line field."""
    rows: list[tuple[bytes, bool]] = [(f"table question {i},table answer {i},text {i}".encode(), False)
                                      for i in range(10)]
    rows.append(('"two\nlines",table answer x,text x'.encode(), False))
    rows += [(b"only,two", True), (b"one,two,three,four", True), (b"caf\xe9,b,c", True), (b"q,,t", True)]
    rng.shuffle(rows)
    for _ in range(3):
        rows.insert(rng.randrange(len(rows) + 1), (rng.choice([b"", b"  ", b",,"]), False))
    data, bad, line = b"input,output,text\n", [], 2
    for row, is_bad in rows:
        if is_bad:
            bad.append(line)
        data += row + b"\n"
        line += row.count(b"\n") + 1
    path.write_bytes(data)
    return 11, bad


def build_corpus(folder: Path, seed: int) -> Corpus:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    path, good, bad = write_mixed_jsonl(folder / "mixed.jsonl", n_good=30, seed=seed)
    parts[path] = (good, bad)
    for name, make in (("extra.jsonl", _extra_jsonl), ("array.json", _array_json), ("table.csv", _table_csv)):
        parts[folder / name] = make(folder / name, rng)
    files = list(parts)
    rng.shuffle(files)
    return Corpus(files, sum(g for g, _ in parts.values()),
                  {(str(f), n) for f, (_, lines) in parts.items() for n in lines})


@pytest.fixture(scope="module", params=[0, 1, 2])
def corpus(request, tmp_path_factory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp(f"fuzz{request.param}"), request.param)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)      # an exception escaping here fails the test: main must not raise
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


LOCATION = re.compile(r"^(.*):(\d+): ")


def places(problems: list[str]) -> list[tuple[str, int]]:
    out = []
    for p in problems:
        m = LOCATION.match(p)
        assert m, f"a problem without file:line: {p!r}"
        out.append((m.group(1), int(m.group(2))))
    return out


def count_rows(path: Path) -> int:
    """Lines of a written JSONL file, each strict JSON (no NaN, no lone surrogate)."""
    def refuse(name):
        raise AssertionError(f"{name} written to {path}")
    text = path.read_bytes().decode("utf-8")          # a lone surrogate cannot have been written
    lines = text.split("\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        json.loads(line, parse_constant=refuse)
    return len(lines) - 1


def test_check_reports_every_bad_row_with_its_line(corpus, capsys):
    code, out, err = run(["data", "check", *map(str, corpus.files), "--json", "--no-near"], capsys)
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert (report["rows"], report["invalid"]) == (corpus.good, len(corpus.bad))
    assert sorted(places(report["problems"])) == sorted(corpus.bad)
    assert [e["check"] for e in report["errors"]] == ["schema"]


def test_merge_drop_invalid_writes_every_good_row_and_reports_every_bad_one(corpus, tmp_path, capsys):
    out_path = tmp_path / "merged.jsonl"
    code, out, err = run(["data", "merge", *map(str, corpus.files), "-o", str(out_path), "--drop-invalid",
                          "--dedupe", "none", "--json"], capsys)
    report = json.loads(out)
    assert code == 0, err
    assert sorted(places(report["invalid"])) == sorted(corpus.bad)
    assert count_rows(out_path) == report["written"] == corpus.good
    assert report["read"] + len(report["invalid"]) == corpus.good + len(corpus.bad)


def test_split_drop_invalid_writes_every_good_row_and_reports_every_bad_one(corpus, tmp_path, capsys):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    code, out, err = run(["data", "split", *map(str, corpus.files), "--train-out", str(train), "--val-out", str(val),
                          "--drop-invalid", "--dedupe", "none", "--ratio", "0.8", "--json"], capsys)
    report = json.loads(out)
    assert code == 0, err
    assert sorted(places(report["invalid"])) == sorted(corpus.bad)
    assert count_rows(train) + count_rows(val) == corpus.good
    assert count_rows(val) > 0 and report["leaked_exact"] == 0


@pytest.mark.parametrize("verb", ["merge", "split"])
def test_without_drop_invalid_the_first_bad_row_stops_it_in_one_line(corpus, tmp_path, capsys, verb):
    outputs = ["-o", str(tmp_path / "m.jsonl")] if verb == "merge" else ["--out-dir", str(tmp_path / "split")]
    code, out, err = run(["data", verb, *map(str, corpus.files), *outputs], capsys)
    path, line = corpus.first_bad()
    assert code != 0 and err.startswith(f"error: {path}:{line}: ")
    assert err.rstrip().endswith("Fix the row or rerun with --drop-invalid.")
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_real_entry_point_reads_the_corpus(tmp_path):
    corpus = build_corpus(tmp_path / "corpus", seed=7)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    out_path = tmp_path / "merged.jsonl"
    proc = subprocess.run([sys.executable, "-m", "fledge", "data", "merge", *map(str, corpus.files), "-o",
                           str(out_path), "--drop-invalid", "--dedupe", "none", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(places(report["invalid"])) == sorted(corpus.bad)
    assert count_rows(out_path) == corpus.good


def test_the_table_covers_every_kind_of_bad_row():
    """Each BAD_LINES kind is in the corpus: a new kind added there is fuzzed here too."""
    assert set(BAD_LINES) - set(ARRAY_BAD) == {"truncated_json", "trailing_garbage", "not_utf8"}
    assert valid_row(0).keys() == {"input", "output", "text"}
