"""Finding data files and reading their rows without trusting them: .jsonl, .json, .csv, .parquet.

    paths = expand_sources(["data/", "extra/*.jsonl"])    # files, deduplicated by real path
    refuse_overwrite([("output", "merged.jsonl")], paths)  # before any work is done
    for line, row in iter_raw_rows(paths[0]):
        if isinstance(row, Invalid): print(f"{paths[0]}:{line}: {row.message}")

A row is read as JSON the strict way, by fledge.jsonstrict (the decoder prepare uses too): NaN
and Infinity are not JSON, a number too large for a float or with more than 4,300 digits is an
invalid row, and so are rows nested more than MAX_DEPTH (200) levels and strings holding a lone
surrogate escape ("\\ud800", which no UTF-8 file can store). Each such row becomes an `Invalid`
at its file:line like any other bad row, so `--drop-invalid` drops it and the rest of the file
is still read.

A .parquet file (read with pyarrow, in batches of rows) numbers its rows from 1 as its "lines".
Its values must be what a JSON row can hold too: a NaN or infinite number (pandas' missing
value) or a value JSON has no type for (bytes, a timestamp, a decimal) makes the row an
`Invalid` naming the column; cast such columns to strings or drop them.

Lines count on "\\n" only (a JSONL file is split on it; CSV lines are decoded one by one, so
a decoding error names its own line); only a file's first line may open with a byte order mark.

Files are found by fledge.sources' finder, the one prepare uses: a path that exists is taken as
it is, a folder is walked for the data files (suffixes in any case), a glob's `**` crosses
folders, and a glob match that is a folder is walked like a folder named. A walk enters a
symlinked folder, but each real folder once and never a link back up to a folder that holds
the walk, so links cannot make loops or reach around the folder named. Each real file is read
once. Only regular files are read: a FIFO or device named as input, or met in a walk, is
refused instead of blocking, and so is a symlink that leads nowhere.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from fledge.errors import DataError, DependencyError
from fledge.jsonstrict import SPACE, NotJson, decode_at, loads, value_end
from fledge.sources import file_kind, find_sources, not_regular

SUFFIXES = (".jsonl", ".json", ".csv")   # what folder walks of the data tools pick up
ROW_SUFFIXES = (*SUFFIXES, ".parquet")   # fine-tuning rows (data.rows) also read Parquet found in folders
PARQUET_BATCH = 1024   # rows converted to Python at a time


@dataclass(frozen=True)
class Invalid:
    """A row that could not be read; `message` says why (file and line are kept by the reader)."""

    message: str


def decode_json(text: str) -> Any:
    """One JSON value from `text`, or an Invalid saying why no tool may use it. Never raises."""
    try:
        return loads(text)
    except NotJson as e:
        return Invalid(str(e))


# --- reading files ---------------------------------------------------------------------------

def iter_raw_rows(path: str | Path, list_key: str = "") -> Iterator[tuple[int | None, Any]]:
    """(line, row) for every row of a .jsonl, .json, .csv or .parquet file; row is an `Invalid` when
    unreadable.

    Lines count from 1 (Parquet: row numbers). A JSON row spanning lines gets the line where it
    starts. Raises DataError when the file as a whole cannot be read (not a regular file; a .json
    file whose rows cannot be told apart; a CSV header that is not usable; not a Parquet file), and
    DependencyError for a .parquet file without pyarrow installed.
    """
    p = Path(path)
    _require_regular(p)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        rows = _iter_csv(p)
    elif suffix == ".json":
        rows = _iter_json_array(p, list_key)
    elif suffix == ".parquet":
        rows = _iter_parquet(p)
    else:
        rows = _iter_jsonl(p)
    try:
        yield from rows
    except OSError as e:   # permission, a file removed or a disk failing while being read
        raise DataError(f"cannot read it ({e.strerror or e}).", path=str(p)) from None


def _require_regular(p: Path) -> None:
    """DataError unless `p` is a regular file (opening a FIFO would wait for a writer)."""
    kind = file_kind(p)
    if kind == "missing":
        raise DataError("no such file. Pass .jsonl, .json, .csv or .parquet files (or folders holding them).",
                        path=str(p))
    if kind == "dir":
        raise DataError("a folder; fledge reads only regular files. Name the data files, or remove this one from "
                        "the inputs.", path=str(p))
    if kind != "file":
        raise not_regular(p)


def _iter_jsonl(p: Path) -> Iterator[tuple[int, Any]]:
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):   # binary lines end at b"\n" only
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, Invalid(f"not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8")
                continue
            text = (text.removeprefix("\ufeff") if number == 1 else text).rstrip("\r\n")
            if not text.strip(SPACE):
                continue
            yield number, decode_json(text)


class _LineCounter:
    """Line number of a position in a text; positions usually grow, so counting is incremental."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in SPACE:
        pos += 1
    return pos


def _snippet(text: str, pos: int) -> str:
    return repr(text[pos:pos + 30] + ("..." if len(text) > pos + 30 else ""))


def _iter_json_array(p: Path, list_key: str) -> Iterator[tuple[int | None, Any]]:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start}); save the file as UTF-8.", path=str(p),
                        line=data.count(b"\n", 0, e.start) + 1) from None
    text = text.removeprefix("\ufeff")
    lines = _LineCounter(text)
    start = _skip_ws(text, 0)
    after: tuple[int, Invalid] | None = None
    wrapped = text[start:start + 1] == "{"
    if wrapped:  # an object holding the array
        start, after = _find_row_list(text, start, list_key, p, lines)
    elif text[start:start + 1] != "[":
        raise DataError("a .json data file holds an array of rows ([{...}, {...}]); for one row per "
                        "line name the file .jsonl.", path=str(p), line=lines.at(start))
    yield from _array_rows(text, start, p, lines, top_level=not wrapped)
    if after is not None:
        yield after


def _array_rows(text: str, start: int, p: Path, lines: _LineCounter, top_level: bool) -> Iterator[tuple[int, Any]]:
    """The elements of the array opening at text[start]; problems with the array itself (a comma
    after the last row, text after the array, a missing ']') come as Invalid rows at their line."""
    pos = _skip_ws(text, start + 1)
    if text[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            line = lines.at(pos)
            try:
                value, end = decode_at(text, pos)
            except NotJson as e:
                end = value_end(text, pos)   # step past the bad row to the next one
                if end is None:
                    raise DataError(f"not valid JSON at {_snippet(text, pos)}; the rows after it cannot be told "
                                    f"apart. Fix the file.", path=str(p), line=line) from None
                value = Invalid(str(e))
            yield line, value
            pos = _skip_ws(text, end)
            c = text[pos:pos + 1]
            if c == "]":
                pos += 1
                break
            if c == "":
                yield lines.at(pos), Invalid("the array is not closed with ']'; the file may be cut short")
                return
            if c != ",":
                raise DataError(f"not valid JSON: expected ',' or ']' after the row that starts on line {line}, "
                                f"found {_snippet(text, pos)}. Fix the file.", path=str(p), line=lines.at(pos))
            comma = pos
            pos = _skip_ws(text, pos + 1)
            if text[pos:pos + 1] in ("]", ""):
                yield lines.at(comma), Invalid("a comma after the last row, which JSON does not allow; remove it")
                if text[pos:pos + 1] == "]":
                    pos += 1
                break
    rest = _skip_ws(text, pos)
    if top_level and rest < len(text):
        yield lines.at(rest), Invalid(f"text after the end of the array ({_snippet(text, rest)}); a .json file "
                                      f"holds one array of rows. Remove it, or name the file .jsonl for one "
                                      f"row per line")


def _find_row_list(text: str, start: int, list_key: str, p: Path,
                   lines: _LineCounter) -> tuple[int, tuple[int, Invalid] | None]:
    """(position of the '[' of the rows, a problem after the object or None) of a JSON object
    that holds the rows in one of its fields: `list_key`, or its only array field."""
    members: dict[str, int] = {}
    pos = _skip_ws(text, start + 1)
    closed = text[pos:pos + 1] == "}"
    while not closed:
        key_end = value_end(text, pos) if text[pos:pos + 1] == '"' else None
        if key_end is None:
            raise DataError(f"not valid JSON: expected a field name at {_snippet(text, pos)}. Fix the file.",
                            path=str(p), line=lines.at(pos))
        key = decode_json(text[pos:key_end])
        colon = _skip_ws(text, key_end)
        value = _skip_ws(text, colon + 1)
        end = value_end(text, value) if text[colon:colon + 1] == ":" else None
        if isinstance(key, Invalid) or end is None:
            raise DataError(f"not valid JSON near {_snippet(text, pos)}. Fix the file.", path=str(p),
                            line=lines.at(pos))
        if text[value] == "[":
            members.setdefault(key, value)
        pos = _skip_ws(text, end)
        if text[pos:pos + 1] not in (",", "}"):
            raise DataError(f"not valid JSON: expected ',' or '}}' at {_snippet(text, pos)}. Fix the file.",
                            path=str(p), line=lines.at(pos))
        closed = text[pos] == "}"
        pos = pos if closed else _skip_ws(text, pos + 1)
    pos += 1
    key = list_key or (next(iter(members)) if len(members) == 1 else "")
    if key not in members:
        raise DataError(f"a JSON object with {'no' if not members else 'several'} list fields "
                        f"({', '.join(members) or 'none'}); name the one holding the rows (list_key).",
                        path=str(p))
    rest = _skip_ws(text, pos)
    after = None
    if rest < len(text):
        after = (lines.at(rest), Invalid(f"text after the end of the JSON object ({_snippet(text, rest)}); "
                                         f"remove it"))
    return members[key], after


def _iter_csv(p: Path) -> Iterator[tuple[int, Any]]:
    counted = 0              # physical lines handed to the csv reader so far
    undecodable: list[int] = []

    def decoded_lines(f) -> Iterator[str]:
        nonlocal counted
        for raw in f:         # one line at a time, so a decoding error is on its own line
            counted += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", "surrogateescape")
                undecodable.append(counted)
            yield text.removeprefix("\ufeff") if counted == 1 else text

    with open(p, "rb") as f:
        reader = csv.reader(decoded_lines(f))
        try:
            header = next(reader, None)
            if header is None:
                return
            if undecodable:
                raise DataError("the header is not UTF-8 text; save the file as UTF-8.", path=str(p), line=1)
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise DataError(f"the header names column{'s' if len(repeated) > 1 else ''} "
                                f"{', '.join(map(repr, repeated))} more than once, so one value per row would be "
                                f"lost. Give every column its own name.", path=str(p), line=1)
            start = counted + 1
            for values in reader:
                line, start = start, counted + 1
                if undecodable and undecodable[-1] >= line:
                    yield line, Invalid("not UTF-8 text; save the file as UTF-8")
                    continue
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    yield line, Invalid(f"{len(values)} columns where the header has {len(header)} "
                                        f"({', '.join(header)})")
                    continue
                yield line, dict(zip(header, values))
        except csv.Error as e:
            raise DataError(f"not valid CSV ({e}). Fix the file.", path=str(p), line=counted) from None


def _iter_parquet(p: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DependencyError(f"{p}: reading .parquet files needs pyarrow. Install it: pip install pyarrow") from None
    try:
        handle = pq.ParquetFile(p)
    except (pyarrow.ArrowException, ValueError) as e:
        raise DataError(f"not a readable Parquet file ({_first_line(e)}). Check the file, or convert it to .jsonl.",
                        path=str(p)) from None
    number = 0
    try:
        for batch in handle.iter_batches(batch_size=PARQUET_BATCH):
            for row in batch.to_pylist(maps_as_pydicts="lossy"):
                number += 1
                yield number, _parquet_row(row)
    except pyarrow.ArrowException as e:
        raise DataError(f"cannot read the rows after row {number:,} ({_first_line(e)}). Check the file.",
                        path=str(p)) from None
    finally:
        handle.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _parquet_row(row: dict) -> Any:
    """The row, or an Invalid naming the first column holding a value a JSON row cannot hold."""
    for column, value in row.items():
        stack = [value]
        while stack:
            node = stack.pop()
            if node is None or isinstance(node, (str, bool, int)):
                continue
            if isinstance(node, float):
                if not math.isfinite(node):
                    return Invalid(f"column {column!r} holds {node} (pandas writes NaN for a missing number), which a "
                                   f"row cannot hold: JSON has no NaN or Infinity. Fill the column or drop it")
            elif isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            else:
                return Invalid(f"column {column!r} holds a {type(node).__name__} value, which a row cannot hold (rows "
                               f"are JSON: text, numbers, lists, objects). Cast the column to a string or drop it")
    return row


# --- which files -----------------------------------------------------------------------------

def expand_sources(sources: Iterable[str | Path], suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """Files, folders (their data files, sorted) and globs -> the list of files, in order.

    A file reached twice (named twice, through a symlink, or by a glob and a folder) is read once.
    Folders are walked without loops (see the module docstring). Raises DataError for sources that
    do not exist, folders and globs without data files, and anything that is not a regular file.
    """
    found, nothing = find_sources(sources, suffixes)
    missing = [entry for entry in nothing if not Path(entry).is_dir()]
    empty = [entry for entry in nothing if Path(entry).is_dir()]
    if missing:
        near = sorted({str(f) for m in missing if Path(m).parent.is_dir() for f in Path(m).parent.iterdir()
                       if f.suffix.lower() in suffixes})[:8]
        hint = f" Data files next to it: {', '.join(near)}." if near else ""
        kinds = ", ".join(suffixes[:-1]) + " or " + suffixes[-1]
        raise DataError(f"no such file: {', '.join(missing)}.{hint} Pass {kinds} files (or folders holding them).")
    if empty:
        raise DataError(f"no data files in {', '.join(empty)}: no {', '.join(suffixes)} files there or in its "
                        f"subfolders. Put the data files there or name them.")
    return [f.path for f in found]


def _identity(path: str | Path) -> tuple[str, tuple[int, int] | None]:
    """(real path, (device, inode) when it exists): two paths with either equal are one file."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def refuse_overwrite(outputs: list[tuple[str, str | Path]], inputs: Iterable[str | Path]) -> None:
    """Refuse, before any work, outputs that are not regular files, name an input, or name each
    other. `outputs` are (what, path) pairs such as ("-o", "merged.jsonl")."""
    from fledge.files import refuse_special
    named = []
    for what, out in outputs:
        refuse_special(out, what)
        me = _identity(out)
        for other_what, other, it in named:
            if _same(me, it):
                raise DataError(f"{other_what} and {what} name the same file ({out}); name two different files.")
        named.append((what, out, me))
    for inp in inputs:
        it = _identity(inp)
        for what, out, me in named:
            if _same(me, it):
                raise DataError(f"{what} {out} is also an input ({inp}); fledge never overwrites its inputs. "
                                f"Write to another file.")
