"""prepare over hostile .jsonl rows: every bad row is a DataError with file:line (never a
traceback), and with data.on_bad_row: skip, rows in = rows out + rows reported.

    OMP_NUM_THREADS=1 pytest tests/unit/test_prepare_fuzz.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from badrows import BAD_LINES, valid_row, write_mixed_jsonl
from fledge.errors import DataError
from fledge.jsonstrict import MAX_DEPTH
from fledge.prepare import load_manifest, prepare, shard_arrays
from fledge.recipe import load_recipe
from fledge.tokenizer import load_tokenizer

DEEP = 100_000
# More rows no reader may accept, besides tests/badrows.py's.
EXTRA_BAD: dict[str, bytes] = {
    "deep_object": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "negative_huge_integer": b'{"text": "a", "n": -' + b"9" * 5000 + b"}",
    "float_overflow": b'{"text": "a", "score": 1e999}',
    "lone_low_surrogate": b'{"text": "x\\udc80y"}',
    "surrogate_pair_reversed": b'{"text": "\\ude00\\ud83d"}',
    "raw_nul_in_string": b'{"text": "a\x00b"}',
    "only_a_nul": b"\x00",
    "utf8_encoded_surrogate": b'{"text": "\xed\xa0\x80"}',
    "overlong_utf8": b'{"text": "\xc0\xaf"}',
    "bom_mid_file": b'\xef\xbb\xbf{"text": "x"}',
    "empty_object": b"{}",
    "text_null": b'{"text": null}',
    "text_true": b'{"text": true}',
    "two_objects": b'{"text": "a"}{"text": "b"}',
    # the rules of fledge.jsonstrict, shared with the data tools: 200 levels at most, and no lone
    # surrogate in any string (not only the text field)
    "nested_past_max_depth": b'{"text": "a", "n": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}",
    "surrogate_in_another_field": b'{"text": "a", "note": "\\ud800"}',
    "surrogate_in_a_key": b'{"text": "a", "\\udfff": 1}',
    "formfeed_line": b"\x0c",  # not JSON whitespace, so not a blank line
}
# Rows that look odd but are valid: their text must come through exactly.
EXTRA_GOOD: dict[bytes, str] = {
    b'{"text": "pair \\ud83d\\ude00 ok"}': "pair \U0001F600 ok",
    b'{"text": "escaped nul \\u0000 ok"}': "escaped nul \x00 ok",
    b'{"text": "t\\tab \\u00e9", "n": 12345678901234567890}': "t\tab \u00e9",
    b'{"text": "crlf line"}\r': "crlf line",
    b'{"text": "deep ok", "n": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}": "deep ok",
}
ALL_BAD = {**BAD_LINES, **EXTRA_BAD}


def recipe(tmp_path, sources, **data):
    base = {"data": {"sources": [str(s) for s in sources], "prepared_dir": str(tmp_path / "prep"), **data},
            "tokenizer": {"kind": "char", "vocab_size": 200}}
    return load_recipe(None, base=base)


def documents(out) -> list[str]:
    """Every decoded document of both splits."""
    tok, manifest = load_tokenizer(out), load_manifest(out)
    docs = []
    for split in ("train", "val"):
        arrays = shard_arrays(out, split, manifest)
        if arrays:
            ids = np.concatenate(arrays)
            docs += [tok.decode(run) for run in np.split(ids, np.flatnonzero(ids == tok.bos_id))[1:]]
    return docs


def hostile_corpus(tmp_path):
    """Two .jsonl files: every bad kind in each, at seeded places, plus the extras (and the odd
    valid rows) appended to the second. Returns (paths, good texts, "file:line" of bad rows)."""
    a, n_a, bad_a = write_mixed_jsonl(tmp_path / "a.jsonl", n_good=30, seed=1)
    b, n_b, bad_b = write_mixed_jsonl(tmp_path / "b.jsonl", n_good=20, seed=2)
    good = [valid_row(i)["text"] for i in range(n_a)] + [valid_row(i)["text"] for i in range(n_b)]
    lines = b.read_bytes().split(b"\n")[:-1]
    extra = list(EXTRA_BAD.values())
    for i, (raw, text) in enumerate(EXTRA_GOOD.items()):
        extra.insert(3 * i + 1, raw)
        good.append(text)
    for raw in extra:
        lines.append(raw)
        if raw in EXTRA_BAD.values():
            bad_b.append(len(lines))
    lines.append(b"")  # a blank line is not a row
    b.write_bytes(b"\n".join(lines) + b"\n")
    bad = [f"{a.as_posix()}:{n}" for n in bad_a] + [f"{b.as_posix()}:{n}" for n in bad_b]
    return [a, b], good, bad


def test_default_stops_at_the_first_bad_row(tmp_path):
    files, _, bad = hostile_corpus(tmp_path)
    r = recipe(tmp_path, files)
    with pytest.raises(Exception) as err:
        prepare(r, progress=False)
    assert type(err.value) is DataError
    message = str(err.value)
    assert message.startswith(bad[0] + ": ") and "\n" not in message
    assert "data.on_bad_row: skip" in message
    assert not (r.prepared_path / "manifest.json").exists()


def test_skip_drops_exactly_the_bad_rows(tmp_path, capsys):
    files, good, bad = hostile_corpus(tmp_path)
    r = recipe(tmp_path, files, on_bad_row="skip")
    manifest = prepare(r, progress=False)
    rows = manifest["stats"]["rows"]
    assert [row["row"] for row in rows["bad_rows"]] == bad
    assert all(row["problem"] and "\n" not in row["problem"] for row in rows["bad_rows"])
    assert rows["bad"] == len(bad) and rows["empty"] == 0
    assert rows["read"] == rows["written"] + rows["bad"] == len(good) + len(bad)
    assert manifest["stats"]["documents"] == rows["written"] == len(good)
    assert sum(s["documents"] for s in manifest["splits"].values()) == len(good)
    assert sorted(documents(r.prepared_path)) == sorted(good)
    report = capsys.readouterr().err
    assert f"dropped {len(bad)} bad .jsonl row(s) of {len(good) + len(bad)} (data.on_bad_row: skip): " in report
    assert ", ".join(bad[:10]) + f" and {len(bad) - 10} more." in report
    assert json.loads((r.prepared_path / "manifest.json").read_text())["stats"]["rows"] == rows


@pytest.mark.parametrize("kind", list(ALL_BAD))
def test_each_bad_row_is_reported_with_file_and_line(tmp_path, kind):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "first row"}\n' + ALL_BAD[kind] + b'\n{"text": "last row"}\n')
    with pytest.raises(Exception) as err:
        prepare(recipe(tmp_path, [path]), progress=False)
    assert type(err.value) is DataError and err.value.line == 2
    assert str(err.value).startswith(f"{path.as_posix()}:2: ") and "\n" not in str(err.value)
    r = recipe(tmp_path, [path], on_bad_row="skip")
    manifest = prepare(r, progress=False)
    assert [row["row"] for row in manifest["stats"]["rows"]["bad_rows"]] == [f"{path.as_posix()}:2"]
    assert sorted(documents(r.prepared_path)) == ["first row", "last row"]


def test_all_rows_bad_is_an_empty_corpus(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(list(BAD_LINES.values())[:5]) + b"\n")
    with pytest.raises(DataError, match=r"rows\.jsonl: the corpus is empty: 1 source file\(s\), all 5 rows are bad"):
        prepare(recipe(tmp_path, [path], on_bad_row="skip"), progress=False)
