"""sources: hostile rows are invalid rows at their line, only regular files are read, each file once."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from badrows import BAD_LINES, DEEP

from fledge.data.records import RowProblem, read_records, scan_file, write_jsonl
from fledge.data.sources import Invalid, decode_json, expand_sources, iter_raw_rows, refuse_overwrite
from fledge.errors import DataError, StorageError
from fledge.jsonstrict import MAX_DEPTH

GOOD = b'{"input": "q", "output": "a"}'


@pytest.fixture
def no_hang():
    """Fail instead of hanging when something opens a FIFO nobody writes to."""
    def stuck(*_):
        raise AssertionError("blocked: a FIFO was opened")
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_every_hostile_line_is_an_invalid_row_and_the_next_row_is_read(tmp_path, kind):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD + b"\n" + BAD_LINES[kind] + b"\n" + GOOD.replace(b'"q"', b'"q2"') + b"\n")
    items = list(scan_file(path))
    assert [(type(i).__name__, i.line) for i in items] == [("Record", 1), ("RowProblem", 2), ("Record", 3)]
    assert str(items[1]).startswith(f"{path}:2: ")


@pytest.mark.parametrize("text,fragment", [
    ('{"input": "a", "output": NaN}', "NaN is not a JSON value"),
    ('{"input": "a", "output": -Infinity}', "-Infinity is not a JSON value"),
    ('{"input": "a", "output": 1e999}', "too large to read"),
    ('{"input": "' + "9" * 5000 + '"}', None),                        # digits inside a string are fine
    ('{"n": ' + "9" * 5000 + "}", "more than 4,300 digits"),
    ('{"n": -' + "9" * 4300 + "}", None),                               # MAX_DIGITS itself is read
    ('{"s": "\\ud800"}', "lone surrogate escape (\\ud800 without its pair)"),
    ('{"\\udfff": 1}', "lone surrogate escape (\\udfff without its pair)"),   # keys too
    ('\ufeff{"s": 1}', "opens with a byte order mark"),
    ('{"s": "\\ud83d\\ude00"}', None),                                # a proper pair is one character
    ('{"s": "\\\\ud800"}', None),                                     # an escaped backslash, then text
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested more than"),
    ("[" * MAX_DEPTH + "]" * MAX_DEPTH, None),
    ('{"s": "' + "[" * DEEP + '"}', None),                            # brackets inside a string
    ('{"input": "a", "output": "b', "Unterminated string starting at column"),
])
def test_decode_json_is_strict_and_never_raises(text, fragment):
    value = decode_json(text)
    if fragment is None:
        assert not isinstance(value, Invalid)
    else:
        assert isinstance(value, Invalid) and fragment in value.message


def test_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n   \r\n\t\n" + GOOD.replace(b'"a"', b'"b"') + b"\r\n")
    assert [(r.response, r.line) for r in scan_file(path)] == [("a", 1), ("b", 5)]


def test_write_jsonl_refuses_nan_and_surrogates_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    for bad in ({"x": float("nan")}, {"x": float("inf")}, {"x": "a\ud800"}):
        with pytest.raises(DataError, match=r"out\.jsonl: row 2 holds (NaN or Infinity|a lone surrogate)"):
            write_jsonl([{"x": 1}, bad, {"x": 2}], out)
        assert out.read_text() == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    assert write_jsonl([{"x": "caf\u00e9 \U0001f600"}], out) == 1
    assert json.loads(out.read_text()) == {"x": "caf\u00e9 \U0001f600"}


# --- .json arrays ------------------------------------------------------------------------------

def rows_of_array(tmp_path: Path, text: str) -> list[tuple]:
    path = tmp_path / "rows.json"
    path.write_text(text)
    return [(item.line, type(item).__name__, getattr(item, "message", "")) for item in scan_file(path)]


def test_bad_elements_of_a_json_array_are_rows_with_lines(tmp_path):
    good = '{"input": "q%d", "output": "a"}'
    text = "[\n" + ",\n".join([good % 1, '{"input": "a", "output": NaN}', "[" * DEEP + "]" * DEEP,
                               '{"n": ' + "9" * 5000 + "}", '{"input": "a\\ud800", "output": "b"}', "42",
                               '{"input": "a", "output": {"x": 1e999}}', good % 2]) + "\n]\n"
    items = rows_of_array(tmp_path, text)
    assert [(line, kind) for line, kind, _ in items] == [(2, "Record")] + [(n, "RowProblem") for n in range(3, 9)] + [
        (9, "Record")]
    assert "NaN is not a JSON value" in items[1][2] and "nested more than" in items[2][2]


@pytest.mark.parametrize("text,rows,line,fragment", [
    ('[\n {"text": "a"},\n {"text": "b"},\n]\n', 2, 3, "a comma after the last row"),
    ('[\n {"text": "a"}\n]\n{"text": "b"}\n', 1, 4, "text after the end of the array"),
    ('[\n {"text": "a"}\n] trailing', 1, 3, "text after the end of the array"),
    ('[\n {"text": "a"},\n {"text": "b"}\n', 2, 4, "not closed with ']'"),
    ('{"rows": [{"text": "a"}, {"text": "b"}]}\n,\n', 2, 2, "text after the end of the JSON object"),
    ('[\n {"text": "a"},\n {"text": "b" "c"},\n {"text": "d"}\n]', 2, 3, "not valid JSON (Expecting ','"),
])
def test_a_json_array_with_text_around_it_is_reported_at_its_line(tmp_path, text, rows, line, fragment):
    items = rows_of_array(tmp_path, text)
    assert [kind for _, kind, _ in items].count("Record") == rows
    assert [(n, fragment in m) for n, kind, m in items if kind == "RowProblem"] == [(line, True)]


@pytest.mark.parametrize("text,line", [
    ('[\n {"text": "a"}\n {"text": "b"}\n]\n', 3),        # no comma: where does the next row start?
    ('[\n {"text": "a"},\n {"text": "b"\n', 3),            # cut short inside a row
])
def test_a_json_array_that_cannot_be_split_into_rows_is_one_error_at_its_line(tmp_path, text, line):
    with pytest.raises(DataError, match=rf"rows\.json:{line}: not valid JSON"):
        rows_of_array(tmp_path, text)


def test_json_object_with_a_list_named_in_a_string_elsewhere(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text('{"note": "\\"rows\\": [ is not the list",\n "rows": [\n  {"text": "a"}\n ]}\n')
    assert [(r.response, r.line) for r in scan_file(path)] == [("a", 3)]


# --- CSV ---------------------------------------------------------------------------------------

def test_csv_with_a_repeated_header_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("input,output,input\nq,a,q2\n")
    with pytest.raises(DataError, match=rf"{path}:1: the header names column 'input' more than once"):
        list(scan_file(path))


def test_csv_bytes_that_are_not_utf8_are_reported_on_their_own_line(tmp_path):
    path = tmp_path / "latin.csv"
    rows = [f"question {i},answer {i}" for i in range(2000)]          # far past one read-ahead chunk
    data = ("input,output\n" + "\n".join(rows) + "\n").encode()
    data += b"caf\xe9,x\n" + '"two\nlines",ok\n'.encode() + b"last,row\n"
    path.write_bytes(data)
    items = list(scan_file(path))
    problems = [i for i in items if isinstance(i, RowProblem)]
    assert [(p.line, p.message) for p in problems] == [(2002, "not UTF-8 text; save the file as UTF-8")]
    assert [(r.prompt, r.line) for r in items[-2:]] == [("two\nlines", 2003), ("last", 2005)]


# --- which files -------------------------------------------------------------------------------

def test_a_symlink_loop_is_walked_once(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_bytes(GOOD + b"\n")
    (data / "sub" / "b.jsonl").write_bytes(GOOD + b"\n")
    (data / "sub" / "loop").symlink_to(data)
    (data / "sub" / "again.jsonl").symlink_to(data / "a.jsonl")
    assert [p.name for p in expand_sources([data])] == ["a.jsonl", "b.jsonl"]
    assert [p.name for p in expand_sources([str(data / "**" / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]
    assert len(expand_sources([data, data / "a.jsonl", str(data / "*.jsonl")])) == 2


def test_the_digit_limit_does_not_depend_on_the_interpreter():
    old = sys.get_int_max_str_digits()
    try:
        sys.set_int_max_str_digits(0)  # unlimited: int() alone would read 5,000 digits
        assert "more than 4,300 digits" in decode_json("9" * 5000).message
    finally:
        sys.set_int_max_str_digits(old)


def test_only_the_first_line_may_open_with_a_bom(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\n\xef\xbb\xbf" + GOOD + b"\n")
    items = list(iter_raw_rows(path))
    assert items[0] == (1, {"input": "q", "output": "a"})
    assert items[1][0] == 2 and "opens with a byte order mark" in items[1][1].message


def test_walks_and_globs_follow_the_rules_prepare_follows(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    for path in (data / "a.jsonl", data / "sub" / "b.JSONL", other / "x.jsonl", tmp_path / "around.jsonl"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(GOOD + b"\n")
    for name, target in [("link", other), ("link2", other), ("up", tmp_path)]:
        (data / name).symlink_to(target)   # each real folder once; never a folder around the walk
    expected = [data / "a.jsonl", data / "link" / "x.jsonl", data / "sub" / "b.JSONL"]
    assert expand_sources([data]) == expected
    assert expand_sources([str(tmp_path / "d*")]) == expected   # a glob's folder match is walked
    assert expand_sources([str(data / "**")]) == expected


def test_a_dangling_symlink_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(GOOD + b"\n")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    for entry in [tmp_path, str(tmp_path / "*.jsonl"), str(tmp_path / "**" / "*.jsonl")]:
        with pytest.raises(DataError, match=r"gone\.jsonl: a symlink that leads nowhere .*fledge reads only regular"):
            expand_sources([entry])
    with pytest.raises(DataError, match=r"no such file: .*gone\.jsonl\."):
        expand_sources([tmp_path / "gone.jsonl"])


def test_an_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no data files in .*empty: no \.jsonl, \.json, \.csv files"):
        expand_sources([tmp_path / "empty"])


def test_a_fifo_is_refused_not_read(tmp_path, no_hang):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"rows\.jsonl: not a regular file \(a pipe, socket or device\); fledge "
                                        r"reads only regular files"):
        expand_sources([fifo])
    with pytest.raises(DataError, match="not a regular file"):
        expand_sources([tmp_path])
    with pytest.raises(DataError, match="not a regular file"):
        list(iter_raw_rows(fifo))


def test_outputs_that_are_folders_fifos_inputs_or_each_other_are_refused(tmp_path, no_hang):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD + b"\n")
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "link.jsonl").symlink_to(src)
    with pytest.raises(StorageError, match=r"-o .* is a folder; fledge writes only regular files"):
        refuse_overwrite([("-o", tmp_path)], [src])
    with pytest.raises(StorageError, match=r"-o .*pipe\.jsonl is not a regular file"):
        refuse_overwrite([("-o", tmp_path / "pipe.jsonl")], [src])
    for same in (src, tmp_path / "link.jsonl", tmp_path / "." / "in.jsonl"):
        with pytest.raises(DataError, match=r"is also an input .*never overwrites its inputs"):
            refuse_overwrite([("-o", same)], [src])
    with pytest.raises(DataError, match=r"--train-out and --val-out name the same file"):
        refuse_overwrite([("--train-out", tmp_path / "t.jsonl"), ("--val-out", tmp_path / "sub" / ".." / "t.jsonl")],
                         [])
    refuse_overwrite([("-o", tmp_path / "new.jsonl")], [src])


def test_read_records_under_drop_invalid_keeps_every_good_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [GOOD.replace(b'"q"', f'"q{i}"'.encode()) for i in range(5)]
    lines[2:2] = list(BAD_LINES.values())
    path.write_bytes(b"\n".join(lines) + b"\n")
    problems: list = []
    records = list(read_records([path], drop_invalid=True, problems=problems))
    assert len(records) == 5 and len(problems) == len(BAD_LINES)
    assert [p.line for p in problems] == list(range(3, 3 + len(BAD_LINES)))
