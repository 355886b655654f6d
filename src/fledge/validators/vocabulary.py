"""Vocabulary validator: does an output stay inside a language's word list (a conlang's, say)?

    v = get_validator("vocabulary", path="limn/vocabulary.json", words=["qry", "ctx"])
    verdict = v("sol liq → gas")
    verdict.ok        # purity: True when no word falls outside the vocabulary
    verdict.score     # adherence: the share of words inside it (1.0 here)
    verdict.details   # {"n_words": 3, "n_known": 3, "unknown": []}

Words. The text is lowercased (unless case_sensitive=True) and a word is a maximal run of
letters and digits holding at least one letter: `wh?` gives `wh`, `(sol` gives `sol`, `f1`
gives `f1`. Everything else is not a word and is neither counted nor judged: punctuation,
symbols and symbol operators (`|`, `→`, `∎`, `+`, `=`), and bare numbers. Hyphens and
apostrophes split words. A text with no words at all gets ok=None (nothing to judge).

Vocabulary sources (`path`, plus any inline `words`):
- a text file, one word per line; blank lines and lines starting with # are skipped;
- a JSON list of words, or {"words": [...]};
- the limn layout: {"operators": {group: {word: ...}}, "domains": {domain: {"categories":
  {category: {word: ...}}}}}: every word key under operators and categories.
Vocabulary entries are lowercased too, and entries that are not words by the rule above (the
limn file's "|", "(", "+") are dropped, since the text's symbols are never judged.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

from fledge.errors import DataError, RecipeError
from fledge.validators.extract import extract_candidate
from fledge.validators.verdict import Validator, Verdict

_WORD = re.compile(r"[^\W_]*[^\W\d_][^\W_]*")


def make_vocabulary_validator(*, path: str | Path | None = None, words: Iterable[str] = (),
                              case_sensitive: bool = False, extract: bool = True) -> Validator:
    """ok = purity (no word outside the vocabulary), score = adherence (share of words inside)."""
    vocabulary = set()
    if path is not None:
        vocabulary |= load_vocabulary(path)
    if isinstance(words, str):
        raise RecipeError("vocabulary validator: words must be a list of words, not one string")
    vocabulary |= set(words)
    if not case_sensitive:
        vocabulary = {w.lower() for w in vocabulary}
    vocabulary = {w for w in vocabulary if _WORD.fullmatch(w)}
    if not vocabulary:
        raise RecipeError("vocabulary validator: the vocabulary is empty. Give path (a word list or "
                          "vocabulary JSON) and/or words")
    return Validator(
        name="vocabulary",
        judge=functools.partial(judge_vocabulary, vocabulary=frozenset(vocabulary), case_sensitive=case_sensitive),
        extract=(lambda text: extract_candidate(text)) if extract else str.strip,
    )


def split_words(text: str, case_sensitive: bool = False) -> list[str]:
    """The words of `text` by the rule in the module docstring."""
    return _WORD.findall(text if case_sensitive else text.lower())


def judge_vocabulary(candidate: str, vocabulary: frozenset[str], case_sensitive: bool = False) -> Verdict:
    found = split_words(candidate, case_sensitive)
    if not found:
        return Verdict(None, candidate, "no words to judge", None, {"n_words": 0, "n_known": 0, "unknown": []})
    unknown = list(dict.fromkeys(w for w in found if w not in vocabulary))
    n_known = sum(w in vocabulary for w in found)
    details = {"n_words": len(found), "n_known": n_known, "unknown": unknown}
    message = ""
    if unknown:
        shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        message = f"{len(found) - n_known} of {len(found)} words are outside the vocabulary: {shown}"
    return Verdict(not unknown, candidate, message, n_known / len(found), details)


def load_vocabulary(path: str | Path) -> set[str]:
    """Words from a text word list or a vocabulary JSON file (layouts in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"vocabulary validator: {path} does not exist. Give a word list (.txt, one word "
                          "per line) or a vocabulary .json")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"not JSON: {error.msg}", path=str(path), line=error.lineno) from None
    if isinstance(data, dict) and "words" in data:
        data = data["words"]
    if isinstance(data, list) and all(isinstance(w, str) for w in data):
        return set(data)
    if isinstance(data, dict) and ("operators" in data or "domains" in data):
        return _limn_words(data, path)
    raise DataError("no word list found. A vocabulary JSON is a list of words, {\"words\": [...]}, or the "
                    "limn layout with \"operators\" and \"domains\"", path=str(path))


def _limn_words(data: dict, path: Path) -> set[str]:
    found = set()
    try:
        for group in data.get("operators", {}).values():
            found |= set(group)
        for domain in data.get("domains", {}).values():
            for category in domain.get("categories", {}).values():
                found |= set(category)
    except (AttributeError, TypeError):
        raise DataError("operators must map groups to {word: ...} and domains must hold categories of "
                        "{word: ...}", path=str(path)) from None
    return found
