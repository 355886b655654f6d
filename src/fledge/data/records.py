"""Training rows from JSONL, JSON, CSV and Parquet files, in one normalized view.

    for item in scan_file("train.jsonl"):
        if isinstance(item, RowProblem): print(item)          # train.jsonl:418: ...
        else: item.messages, item.prompt, item.response, item.metadata, item.source, item.line

Every row becomes a conversation, `Record.messages` (`[{"role", "content"}, ...]`), which
fine-tuning renders with a chat template. The formats (`FORMATS`, one table for reading and
writing), each detected per row so one file may mix them:

    {"input", "output"[, "metadata"]}          io                  user: input; assistant: output
    {"instruction", "input", "output"}         alpaca              user: instruction, blank line, input
                                                                   (input may be empty or absent)
    {"messages": [{"role", "content"}, ...]}   chat                every turn, system message included
    [{"role", "content"}, ...]                 chat                (a bare array of messages per line)
    {"prompt", "completion"}                   prompt_completion   user: prompt; assistant: completion
    {"text"}                                   text                one assistant message and nothing
                                                                   else: a plain completion, which
                                                                   fine-tuning trains on every token of
                                                                   (fledge.train.rows), without a template
    {"input_text" | "input_code", "output_dot"}  io (detected under user 3's names; see DETECTED_ALIASES)

`FieldMap(input_field=..., output_field=...)` names a pair's fields (a CSV with `question,cypher`
columns: format "mapped"). A format forced per source (`scan_file(..., fmt="chat")`) reads every
row in that format, and a row that does not fit is a RowProblem at its file:line.

`Record.prompt` and `.response` are the text forms the data tools compare (duplicates, leakage,
checks): the response is the last assistant message; the prompt is the user turn of a one-turn
conversation, "system, blank line, user" with a system message (as alpaca reads instruction and
input), and "role: content" lines of every earlier turn in longer conversations. `to_format`
writes any record as any format (`fledge data merge --to`, `fledge data synth`): formats without a
system role put the system message first in the prompt; alpaca puts it in "instruction".

Files: `.jsonl` (one row per line), `.json` (an array of rows, or an object holding one such
array), `.csv` (a header line, then rows; quoted fields may span lines), `.parquet` (needs
pyarrow; line = row number). Every row keeps its file and line so problems can point at it; files
are read one at a time, by `fledge.data.sources` (which rows are unreadable and why, which files).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from fledge.data.sources import Invalid, expand_sources, iter_raw_rows
from fledge.errors import DataError
from fledge.files import atomic_open
from fledge.jsonstrict import SURROGATE_CHAR

ROLES = ("system", "user", "assistant", "tool", "function")
# Field names detected as io pairs besides "input"/"output": user 3's DOT datasets. Kept in
# detection because the data tools take one field map per run, and a merge or split of user 3's
# files (input_code in one, input_text in another) needs both read in one pass.
DETECTED_ALIASES = (("input_text", "output_dot"), ("input_code", "output_dot"))


@dataclass(frozen=True)
class FieldMap:
    """Field names that override format detection (both empty: detect per row)."""

    input_field: str = ""
    output_field: str = ""

    @property
    def active(self) -> bool:
        return bool(self.input_field or self.output_field)

    @property
    def pair(self) -> tuple[str, str]:
        return self.input_field or "input", self.output_field or "output"


@dataclass
class Record:
    """One training row as a conversation, with where it came from and the row as read."""

    messages: list[dict]          # [{"role", "content"}, ...], ending with the assistant's answer
    metadata: dict
    source: str
    line: int | None
    format: str                   # io, alpaca, chat, prompt_completion, text, or mapped (a field map)
    row: Any = field(repr=False, default=None)  # the row as read, for writing it back unchanged

    @classmethod
    def pair(cls, prompt: str, response: str, metadata: dict | None = None, source: str = "", line: int | None = None,
             system: str = "") -> "Record":
        """A one-turn record (a system message first when `system`), e.g. for rows made in code."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return cls(messages, dict(metadata or {}), source, line, "chat" if system else "io")

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    @property
    def prompt(self) -> str:
        """What comes before the last answer, as text (see the module docstring)."""
        return prompt_text(self.messages)

    @property
    def response(self) -> str:
        """The last assistant message."""
        return self.messages[-1]["content"]

    @property
    def is_completion(self) -> bool:
        """A plain completion (a text row): one assistant message, no prompt, no template."""
        return len(self.messages) == 1 and self.messages[0]["role"] == "assistant"

    @property
    def text(self) -> str:
        """Prompt and response together: what duplicate and leakage checks compare."""
        return f"{self.prompt}\x1f{self.response}" if self.prompt else self.response

    @property
    def repeats_input(self) -> bool:
        """The output is the input again: the last user turn (chat), the input or else the instruction
        (alpaca), the prompt (other pairs). Never for plain text rows."""
        target = self.response.strip()
        if self.format == "alpaca" and isinstance(self.row, dict):
            source = self.row.get("input") or self.row.get("instruction") or ""
            return source.strip() == target
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return bool(users) and bool(users[-1].strip()) and users[-1].strip() == target

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
        """The row rewritten as `keep` (unchanged) or one of FORMATS, with its metadata."""
        if fmt == "keep":
            return self.row
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}")
        out = FORMATS[fmt].write(self)
        if self.metadata:
            out["metadata"] = self.metadata
        return out


def prompt_text(messages: list[dict]) -> str:
    """The text before the last answer: see the module docstring."""
    turns = messages[:-1]
    roles = [m["role"] for m in turns]
    if roles == ["user"]:
        return turns[0]["content"]
    if roles == ["system", "user"]:
        system, user = turns[0]["content"], turns[1]["content"]
        return f"{system}\n\n{user}" if system else user
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


# --- the formats: how each reads into messages and is written from a record -----------------

@dataclass(frozen=True)
class RowFormat:
    """One row format: what its rows look like, how one becomes messages, how a record is written."""

    name: str
    shape: str                                        # for messages: '{"input", "output"}'
    read: Callable[[Any, FieldMap], list[dict]]      # the row's messages; RowError when it does not fit
    write: Callable[[Record], dict]                   # the record as a row of this format (no metadata)


def _read_pair(names: tuple[str, str]) -> Callable[[Any, FieldMap], list[dict]]:
    def read(row: Any, fields: FieldMap) -> list[dict]:
        i, o = fields.pair if fields.active else names
        _require_object(row, f'{{"{i}", "{o}"}}')
        if i not in row and o not in row:
            raise RowError(f'"{i}" and "{o}" are missing (fields: {_field_list(row)})')
        prompt, response = _text(row, i, o), _text(row, o, i)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return read


def _write_pair(names: tuple[str, str]) -> Callable[[Record], dict]:
    return lambda r: {names[0]: r.prompt, names[1]: r.response}


def _read_alpaca(row: Any, fields: FieldMap) -> list[dict]:
    _require_object(row, '{"instruction", "input", "output"}')
    instruction = _text(row, "instruction", "output")
    extra = _text(row, "input", "output", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", "instruction")}]


def _write_alpaca(r: Record) -> dict:
    if [m["role"] for m in r.messages] == ["system", "user", "assistant"]:
        system, user, answer = (m["content"] for m in r.messages)
        return {"instruction": system, "input": user, "output": answer}
    return {"instruction": r.prompt, "input": "", "output": r.response}


def _read_chat(row: Any, fields: FieldMap) -> list[dict]:
    if isinstance(row, list):
        return _messages(row, "the message array")
    _require_object(row, '{"messages": [...]} or a bare array of messages')
    if "messages" not in row:
        raise RowError(f'"messages" is missing (fields: {_field_list(row)}); a chat row is {{"messages": [...]}} or '
                       f'a bare array of messages')
    return _messages(row["messages"], '"messages"')


def _read_text(row: Any, fields: FieldMap) -> list[dict]:
    _require_object(row, '{"text"}')
    return [{"role": "assistant", "content": _text(row, "text", "")}]


def _write_text(r: Record) -> dict:
    return {"text": f"{r.prompt}\n{r.response}" if r.prompt else r.response}


FORMATS: dict[str, RowFormat] = {f.name: f for f in (
    RowFormat("io", '{"input","output"}', _read_pair(("input", "output")), _write_pair(("input", "output"))),
    RowFormat("alpaca", '{"instruction","input","output"}', _read_alpaca, _write_alpaca),
    RowFormat("chat", '{"messages":[...]}, a bare [messages] array', _read_chat,
              lambda r: {"messages": [dict(m) for m in r.messages]}),
    RowFormat("prompt_completion", '{"prompt","completion"}', _read_pair(("prompt", "completion")),
              _write_pair(("prompt", "completion"))),
    RowFormat("text", '{"text"}', _read_text, _write_text),
)}
OUTPUT_FORMATS = ("keep", *FORMATS)
# Pairs detected by their fields, in order: (input field, output field, format name).
PAIR_FIELDS = (("input", "output", "io"), ("prompt", "completion", "prompt_completion"),
               *((i, o, "io") for i, o in DETECTED_ALIASES))
KNOWN_SHAPES = ", ".join([*(f.shape for f in FORMATS.values()), *(f'{{"{i}","{o}"}}' for i, o in DETECTED_ALIASES)])


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
    """Raised by `read_row` for a row that fits no format; the message names the fix."""


# --- reading rows ----------------------------------------------------------------------------

def read_row(row: Any, fields: FieldMap = FieldMap(), fmt: str = "auto") -> tuple[list[dict], dict, str]:
    """(messages, metadata, format name) of one row; RowError says why it does not fit.

    `fmt` "auto" detects the format of this row; a format name reads the row as that format only.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown row format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    metadata = row.get("metadata", {}) if isinstance(row, dict) else {}
    if not isinstance(metadata, dict):
        raise RowError(f'"metadata" must be an object, got {_kind(metadata)}')
    if fmt != "auto":
        try:
            messages = FORMATS[fmt].read(row, fields)
        except RowError as e:
            article = "an" if fmt[0] in "aeio" else "a"
            raise RowError(f"not {article} {fmt} row, the format this source is read as: {e}. {article.capitalize()} "
                           f"{fmt} row is {FORMATS[fmt].shape}") from None
        return messages, metadata, "mapped" if fields.active and fmt in ("io", "prompt_completion") else fmt
    if isinstance(row, list):
        return _read_chat(row, fields), {}, "chat"
    _require_object(row, "")
    if fields.active and (fields.input_field in row or fields.output_field in row):
        return _read_pair(fields.pair)(row, fields), metadata, "mapped"
    if "messages" in row:
        return _read_chat(row, fields), metadata, "chat"
    if "instruction" in row:
        return _read_alpaca(row, fields), metadata, "alpaca"
    for i, o, name in PAIR_FIELDS:
        if i in row and o in row:
            return _read_pair((i, o))(row, FieldMap()), metadata, name
    for i, o, name in PAIR_FIELDS:
        if i in row or o in row:
            have, need = (i, o) if i in row else (o, i)
            raise RowError(f'"{need}" is missing; a row with "{have}" needs "{i}" and "{o}"')
    if "text" in row:
        return _read_text(row, fields), metadata, "text"
    keys = [k for k in row if k != "metadata"]
    strings = [k for k in keys if isinstance(row[k], str)]
    hint = (f" Map your fields with --input-field {strings[0]} --output-field {strings[1]}."
            if len(strings) >= 2 else " Map your fields with --input-field and --output-field.")
    raise RowError(f"row fits no known format (fields: {', '.join(map(str, keys)) or 'none'}). "
                   f"Known: {KNOWN_SHAPES}.{hint}")


def normalize_row(row: Any, fields: FieldMap = FieldMap(), fmt: str = "auto") -> tuple[str, str, dict, str]:
    """(prompt, response, metadata, format name) of one row: `read_row` in the data tools' text form."""
    messages, metadata, name = read_row(row, fields, fmt)
    return prompt_text(messages), messages[-1]["content"], metadata, name


def _require_object(row: Any, shape: str) -> None:
    if not isinstance(row, dict):
        what = f"a {shape} object" if shape else "a JSON object or an array of messages"
        raise RowError(f"a row is {what}, not {_kind(row)}")


def _field_list(row: dict) -> str:
    return ", ".join(map(str, (k for k in row if k != "metadata"))) or "none"


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


def _messages(messages: Any, what: str) -> list[dict]:
    """The checked messages (role and content only), ending with the last assistant message."""
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{what} must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f'message {n} of {what} needs "role" and "content"')
        if m["role"] not in ROLES:
            raise RowError(f"message {n} of {what} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f'message {n} of {what}: "content" must be a string, got {_kind(m["content"])}')
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError(f"{what} has no assistant message, so there is nothing to learn")
    if out[-1]["role"] != "assistant":
        raise RowError(f"{what} ends with a {out[-1]['role']!r} message after the last assistant "
                       f"message; end each conversation with the assistant's reply")
    return out


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


def format_problem(fmt: str, fields: FieldMap) -> str | None:
    """Why rows cannot be read as `fmt` with `fields`, or None: a field map names a pair's two fields."""
    if fmt not in ("auto", *FORMATS):
        return f"unknown row format {fmt!r}; use auto or one of {', '.join(FORMATS)}"
    if fields.active and fmt not in ("auto", "io", "prompt_completion"):
        return (f"a field map (input_field {fields.input_field!r}, output_field {fields.output_field!r}) names the "
                f"two fields of a pair, so it applies to formats auto, io and prompt_completion, not {fmt}")
    return None


def scan_file(path: str | Path, fields: FieldMap = FieldMap(), list_key: str = "",
              require_response: bool = True, fmt: str = "auto") -> Iterator[Record | RowProblem]:
    """Every row of one file as a Record, or a RowProblem naming file:line and the fix.

    `fmt`: "auto" detects each row's format; a format name reads every row as that format."""
    problem = format_problem(fmt, fields)
    if problem:
        raise ValueError(problem)
    source = str(path)
    for line, row in iter_raw_rows(path, list_key):
        if isinstance(row, Invalid):
            yield RowProblem(source, line, row.message)
            continue
        try:
            messages, metadata, name = read_row(row, fields, fmt)
        except RowError as e:
            yield RowProblem(source, line, str(e))
            continue
        if require_response and not messages[-1]["content"].strip():
            yield RowProblem(source, line, "the output is empty, so there is nothing to learn")
            continue
        yield Record(messages, metadata, source, line, name, row)


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
