"""What a validator returns (Verdict) and what get_validator hands out (Validator).

A Validator is built by composition, never subclassed: an `extract` function that finds the
candidate in a model's answer, a `judge` that rules on one candidate, and optionally a
`judge_many` that rules on many at once (the dot validator runs one process for many graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Verdict:
    """One ruling on one text."""

    ok: bool | None
    """True valid, False invalid, None cannot judge (a missing program, a timeout, no words)."""
    extracted: str
    """The candidate actually judged, after extraction from a chatty answer."""
    message: str = ""
    """Why it failed or why it cannot judge; empty when ok."""
    score: float | None = None
    """A graded score where the validator has one (vocabulary: adherence, 0..1)."""
    details: dict = field(default_factory=dict)
    """Validator-specific facts (vocabulary: n_words, n_known, unknown words)."""


@dataclass(frozen=True)
class Validator:
    """A named check: call it on one text, or `validate_many` on a list."""

    name: str
    judge: Callable[[str], Verdict]
    """Rules on one extracted candidate; puts the candidate in Verdict.extracted."""
    extract: Callable[[str], str]
    """Finds the candidate in a model's answer."""
    judge_many: Callable[[list[str]], list[Verdict]] | None = None
    """Rules on many candidates at once; must agree with `judge` one by one."""

    def __call__(self, text: str) -> Verdict:
        return self.judge(self.extract(_require_text(text)))

    def validate_many(self, texts: Iterable[str]) -> list[Verdict]:
        """One verdict per text, in order; may batch work across texts for speed."""
        candidates = [self.extract(_require_text(t)) for t in texts]
        if self.judge_many is not None:
            return self.judge_many(candidates)
        return [self.judge(c) for c in candidates]


def _require_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"a validator judges text (str), got {type(text).__name__}")
    return text


def empty_verdict(what: str) -> Verdict:
    """The verdict for an answer with nothing to judge."""
    return Verdict(False, "", f"empty output: no {what} to validate")
