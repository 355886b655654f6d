"""Training rows from JSONL, JSON and CSV files, in one normalized view.

    for item in scan_file("train.jsonl"):
        if isinstance(item, RowProblem): print(item)          # train.jsonl:418: ...
        else: item.prompt, item.response, item.metadata, item.source, item.line

Each row's format is detected on its own, so one file may mix them:

    {"input", "output"[, "metadata"]}                    io
    {"instruction", "input", "output"}                   alpaca (input may be empty or absent)
    {"messages": [{"role", "content"}, ...]}             chat
    [{"role", "content"}, ...]                           chat (a bare array of messages per line)
    {"prompt", "completion"}                             prompt_completion
    {"input_text" | "input_code", "output_dot"}          io (other field names)
    {"text"}                                             text (plain completion)

A chat row's prompt is its turns before the last assistant message as "role: content" lines;
its response is that last assistant message. An alpaca row's prompt is the instruction, a blank
line and the input (when there is one).

`FieldMap(input_field=..., output_field=...)` names other fields (a CSV with `question,cypher`
columns). Files: `.jsonl` (one row per line), `.json` (an array of rows, or an object holding
one such array), `.csv` (a header line, then rows; quoted fields may span lines). Every row
keeps its file and line so problems can point at it; files are read one at a time, by
`fledge.data.sources` (which rows are unreadable and why, which files are read at all).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from fledge.data.sources import SURROGATE_CHAR, Invalid, expand_sources, iter_raw_rows
from fledge.errors import DataError
from fledge.files import atomic_open

ROLES = ("system", "user", "assistant", "tool", "function")
# (input field, output field, format name), tried in order after the explicit formats.
PAIR_FIELDS = (
    ("input", "output", "io"),
    ("prompt", "completion", "prompt_completion"),
    ("input_text", "output_dot", "io"),
    ("input_code", "output_dot", "io"),
)
KNOWN_SHAPES = ('{"input","output"}, {"instruction","input","output"}, {"messages":[...]}, '
                'a bare [messages] array, {"prompt","completion"}, {"input_text"|"input_code","output_dot"}, '
                '{"text"}')


@dataclass(frozen=True)
class FieldMap:
    """Field names that override format detection (both empty: detect per row)."""

    input_field: str = ""
    output_field: str = ""

    @property
    def active(self) -> bool:
        return bool(self.input_field or self.output_field)


@dataclass
class Record:
    """One training row: the text a model reads, the text it learns to write, where it came from."""

    prompt: str
    response: str
    metadata: dict
    source: str
    line: int | None
    format: str
    row: Any = field(repr=False, default=None)  # the row as read, for writing it back unchanged

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    @property
    def text(self) -> str:
        """Prompt and response together: what duplicate and leakage checks compare."""
        return f"{self.prompt}\x1f{self.response}" if self.prompt else self.response

    @property
    def repeats_input(self) -> bool:
        """The output is the input again: the last user turn (chat), the input or else the instruction
        (alpaca), the prompt (other pairs). Never for plain text rows."""
        target = self.response.strip()
        if self.format == "chat":
            users = [m["content"] for m in _messages_of(self.row) or [] if m.get("role") == "user"]
            return bool(users) and users[-1].strip() == target
        if self.format == "alpaca":
            source = self.row.get("input") or self.row.get("instruction") or ""
            return source.strip() == target
        return bool(self.prompt.strip()) and self.prompt.strip() == target

    def get(self, path: str) -> Any:
        """A field by dotted path (`metadata.type`), `@file` for the source file; None if absent.

        The row as read is searched first, then the metadata (so `type` finds `metadata.type`),
        then the normalized `prompt`/`input` and `response`/`output`.
        """
        if path == "@file":
            return self.source
        for root in (self.row, self.metadata):
            value = _lookup(root, path)
            if value is not None:
                return value
        if path in ("prompt", "input"):
            return self.prompt
        if path in ("response", "output", "completion"):
            return self.response
        return None

    def to_format(self, fmt: str) -> Any:
        """The row rewritten as `keep` (unchanged), io, alpaca, chat, prompt_completion or text."""
        if fmt == "keep":
            return self.row
        if fmt == "io":
            out: dict = {"input": self.prompt, "output": self.response}
        elif fmt == "alpaca":
            out = {"instruction": self.prompt, "input": "", "output": self.response}
        elif fmt == "prompt_completion":
            out = {"prompt": self.prompt, "completion": self.response}
        elif fmt == "text":
            out = {"text": f"{self.prompt}\n{self.response}" if self.prompt else self.response}
        elif fmt == "chat":
            messages = _messages_of(self.row)
            if messages is None:
                messages = ([{"role": "user", "content": self.prompt}] if self.prompt else []) + [
                    {"role": "assistant", "content": self.response}]
            out = {"messages": messages}
        else:
            raise ValueError(f"unknown output format {fmt!r}")
        if self.metadata:
            out["metadata"] = self.metadata
        return out


OUTPUT_FORMATS = ("keep", "io", "alpaca", "chat", "prompt_completion", "text")


@dataclass(frozen=True)
class RowProblem:
    """A row that cannot be used, with its place."""

    source: str
    line: int | None
    message: str

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"

    def error(self, hint: str = "") -> DataError:
        return DataError(self.message + hint, path=self.source, line=self.line)


class RowError(ValueError):
    """Raised by `normalize_row` for a row that fits no format; the message names the fix."""


# --- normalizing rows ------------------------------------------------------------------------

def normalize_row(row: Any, fields: FieldMap = FieldMap()) -> tuple[str, str, dict, str]:
    """(prompt, response, metadata, format name) of one row; RowError says why it fits no format."""
    if isinstance(row, list):
        prompt, response = _from_messages(row, "the message array")
        return prompt, response, {}, "chat"
    if not isinstance(row, dict):
        raise RowError(f"a row is a JSON object or an array of messages, not {_kind(row)}")
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise RowError(f'"metadata" must be an object, got {_kind(metadata)}')
    if fields.active and (fields.input_field in row or fields.output_field in row):
        i, o = fields.input_field or "input", fields.output_field or "output"
        return _text(row, i, o), _text(row, o, i, required=True), metadata, "mapped"
    if "messages" in row:
        prompt, response = _from_messages(row["messages"], '"messages"')
        return prompt, response, metadata, "chat"
    if "instruction" in row:
        instruction = _text(row, "instruction", "output")
        extra = _text(row, "input", "output", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return prompt, _text(row, "output", "instruction", required=True), metadata, "alpaca"
    for i, o, name in PAIR_FIELDS:
        if i in row and o in row:
            return _text(row, i, o), _text(row, o, i, required=True), metadata, name
    for i, o, name in PAIR_FIELDS:
        if i in row or o in row:
            have, need = (i, o) if i in row else (o, i)
            raise RowError(f'"{need}" is missing; a row with "{have}" needs "{i}" and "{o}"')
    if "text" in row:
        return "", _text(row, "text", "", required=True), metadata, "text"
    keys = [k for k in row if k != "metadata"]
    strings = [k for k in keys if isinstance(row[k], str)]
    hint = (f" Map your fields with --input-field {strings[0]} --output-field {strings[1]}."
            if len(strings) >= 2 else " Map your fields with --input-field and --output-field.")
    raise RowError(f"row fits no known format (fields: {', '.join(map(str, keys)) or 'none'}). "
                   f"Known: {KNOWN_SHAPES}.{hint}")


def _text(row: dict, key: str, partner: str, required: bool = True) -> str:
    if key not in row:
        if not required:
            return ""
        raise RowError(f'"{key}" is missing; every row of this kind needs "{key}"'
                       + (f' and "{partner}"' if partner else ""))
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RowError(f'"{key}" must be a string, got {_kind(value)}')
    return value


def _from_messages(messages: Any, what: str) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{what} must be a non-empty list of {{\"role\", \"content\"}} objects")
    lines = []
    last_assistant = -1
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f'message {n} of {what} needs "role" and "content"')
        if m["role"] not in ROLES:
            raise RowError(f"message {n} of {what} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f'message {n} of {what}: "content" must be a string, got {_kind(m["content"])}')
        if m["role"] == "assistant":
            last_assistant = n - 1
        lines.append(f"{m['role']}: {m['content']}")
    if last_assistant < 0:
        raise RowError(f"{what} has no assistant message, so there is nothing to learn")
    if last_assistant != len(messages) - 1:
        raise RowError(f"{what} ends with a {messages[-1]['role']!r} message after the last assistant "
                       f"message; end each conversation with the assistant's reply")
    return "\n".join(lines[:last_assistant]), messages[last_assistant]["content"]


def _messages_of(row: Any) -> list | None:
    if isinstance(row, list):
        return row
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _lookup(root: Any, path: str) -> Any:
    node = root
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def non_finite_problems(options: Any, prefix: str = "") -> list[str]:
    """'key is nan; ...' for every number of an options dataclass (nested ones too) that is NaN or
    infinite: every range check passes NaN (all comparisons with it are false)."""
    out = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(non_finite_problems(value, f"{prefix}{f.name}."))
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{prefix}{f.name} is {value}; it must be a finite number")
    return out


def refuse_non_finite(options: Any, what: str) -> None:
    """RecipeError naming every NaN or infinite number of `options` (options built in code)."""
    from fledge.recipe import raise_problems
    raise_problems(what, non_finite_problems(options))


def scan_file(path: str | Path, fields: FieldMap = FieldMap(), list_key: str = "",
              require_response: bool = True) -> Iterator[Record | RowProblem]:
    """Every row of one file as a Record, or a RowProblem naming file:line and the fix."""
    source = str(path)
    for line, row in iter_raw_rows(path, list_key):
        if isinstance(row, Invalid):
            yield RowProblem(source, line, row.message)
            continue
        try:
            prompt, response, metadata, fmt = normalize_row(row, fields)
        except RowError as e:
            yield RowProblem(source, line, str(e))
            continue
        if require_response and not response.strip():
            yield RowProblem(source, line, "the output is empty, so there is nothing to learn")
            continue
        yield Record(prompt, response, metadata, source, line, fmt, row)


def read_records(sources: Iterable[str | Path], fields: FieldMap = FieldMap(),
                 drop_invalid: bool = False, problems: list[RowProblem] | None = None) -> Iterator[Record]:
    """Records of every file in turn. A bad row raises DataError unless `drop_invalid` (then it is
    appended to `problems`, when given, and skipped)."""
    for path in expand_sources(sources):
        for item in scan_file(path, fields):
            if isinstance(item, RowProblem):
                if not drop_invalid:
                    raise item.error(". Fix the row or rerun with --drop-invalid.")
                if problems is not None:
                    problems.append(item)
                continue
            yield item


def write_jsonl(rows: Iterable[Any], path: str | Path) -> int:
    """Write rows as JSON lines (UTF-8, not escaped), atomically; returns how many.

    A row JSON cannot hold (NaN or Infinity, a lone surrogate) raises DataError and leaves any
    earlier file at `path` as it was."""
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(dump_row(row, path, n + 1))
            n += 1
    return n


def dump_row(row: Any, path: str | Path, number: int) -> str:
    """One JSONL line of `row` (the `number`th written to `path`), or DataError saying why not."""
    try:
        line = json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as e:   # NaN or Infinity, or a circular reference
        problem = "holds NaN or Infinity, which JSON cannot store" if "JSON compliant" in str(e) else str(e)
    except (TypeError, RecursionError) as e:
        problem = f"cannot be written as JSON ({type(e).__name__}: {e})"
    else:
        if not SURROGATE_CHAR.search(line):
            return line
        problem = "holds a lone surrogate (\\ud800-\\udfff), which UTF-8 cannot store"
    raise DataError(f"row {number:,} {problem}; the file was not written. Fix the row.", path=str(path))
