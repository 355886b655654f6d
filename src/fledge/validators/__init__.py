"""Validators: is a model's output valid DOT, Cypher, SQL, JSON, Python, ...? One registry for
the data tools (drop invalid rows) and for evaluation (validity rate of generated outputs).

    from fledge.validators import get_validator
    v = get_validator("cypher")                    # or ("sql", dialect="postgres"), ("json", schema=...)
    verdict = v("Sure! ```cypher\\nMATCH (n) RETURN n\\n```")
    verdict.ok, verdict.extracted, verdict.message # True, "MATCH (n) RETURN n", ""
    v.validate_many(outputs)                       # list[Verdict], batched where that is faster

Built-in names are in VALIDATORS; each maps to a factory whose keyword arguments are the
validator's options (every factory takes extract=True: find the candidate in a chatty answer,
see extract.py). The one door to user code is a "package.module:function" reference: the
function takes the text (after generic extraction) and returns a bool, (bool, message) or a
Verdict; options given to get_validator are passed to it as keyword arguments.

Verdict.ok is True, False, or None when the validator cannot judge (e.g. Graphviz is not
installed); count None apart from False when reporting a validity rate.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from collections.abc import Callable

from fledge.errors import RecipeError
from fledge.validators.cypher import make_cypher_validator
from fledge.validators.dot import make_dot_validator
from fledge.validators.extract import extract_candidate
from fledge.validators.sql import make_sql_validator
from fledge.validators.structured import make_json_validator, make_python_validator, make_regex_validator
from fledge.validators.verdict import Validator, Verdict
from fledge.validators.vocabulary import make_vocabulary_validator

__all__ = ["VALIDATORS", "Validator", "Verdict", "get_validator", "register_validator"]

Factory = Callable[..., Validator]

VALIDATORS: dict[str, Factory] = {
    "dot": make_dot_validator,
    "cypher": make_cypher_validator,
    "sql": make_sql_validator,
    "json": make_json_validator,
    "python": make_python_validator,
    "regex": make_regex_validator,
    "vocabulary": make_vocabulary_validator,
}

_NAME = re.compile(r"[A-Za-z_][\w.-]*")
_REFERENCE = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def register_validator(name: str, factory: Factory | None = None, *, replace: bool = False):
    """Add a validator factory under `name`; usable as a decorator: @register_validator("toml").

    The factory takes keyword options and returns a Validator. Registering a taken name is an
    error unless replace=True.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"validator name {name!r}: use letters, digits, '_', '-' or '.' (':' marks user code)")

    def register(factory: Factory) -> Factory:
        if name in VALIDATORS and not replace:
            raise ValueError(f"validator {name!r} is already registered; pass replace=True to override it")
        VALIDATORS[name] = factory
        return factory

    return register if factory is None else register(factory)


def get_validator(name: str, **options) -> Validator:
    """The validator called `name` (or a "module:function" reference), built with `options`."""
    if not isinstance(name, str):
        raise RecipeError(f"a validator name is a string, got {type(name).__name__}")
    if ":" in name:
        return _custom_validator(name, options)
    factory = VALIDATORS.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, list(VALIDATORS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"unknown validator {name!r}; {hint}Known validators: {', '.join(sorted(VALIDATORS))}, "
                          "or a 'package.module:function' reference to your own")
    _check_options(name, factory, options)
    return factory(**options)


def _check_options(name: str, factory: Factory, options: dict) -> None:
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [p for p, spec in parameters.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    for option in options:
        if option not in known:
            close = difflib.get_close_matches(option, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"validator {name!r} has no option {option!r}; {hint}"
                              f"Its options: {', '.join(known) or 'none'}")
    missing = [p for p, spec in parameters.items()
               if spec.kind is inspect.Parameter.KEYWORD_ONLY and spec.default is inspect.Parameter.empty
               and p not in options]
    if missing:
        raise RecipeError(f"validator {name!r} needs the option(s) {', '.join(missing)}")


def _custom_validator(reference: str, options: dict) -> Validator:
    """Load "package.module:function" and wrap it; every problem is reported at load time."""
    if not _REFERENCE.fullmatch(reference):
        raise RecipeError(f"validator {reference!r} is not a valid reference; write it as "
                          "'package.module:function' (one ':', dotted module path, function name)")
    module_name, function_name = reference.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(f"validator {reference!r}: cannot import module {module_name!r} ({error}). "
                          "Install the package, or run from the folder that holds it (or add it to "
                          "PYTHONPATH)") from None
    function = getattr(module, function_name, None)
    if function is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(function_name, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"validator {reference!r}: module {module_name!r} has no {function_name!r}{hint}")
    if not callable(function):
        raise RecipeError(f"validator {reference!r}: {function_name!r} is a {type(function).__name__}, "
                          "not a function")
    try:
        inspect.signature(function).bind("text", **options)
    except TypeError as error:
        raise RecipeError(f"validator {reference!r} cannot be called as {function_name}(text"
                          + "".join(f", {k}=..." for k in options) + f"): {error}") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): the first call will tell

    def judge(candidate: str) -> Verdict:
        return _as_verdict(function(candidate, **options), candidate, reference)

    return Validator(name=reference, judge=judge, extract=extract_candidate)


def _as_verdict(result: object, candidate: str, reference: str) -> Verdict:
    if isinstance(result, Verdict):
        return result if result.extracted else dataclasses.replace(result, extracted=candidate)
    if isinstance(result, bool):
        return Verdict(result, candidate, "" if result else f"rejected by {reference}")
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], (bool, type(None)))
            and isinstance(result[1], str)):
        return Verdict(result[0], candidate, result[1])
    raise RecipeError(f"validator {reference!r} returned {result!r} ({type(result).__name__}); a validator "
                      "returns a bool, a (bool, message) tuple, or a Verdict")
