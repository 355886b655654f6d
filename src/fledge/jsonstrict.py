"""Strict JSON: the one decoder for every row fledge reads (prepare's .jsonl rows, the data
tools' .jsonl and .json rows, fine-tuning rows).

    value = loads('{"text": "a"}')        # or NotJson("NaN is not a JSON value ...")
    value, end = decode_at(text, pos)     # one value inside a larger text (an element of a .json array)
    end = value_end(text, pos)            # where that value ends, by brackets and strings alone

Python's json module reads more than JSON. Here a value is refused with NotJson, whose message
says what is wrong and what to write instead, when it holds:
- NaN, Infinity or -Infinity (JSON has none);
- a number past the 64-bit float range (1e999 would read as inf), or an integer of more than
  MAX_DIGITS digits (Python's default int-parsing limit, fixed here so that an interpreter
  setting never changes which rows are read);
- arrays or objects nested more than MAX_DEPTH levels, found before parsing so a hostile row
  never reaches the recursion limit (chat rows need 3 levels);
- a string, key or value, with a lone surrogate escape ("\\ud800" without its pair), which is
  not text and cannot be written as UTF-8;
- anything else that is not JSON: the message names the column (and the line, for a value that
  spans lines), and says when a byte order mark opens it (files joined with `cat` keep theirs).

A line holding nothing but JSON whitespace (SPACE) is no row at all.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

MAX_DEPTH = 200   # nesting levels a row may have; json recurses once per level
MAX_DIGITS = 4300  # longest integer read (Python's own limit since 3.11)
SPACE = " \t\r\n"  # JSON's whitespace: a line of only these is blank
SURROGATE_CHAR = re.compile("[\ud800-\udfff]")
DEEP = f"nested more than {MAX_DEPTH} levels deep; no training row needs that, so it is not read"


class NotJson(ValueError):
    """Text that is not strict JSON; the message says why and what to write instead."""


def _refuse_constant(name: str) -> Any:
    raise NotJson(f"{name} is not a JSON value (JSON has no NaN or Infinity); write null or a string")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotJson(f"the number {text[:40]} is too large to read (it overflows to infinity); write it as a "
                      f"string")
    return value


_TOO_LONG = f"a number has more than {MAX_DIGITS:,} digits, more than fledge reads; write it as a string"


def _bounded_int(digits: str) -> int:
    if len(digits) - digits.startswith("-") > MAX_DIGITS:
        raise NotJson(_TOO_LONG)
    return int(digits)


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)   # strings skipped whole, brackets
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(r'[^,\]}\s]*')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def loads(text: str) -> Any:
    """The one JSON value that is all of `text` (whitespace around it aside); NotJson otherwise."""
    if _too_deep(text, 0, len(text)):
        raise NotJson(DEEP)
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        raise _not_json(e, text, 0) from None
    _refuse_lone_surrogate(value, text, 0, len(text))
    return value


def decode_at(text: str, pos: int) -> tuple[Any, int]:
    """(the JSON value starting at text[pos], where it ends); NotJson as `loads` (a syntax error's
    line and column count from `pos`)."""
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError) as e:
        raise _not_json(e, text, pos) from None
    if _too_deep(text, pos, end):   # checked after parsing: the end is not known before
        raise NotJson(DEEP)
    _refuse_lone_surrogate(value, text, pos, end)
    return value, end


def _not_json(e: Exception, text: str, start: int) -> NotJson:
    if isinstance(e, NotJson):   # from the hooks
        return e
    if isinstance(e, json.JSONDecodeError):
        return NotJson(_syntax(e, text, start))
    if isinstance(e, RecursionError):   # MAX_DEPTH keeps rows far below this; a backstop for deep stacks
        return NotJson(DEEP)
    # int() refuses digits past sys.get_int_max_str_digits(), when an interpreter sets it below MAX_DIGITS
    return NotJson(f"a number has more digits than this Python reads (at most {sys.get_int_max_str_digits():,}); "
                   f"write it as a string")


def _refuse_lone_surrogate(value: Any, text: str, start: int, end: int) -> None:
    lone = _SURROGATE_ESCAPE.search(text, start, end) and _lone_surrogate(value)
    if lone:
        raise NotJson(f"a string holds a lone surrogate escape (\\u{ord(lone):04x} without its pair), which is "
                      f"not text and cannot be written as UTF-8; fix the escape")


def _syntax(e: json.JSONDecodeError, text: str, start: int) -> str:
    if e.pos == start and text.startswith("\ufeff", start):
        return ("not valid JSON (the row opens with a byte order mark, U+FEFF, which only a file's first line "
                "may carry; files joined with cat keep theirs); remove it")
    problem = e.msg.removesuffix(" at")   # "Unterminated string starting at", then " at column 26"
    line = text.count("\n", start, e.pos) + 1
    column = e.pos - (text.rfind("\n", start, e.pos) + 1 if line > 1 else start) + 1
    where = f"column {column}" if line == 1 else f"line {line} column {column} of the row"
    return f"not valid JSON ({problem} at {where})"


def _too_deep(text: str, start: int, end: int) -> bool:
    """Whether brackets outside strings nest more than MAX_DEPTH levels in text[start:end]."""
    if text.count("[", start, end) + text.count("{", start, end) <= MAX_DEPTH:
        return False
    depth = 0
    for m in _TOKEN.finditer(text, start, end):
        t = m.group()
        if t == "[" or t == "{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif t == "]" or t == "}":
            depth -= 1
    return False


def _lone_surrogate(value: Any) -> str:
    """The first lone surrogate in any string (key or value) of `value`, or ""."""
    stack = [value]
    while stack:   # a loop, not recursion: the value may be MAX_DEPTH levels deep
        node = stack.pop()
        if isinstance(node, str):
            found = SURROGATE_CHAR.search(node)
            if found:
                return found.group()
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return ""


def value_end(text: str, pos: int) -> int | None:
    """End of the JSON value starting at `pos`, found by brackets and strings without parsing it
    (so a reader can step past a bad value to the next), or None when it does not end."""
    c = text[pos:pos + 1]
    if c == '"':
        m = _STRING.match(text, pos)
        return m.end() if m else None
    if c in ("[", "{"):
        depth = 0
        for m in _TOKEN.finditer(text, pos):
            t = m.group()
            if t == "[" or t == "{":
                depth += 1
            elif t == "]" or t == "}":
                depth -= 1
                if depth == 0:
                    return m.end()
        return None
    end = _SCALAR.match(text, pos).end()
    return end if end > pos else None
