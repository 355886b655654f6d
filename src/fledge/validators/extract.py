"""Find the candidate to judge inside a model's answer, which may be chatty.

    extract_candidate("Sure!\\n```cypher\\nMATCH (n) RETURN n\\n```", fence_tags=("cypher",))
    # -> "MATCH (n) RETURN n"

The order, the same for every validator:

1. A fenced block (```lang or ~~~lang, on its own line or inline: "```cypher MATCH ...```").
   A block whose tag is one of the validator's tags wins, else the first block. A fence that
   never closes (a truncated answer) runs to the end.
2. Else the validator's own finder: a balanced construct (`digraph ... { ... }`, a JSON
   `{...}` / `[...]`) or a statement starting at a keyword (Cypher `MATCH`, SQL `SELECT`),
   when the text before it reads as prose (not code: "MACTH (n) RETURN n" stays whole).
3. Else the whole text, stripped.

Balanced constructs skip brackets inside quoted strings and comments. A construct that never
closes runs to the end of the text, so the validator reports the truncation. Code-like
leftovers after the construct (a stray `}` or `;`, up to the next blank line) stay in the
candidate; prose after it is dropped. Extraction never repairs code: `graph { a -- b } }`
is judged as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

Finder = Callable[[str], "str | None"]

_FENCE_MARK = re.compile(r"`{3,}|~{3,}")
_TAG = re.compile(r"[A-Za-z][\w+#.-]*")
# Language words recognised after an inline fence ("```sql SELECT 1```"); a validator's own tags count too.
COMMON_TAGS = frozenset({"text", "txt", "plaintext", "cypher", "sql", "dot", "graphviz", "json", "python", "py",
                         "bash", "sh", "yaml", "xml", "javascript", "js"})
# After a balanced construct, what follows up to the next blank line is kept when it starts
# like code, so `graph { a } }` is judged whole while `{"a": 1}. Hope this helps.` drops the prose.
# Across lines only closers count (a later line "- note" or "(see above)" is prose); on the same
# line, code characters, or anything glued to the bracket but sentence punctuation (`}x`).
_CODE_LEFTOVER = re.compile(r"\s*[}\]);]|[ \t]*[{\[(<>=\-+*/|&\"'$]|[^\s.,!?:]")
# Text before a construct or statement keyword is skipped only when it reads as prose: it ends
# a sentence or introduces the code (":"), or its last line has no code characters. So
# "MACTH (n) RETURN n" is judged whole, not as "RETURN n".
_CODE_CHARS = re.compile(r"[()\[\]{}=<>'\"`;]")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_BLANK_AHEAD = re.compile(r"[ \t]*\n")
_NOT_SPACE = re.compile(r"\S")


def extract_candidate(text: str, fence_tags: Sequence[str] = (), finder: Finder | None = None) -> str:
    """The part of `text` a validator judges: fenced block, else `finder`'s pick, else all of it."""
    fenced = extract_fenced(text, fence_tags)
    if fenced is not None:
        return fenced
    if finder is not None:
        found = finder(text)
        if found is not None:
            return found
    return text.strip()


def extract_fenced(text: str, tags: Sequence[str] = ()) -> str | None:
    """Content of the fenced block tagged with one of `tags` (case-insensitive), else of the first."""
    wanted = {t.lower() for t in tags}
    blocks = list(_fenced_blocks(text, wanted))
    if not blocks:
        return None
    for tag, body in blocks:
        if tag in wanted:
            return body.strip()
    return blocks[0][1].strip()


def _fenced_blocks(text: str, wanted: set[str]) -> Iterator[tuple[str, str]]:
    """(tag, body) of each ```-fenced block, on its own lines or inline ("```cypher MATCH ...```")."""
    pos = 0
    while (opening := _FENCE_MARK.search(text, pos)) is not None:
        fence = opening.group()
        closing = re.compile(re.escape(fence[0]) + "{" + str(len(fence)) + ",}").search(text, opening.end())
        body = text[opening.end():closing.start() if closing else len(text)]
        first_line, newline, rest = body.partition("\n")
        info = first_line.strip()
        if newline and (not info or _TAG.fullmatch(info.split()[0])):  # ```lang (info) \n code
            yield (info.split()[0].lower() if info else ""), rest
        else:  # inline: ```lang code``` only for a known language word, else all of it is code
            word = _TAG.match(body)
            tag = word.group().lower() if word and body[word.end():word.end() + 1].isspace() else ""
            yield (tag, body[word.end():]) if tag in wanted | COMMON_TAGS else ("", body)
        if closing is None:
            return
        pos = closing.end()


def iter_code(text: str, start: int = 0, *, quotes: str = '"', line_comments: Sequence[str] = ("//",),
              block_comments: bool = True, hash_lines: bool = False,
              html_strings: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (index, char) for characters outside strings and comments, from `start` on.

    `quotes` open strings with backslash escapes; `line_comments` run to the end of the line;
    `block_comments` are /* */; `hash_lines` skips lines starting with # (DOT's preprocessor
    lines); `html_strings` skips DOT's nested <...> labels. String and comment openers are not
    yielded, and an unterminated string or comment ends the iteration.
    """
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c in quotes:
            i += 1
            while i < n and text[i] != c:
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if any(text.startswith(marker, i) for marker in line_comments) or (
                hash_lines and c == "#" and text[text.rfind("\n", 0, i) + 1:i].strip() == ""):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
            continue
        if block_comments and text.startswith("/*", i):
            close = text.find("*/", i + 2)
            i = n if close < 0 else close + 2
            continue
        if html_strings and c == "<":
            depth = 0
            while i < n:
                depth += {"<": 1, ">": -1}.get(text[i], 0)
                if depth == 0:
                    break
                i += 1
            i += 1
            continue
        yield i, c
        i += 1


def balanced_end(text: str, open_at: int, **code_options) -> int | None:
    """Index just past the bracket closing the one at `open_at`, or None if it never closes."""
    pairs = {"{": "}", "[": "]", "(": ")"}
    stack = []
    for i, c in iter_code(text, open_at, **code_options):
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if not stack or c != stack[-1]:
                return None
            stack.pop()
            if not stack:
                return i + 1
    return None


def reads_as_prose(before: str) -> bool:
    """Whether text before a construct or statement may be skipped as the answer's chatter."""
    before = before.rstrip()
    return not before or before[-1] in ":.!?" or not _CODE_CHARS.search(before.splitlines()[-1])


def take_construct(text: str, start: int, open_at: int, **code_options) -> str | None:
    """text[start:] up to the bracket matching `open_at`, plus code-like leftovers after it;
    None when the text before `start` does not read as prose (then all of it is judged)."""
    if not reads_as_prose(text[:start]):
        return None
    end = balanced_end(text, open_at, **code_options)
    if end is None:
        return text[start:].strip()
    if _CODE_LEFTOVER.match(text, end):
        blank_line = _BLANK_LINE.search(text, end)
        end = blank_line.start() if blank_line else len(text)
    return text[start:end].strip()


def statement_finder(keywords: Sequence[str], *, quotes: str, line_comments: Sequence[str]) -> Finder:
    """A finder for query languages: the statement(s) starting at the first clause keyword.

    A keyword counts where it starts a line in upper or lower case (not Capitalized, so a
    sentence like "With this query..." is passed over), or anywhere in upper case ("Here is
    the query: MATCH (n) RETURN n"), when the text before it reads as prose. The candidate
    ends at a ';' or a blank line followed by prose (text not starting with a keyword), at a
    period followed by a Capitalized word (a new sentence: "... RETURN n. It returns ..."),
    or at the end of the text.
    """
    alternatives = "|".join(sorted(keywords, key=len, reverse=True))
    at_line_start = re.compile(rf"^[ \t]*({alternatives})\b", re.MULTILINE | re.IGNORECASE)
    upper_anywhere = re.compile(rf"(?<![\w$`'\".])(?:{'|'.join(k.upper() for k in keywords)})\b")
    continues = re.compile(rf"\s*(?:{alternatives})\b", re.IGNORECASE)
    sentence_end = re.compile(r"\.\s+[A-Z][a-z]+\b")

    def find(text: str) -> str | None:
        hits = [m.start(1) for m in at_line_start.finditer(text) if m.group(1).isupper() or m.group(1).islower()]
        upper = upper_anywhere.search(text)
        if upper:
            hits.append(upper.start())
        if not hits:
            return None
        start = min(hits)
        if not reads_as_prose(text[:start]):
            return None
        end = len(text)
        for i, c in iter_code(text, start, quotes=quotes, line_comments=line_comments):
            blank_line = c == "\n" and _BLANK_AHEAD.match(text, i + 1)
            if (c == ";" or blank_line) and _NOT_SPACE.search(text, i + 1) and not continues.match(text, i + 1):
                end = i + 1 if c == ";" else i
                break
            if c == "." and sentence_end.match(text, i):
                end = i
                break
        return text[start:end].strip()

    return find
