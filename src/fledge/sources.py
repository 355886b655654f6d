"""Which files `data.sources` names (each regular file once, found without following loops),
and how a .jsonl row becomes text. The file finder here serves the data tools too
(fledge.data.sources.expand_sources): one set of rules for every input fledge reads.

    files = resolve_sources(recipe.data)            # [SourceFile(path, name, jsonl, key, root), ...]
    refuse_overlap(files, recipe.prepared_path, "data.prepared_dir")
    for line, text in jsonl_rows(files[0], recipe.data, collections.Counter(), RowReport()): ...
    found, nothing = find_sources(["data/", "extra/**/*.jsonl"], (".jsonl",))   # the shared finder

An entry is a file that exists (any suffix; read as .jsonl rows when it ends in .jsonl, in any
case, else as plain text), a folder (walked for .txt, .md and .jsonl files, in any case) or a
glob (`**` matches any number of folders; a match that is a folder is walked like a folder
named, as the shell's expansion of the glob would be). A file reached twice (named twice, by
two globs, through a symlink) is read once: inputs are deduplicated by their real path. A walk
(a folder, or a glob's `**`) enters a symlinked folder, but each real folder once and never a
link back up to a folder that holds the walk, so links cannot make loops or reach around the
folder named. Only regular files are read: a pipe, socket or device is refused, since reading
one can block forever, and so is a symlink that leads nowhere, where a file would be read.
`refuse_overlap` keeps the prepared folder (which prepare replaces on every run) apart from the
sources.

A .jsonl row is valid when its line is UTF-8 (or data.on_decode_error: replace), strict JSON as
fledge.jsonstrict reads it (no NaN or Infinity, no number past 64-bit float range or 4,300
digits, nesting at most 200 levels, no lone surrogate in any string) and an object whose
data.text_field is a string. Only the first line may open with a byte order mark, and a line of
JSON whitespace alone is no row. Any other row raises DataError with file:line, or with
data.on_bad_row: skip is counted and dropped (RowReport: rows read = written + bad + empty).
"""

from __future__ import annotations

import codecs
import collections
import errno
import fnmatch
import glob
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from fledge import jsonstrict
from fledge.errors import DataError

FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")
KEPT_BAD_ROWS = 1000     # bad rows listed in the manifest (all are counted)
SPACE = jsonstrict.SPACE.encode()  # a line of only these is blank, no row
ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, after surrogateescape


@dataclass
class SourceFile:
    path: Path   # where to read it
    name: str    # as found from the recipe's source entry (shown in messages and the manifest)
    jsonl: bool
    key: str = ""  # the document key of the split: the path below the source entry (a named file: its
                   # file name), so moving or re-rooting the corpus never changes the split
    root: Path | None = None  # the folder whose walk found it; None for a file named or globbed


def resolve_sources(data) -> list[SourceFile]:
    """The files named by `data.sources`, in order, each once."""
    if not data.sources:
        raise DataError("data.sources is empty: list the text files, folders or globs to read, "
                        "e.g. data.sources: [corpus/].")
    found, nothing = find_sources(data.sources, FOLDER_SUFFIXES)
    if nothing:
        raise _names_nothing(nothing[0])
    files = []
    for entry, path, root in found:
        suffix = path.suffix.lower()
        if root is None and suffix == ".json":
            raise DataError("a JSON file; prepare reads .txt, .md and .jsonl (one JSON object per line). "
                            "Convert it to .jsonl.", path.as_posix())
        files.append(SourceFile(path, path.as_posix(), suffix == ".jsonl", _split_key(entry, path), root))
    return files


def refuse_overlap(files: list[SourceFile], prepared: Path, origin: str) -> None:
    """Raise unless the prepared folder and the sources are apart.

    Prepare replaces train/, val/, the tokenizer and the manifest in its folder on every run,
    so no source may lie inside it, and it may not lie inside a folder that is read (the next
    run would read its own output). `origin` says where the folder comes from, for the message.
    """
    out = Path(os.path.realpath(prepared))
    fix = f"Set data.prepared_dir to a folder outside the sources (the prepared folder {prepared} is {origin})."
    for src in files:
        real = Path(os.path.realpath(src.path))
        if real == out or out in real.parents:
            raise DataError(f"this source lies inside the prepared folder {prepared}, where prepare writes "
                            f"train/, val/, the tokenizer and manifest.json and replaces them on every run. "
                            + fix, src.name)
    for root in dict.fromkeys(src.root for src in files if src.root is not None):
        real = Path(os.path.realpath(root))
        if real == out or real in out.parents:
            raise DataError(f"the prepared folder {prepared} lies inside this source folder, so prepare would "
                            f"write into the corpus and read its own output next time. " + fix,
                            root.as_posix())


def _names_nothing(entry: str) -> DataError:
    path = Path(entry)
    if path.is_dir():
        return DataError(f"the folder holds no {', '.join(FOLDER_SUFFIXES)} files. {_nearby(path)} "
                         f"Name other files explicitly or with a glob (e.g. {entry.rstrip('/')}/*.limn).", entry)
    if glob.has_magic(entry):
        return DataError(f"the glob matches no files. {_nearby(path.parent)} Fix data.sources.", entry)
    return DataError(f"no such file or folder. {_nearby(path.parent)} Fix data.sources.", entry)


def _split_key(entry: str, path: Path) -> str:
    """`path` relative to the fixed (non-glob) folder of its source entry; a file named directly: its name."""
    fixed = _fixed_folder(entry)
    if fixed == path or not fixed.is_dir():
        return path.name
    try:
        return path.relative_to(fixed).as_posix()
    except ValueError:
        return path.name


def _nearby(folder: Path) -> str:
    """What the nearest existing folder holds, for error messages."""
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return ""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f" and {len(names) - 12} more" if len(names) > 12 else ""
    return f"{folder.as_posix() or '.'}/ holds: {', '.join(names[:12]) or 'nothing'}{more}."


# --- finding files (prepare's sources and the data tools' inputs) ----------------------------

class Found(NamedTuple):
    entry: str          # the source entry that named it
    path: Path
    root: Path | None   # the folder whose walk found it; None for a file named or matched by a glob


def find_sources(entries: Iterable[str | Path], suffixes: tuple[str, ...]) -> tuple[list[Found], list[str]]:
    """Every file the entries name, in order, each real file once; and the entries that name
    nothing (no such path, a folder without `suffixes` files, a glob without matches), for the
    caller to report in its own terms. Raises DataError for what is there but not a regular file."""
    found, nothing, seen = [], [], set()
    for entry in map(str, entries):
        matches = _expand(entry, suffixes)
        if not matches:
            nothing.append(entry)
        for path, root in matches:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(Found(entry, path, root))
    return found, nothing


def file_kind(path: Path) -> str:
    """'file', 'dir', 'special' (pipe, socket, device) or 'missing' (also a symlink that leads
    nowhere). _tree also says 'loop' for a link to a folder that holds the walk."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            return "missing"
        raise DataError(f"cannot read it ({e.strerror or e}). Check that it is readable.", str(path)) from None
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "special"


def not_regular(path: Path, kind: str = "special") -> DataError:
    """The one line refusing something that is there but is not a regular file to read."""
    if kind == "missing":
        return DataError("a symlink that leads nowhere (its target is missing, or the links loop); fledge reads "
                         "only regular files. Fix the link or remove it.", path.as_posix())
    return DataError("not a regular file (a pipe, socket or device); fledge reads only regular files, since reading "
                     "a pipe can wait forever. Write the data to a file and name that file instead.", path.as_posix())


def _expand(entry: str, suffixes: tuple[str, ...]) -> list[tuple[Path, Path | None]]:
    """(path, folder walked or None) of each file one entry names: a path that exists is taken as
    it is, even with wildcard characters in its name; otherwise a glob's matches."""
    path = Path(entry)
    kind = file_kind(path)
    if kind == "file":
        return [(path, None)]
    if kind == "special":
        raise not_regular(path)
    if kind == "dir":
        return [(f, path) for f in _walk(path, suffixes, set())]
    if not glob.has_magic(entry):
        return []
    matches = _glob(entry)
    found: list[tuple[Path, Path | None]] = []
    for match in matches:
        kind = file_kind(match)
        if kind == "file":
            found.append((match, None))
        elif kind != "dir":
            raise not_regular(match, kind)  # glob lists a dangling link too
    seen: set[str] = set()  # real folders walked for this entry: `c/**` matches c, c/sub, ...
    base = os.path.join(os.path.realpath(_fixed_folder(entry)), "")
    for match in sorted(matches, key=Path.is_symlink):  # a folder reached directly wins over a link to it
        loop = match.is_symlink() and base.startswith(os.path.join(os.path.realpath(match), ""))
        if file_kind(match) == "dir" and not loop:  # (`c/*` matching c/up -> .. would read around c)
            found += [(f, match) for f in _walk(match, suffixes, seen)]
    return found


def _walk(folder: Path, suffixes: tuple[str, ...], seen: set[str]) -> list[Path]:
    """The files below `folder` whose suffix (in any case) is one of `suffixes`, sorted; real
    folders in `seen` are not entered."""
    found = []
    for path, kind in _tree(folder, hidden=True, seen=seen):
        if path.suffix.lower() not in suffixes or kind in ("dir", "loop"):
            continue
        if kind != "file":
            raise not_regular(path, kind)
        found.append(path)
    return sorted(found)


def _tree(folder: Path, hidden: bool, seen: set[str] | None = None) -> list[tuple[Path, str]]:
    """(path, kind) of everything below `folder`, entering each real folder once (symlinked
    folders after the real ones, so a folder reached both ways is named by its own path) and
    never a link to a folder that holds `folder` (a loop: it would read what lies around it).
    hidden=False does not enter folders whose name starts with a dot."""
    seen = set() if seen is None else seen
    root = os.path.join(os.path.realpath(folder), "")
    out: list[tuple[Path, str]] = []
    folders, linked = [folder], []
    while folders or linked:
        current = folders.pop() if folders else linked.pop(0)
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list this folder ({e.strerror or e}). Check that it is readable.",
                            str(current)) from None
        for entry in entries:
            path = current / entry.name
            kind = file_kind(path) if entry.is_symlink() else \
                "dir" if entry.is_dir() else "file" if entry.is_file() else "special"
            if kind == "dir" and entry.is_symlink() and root.startswith(os.path.join(os.path.realpath(path), "")):
                kind = "loop"  # a link to `folder` or a folder around it: listed, never entered or matched
            out.append((path, kind))
            if kind == "dir" and (hidden or not entry.name.startswith(".")):
                (linked if entry.is_symlink() else folders).append(path)
    return out


def _glob(entry: str) -> list[Path]:
    """Sorted matches of a glob. Without `**` that is glob.glob's answer (its depth is bounded);
    with `**`, a walk of the folder before the first wildcard that enters each real folder once
    (glob.glob follows links without end: a link to an ancestor made it list one file 41 times,
    two such links 2^40 times). Hidden names match only a pattern part that starts with a dot."""
    parts = Path(entry).parts
    if "**" not in parts:
        return [Path(m) for m in sorted(glob.glob(entry))]
    base = _fixed_folder(entry)
    pattern = parts[len(base.parts):]
    if file_kind(base) != "dir":
        return []
    matches = [base] if _match(pattern, ()) else []
    for path, kind in _tree(base, hidden=False):
        if kind != "loop" and _match(pattern, path.relative_to(base).parts):
            matches.append(path)
    return sorted(matches, key=str)  # as glob.glob's answer was sorted


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether the path `parts` matches the glob `pattern` (`**`: zero or more non-hidden folders)."""
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        return _match(pattern[1:], parts) or (bool(parts) and not parts[0].startswith(".")
                                              and _match(pattern, parts[1:]))
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatch(parts[0], head) and _match(pattern[1:], parts[1:])


def _fixed_folder(entry: str) -> Path:
    """The part of a source entry before its first wildcard (the whole entry if it has none)."""
    parts = Path(entry).parts
    return Path(*parts[:next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))] or ".")


# --- reading .jsonl rows ---------------------------------------------------------------------

class RowReport:
    """Counts of .jsonl rows (read = written + bad + empty) and the first bad ones with their problem."""

    def __init__(self):
        self.read = self.written = self.bad = self.empty = 0
        self.bad_rows: list[dict] = []  # {"row": "file:line", "problem": ...}, at most KEPT_BAD_ROWS

    def drop(self, name: str, line: int, problem: str) -> None:
        self.bad += 1
        if len(self.bad_rows) < KEPT_BAD_ROWS:
            self.bad_rows.append({"row": f"{name}:{line}", "problem": problem})

    def as_dict(self) -> dict:
        return {"read": self.read, "written": self.written, "bad": self.bad, "empty": self.empty,
                "bad_rows": self.bad_rows}


class _BadRow(Exception):
    """A .jsonl row that is not a valid record; the message says why and how to fix it."""


def jsonl_rows(src: SourceFile, data, replaced: collections.Counter, rows: RowReport) -> Iterator[tuple[int, str]]:
    """(line number, text) of each valid row with text. A bad row raises DataError (file:line), or
    with data.on_bad_row: skip is counted in `rows` and dropped; blank lines are not rows."""
    offset = 0
    with open(src.path, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[3:], start + 3
            if not raw.strip(SPACE):
                continue
            rows.read += 1
            try:
                text = _row_text(raw, start, src.name, data, replaced)
            except _BadRow as e:
                if data.on_bad_row != "skip":
                    raise DataError(f"{e} To drop bad rows instead, set data.on_bad_row: skip.", src.name,
                                    line=number) from None
                rows.drop(src.name, number, str(e))
                continue
            if not text:
                rows.empty += 1
                continue
            rows.written += 1
            yield number, text


def _row_text(raw: bytes, start: int, name: str, data, replaced: collections.Counter) -> str:
    """The text field of one .jsonl line (bytes at file offset `start`); raises _BadRow."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if data.on_decode_error != "replace":
            raise _BadRow(f"byte 0x{raw[e.start]:02x} at byte offset {start + e.start} is not UTF-8. Convert the "
                          f"file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or set data.on_decode_error: "
                          f"replace.") from None
        line, count = ESCAPED.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
        replaced[name] += count
    try:
        record = jsonstrict.loads(line.rstrip("\r\n"))  # rstrip: so columns count within this line
    except jsonstrict.NotJson as e:
        raise _BadRow(f"{e}. Fix or remove the line.") from None
    field = data.text_field
    if not isinstance(record, dict):
        raise _BadRow(f"a JSON {_json_type(record)}, not an object with a {field!r} field. Convert the file to "
                      f"one object per line.")
    if field not in record:
        raise _BadRow(f"{field!r} is missing; this record has {', '.join(map(repr, record)) or 'no fields'}. "
                      f"Set data.text_field to the field that holds the text, or fix the record.")
    text = record[field]
    if not isinstance(text, str):
        raise _BadRow(f"{field!r} is a JSON {_json_type(text)}, not a string. Point data.text_field at a text "
                      f"field.")
    return text


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
