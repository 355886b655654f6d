"""Validators for JSON (optionally against a JSON Schema), Python source, and a regex.

    get_validator("json")("Here you go: {\\"name\\": \\"Ada\\"}").ok                 # True
    get_validator("json", schema={"type": "object", "required": ["id"]})('{"name": 1}').message
    # "at $: 'id' is a required property"
    get_validator("python")("```python\\ndef f(:\\n```").message                     # "line 1:7 invalid syntax"
    get_validator("regex", pattern=r"(yes|no)")("yes").ok                            # True: full match

Extraction: a fenced block first; for JSON then the first balanced {...} or [...] (brackets
inside strings skipped); else the whole text. A schema may be a dict or a path to a .json file;
it is checked when the validator is made, so a broken schema fails at load time.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path

from fledge.errors import FledgeError, RecipeError
from fledge.validators.extract import extract_candidate, take_construct
from fledge.validators.verdict import Validator, Verdict, empty_verdict

_JSON_CODE = dict(quotes='"', line_comments=(), block_comments=False)


def make_json_validator(*, schema: dict | str | Path | None = None, extract: bool = True) -> Validator:
    """Validate JSON; schema: a JSON Schema (dict or .json path) the value must also satisfy."""
    check_schema = _schema_checker(schema) if schema is not None else None
    return Validator(
        name="json",
        judge=functools.partial(judge_json, check_schema=check_schema),
        extract=extract_json if extract else str.strip,
    )


def extract_json(text: str) -> str:
    return extract_candidate(text, ("json", "jsonc", "json5"), _find_json)


def _find_json(text: str) -> str | None:
    opener = re.search(r"[{\[]", text)
    if opener is None:
        return None
    return take_construct(text, opener.start(), opener.start(), **_JSON_CODE)


class _NotJson(ValueError):
    """NaN, Infinity and -Infinity: Python's json reads them, JSON has no such values."""


def _no_constant(name: str) -> None:
    raise _NotJson(f"{name} is not JSON (JSON has no NaN or Infinity; write null or a string)")


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)


def judge_json(candidate: str, check_schema=None) -> Verdict:
    if not candidate.strip():
        return empty_verdict("JSON value")
    try:
        value = _STRICT_JSON.decode(candidate)
    except json.JSONDecodeError as error:
        return Verdict(False, candidate, f"line {error.lineno} column {error.colno}: {error.msg}")
    except _NotJson as error:
        return Verdict(False, candidate, str(error))
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        return Verdict(None, candidate, "a number has more digits than Python reads; cannot judge")
    except RecursionError:
        return Verdict(None, candidate, "nested too deeply for Python's json module; cannot judge")
    problem = check_schema(value) if check_schema else None
    return Verdict(problem is None, candidate, problem or "")


def _schema_checker(schema: dict | str | Path):
    try:
        import jsonschema
    except ImportError as error:
        raise FledgeError(f"the json validator's schema option needs jsonschema ({error}). "
                          "Install it: pip install 'jsonschema>=4'") from error
    if isinstance(schema, (str, Path)):
        path = Path(schema)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"json validator: schema file {path} does not exist. Give the path of a "
                              "JSON Schema file, or the schema itself as a mapping") from None
        except json.JSONDecodeError as error:
            raise RecipeError(f"json validator: schema file {path}:{error.lineno} is not JSON: {error.msg}") from None
    if not isinstance(schema, dict):
        raise RecipeError(f"json validator: schema must be a mapping or a path, got {type(schema).__name__}")
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise RecipeError(f"json validator: the schema itself is invalid: {error.message}") from None
    validator = validator_class(schema)

    def check(value) -> str | None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return None
        return f"at {error.json_path}: {error.message}"

    return check


def make_python_validator(*, extract: bool = True) -> Validator:
    """Validate Python source with ast.parse (syntax only; nothing is run)."""
    return Validator(
        name="python",
        judge=judge_python,
        extract=(lambda text: extract_candidate(text, ("python", "py", "python3"))) if extract else str.strip,
    )


def judge_python(candidate: str) -> Verdict:
    if not candidate.strip():
        return empty_verdict("Python code")
    try:
        ast.parse(candidate)
    except SyntaxError as error:
        return Verdict(False, candidate, f"line {error.lineno}:{error.offset} {error.msg}")
    except ValueError as error:  # e.g. a null byte in the source
        return Verdict(False, candidate, str(error))
    return Verdict(True, candidate)


def make_regex_validator(*, pattern: str, ignore_case: bool = False, extract: bool = True) -> Validator:
    """Valid when the whole candidate matches `pattern` (re.fullmatch)."""
    try:
        compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except (re.error, TypeError) as error:
        raise RecipeError(f"regex validator: pattern {pattern!r} does not compile: {error}") from None
    return Validator(
        name="regex",
        judge=functools.partial(judge_regex, compiled=compiled),
        extract=(lambda text: extract_candidate(text)) if extract else str.strip,
    )


def judge_regex(candidate: str, compiled: re.Pattern) -> Verdict:
    if compiled.fullmatch(candidate):
        return Verdict(True, candidate)
    return Verdict(False, candidate, f"does not fully match the pattern {compiled.pattern!r}")
