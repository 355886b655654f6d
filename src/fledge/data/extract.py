"""Pull training text out of a folder: whole files, lines, Markdown code blocks, Python definitions.

    result = extract(ExtractConfig(root="docs", include=["*.md", "*.limn"], languages=["limn"],
                                   block_lines=True, comment_prefixes=["#"], context_from_comments=True))
    write_jsonl(result.rows, "expressions.jsonl")      # {"text", "file", "line", "kind", ...}

or `fledge data extract --spec recipes/data/limn-extract.yaml`. The walk is sorted, so the same
folder gives the same rows in the same order. What a file yields depends on `unit`
(auto: Markdown -> fenced blocks, Python -> functions and classes, anything else -> lines).
Every row keeps its file (relative to `root`) and 1-based line.
"""

from __future__ import annotations

import ast
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fledge.errors import DataError
from fledge.recipe import load_config, option

MARKDOWN = (".md", ".markdown", ".mdx")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`{]*)")
INLINE = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)")


@dataclass
class ExtractConfig:
    root: str = option(".", "folder to walk")
    include: list = option(["*"], "globs of files to read; a glob without '/' matches the file name at any "
                                  "depth, '**' matches any number of folders")
    exclude: list = option([".git", "__pycache__", "node_modules", ".venv"],
                           "globs of files or folders to skip (same rules as include)")
    unit: str = option("auto", "what one row is: auto (Markdown: blocks, Python: definitions, else lines), "
                               "file, lines, blocks (fenced code in Markdown), python (functions, classes)",
                       choices=("auto", "file", "lines", "blocks", "python"))
    languages: list = option([], "fenced-block languages to take (the word after ```); empty: every block")
    block_lines: bool = option(False, "one row per non-empty line of a fenced block instead of the whole block")
    inline_code: bool = option(False, "also take `inline code` spans from Markdown prose")
    keep: str = option("", "regular expression: keep only rows it matches (re.search)")
    drop: str = option("", "regular expression: drop rows it matches")
    comment_prefixes: list = option([], "in lines and block lines, lines starting with these are comments, "
                                        "not rows (e.g. ['#'])")
    context_from_comments: bool = option(False, "comment lines directly above a row become its 'context'")
    methods: bool = option(True, "python unit: also take methods and nested functions")
    min_chars: int = option(1, "drop rows shorter than this", min=0)
    max_chars: int = option(0, "drop rows longer than this; 0: no limit", min=0)
    dedupe: bool = option(True, "drop rows whose text repeats an earlier row's")
    output: str = option("", "JSONL file to write (the CLI's -o)")


@dataclass
class ExtractResult:
    rows: list[dict]
    files_read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (file, why)
    duplicates_dropped: int = 0
    filtered_out: int = 0
    kinds: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(self.kinds.items()))
        text = (f"{len(self.rows):,} rows ({kinds or 'none'}) from {self.files_read:,} files; "
                f"{self.duplicates_dropped:,} duplicates and {self.filtered_out:,} filtered rows dropped")
        if self.skipped:
            text += f"; {len(self.skipped)} files skipped ({self.skipped[0][0]}: {self.skipped[0][1]}"
            text += ", ...)" if len(self.skipped) > 1 else ")"
        return text


def load_extract_config(source: str | Path | dict) -> ExtractConfig:
    """An ExtractConfig from a YAML spec (paths relative to the working directory, as in recipes)."""
    def finish(config: ExtractConfig, problems: list[str]) -> None:
        for key in ("keep", "drop"):
            try:
                re.compile(getattr(config, key))
            except re.error as e:
                problems.append(f"{key} is not a valid regular expression ({e})")
    return load_config(ExtractConfig, source, "extract spec", finish)


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex over '/'-separated relative paths: '*' stays in one folder, '**' crosses."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end].replace("\\", "\\\\")
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _matches(patterns: list[re.Pattern], raw: list[str], rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(p.match(rel if "/" in r else name) for p, r in zip(patterns, raw))


def walk_files(root: str | Path, include: list[str], exclude: list[str]) -> Iterator[tuple[Path, str]]:
    """(path, path relative to root with '/') of every included file, sorted by that relative path;
    excluded folders are not entered."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"no such folder: {base}. Pass the folder to walk (fledge data extract ROOT, or root: in the spec).")
    inc = [glob_regex(p) for p in include]
    exc = [glob_regex(p.rstrip("/")) for p in exclude]
    found = []
    for folder, dirs, files in os.walk(base):
        rel_folder = Path(folder).relative_to(base).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = [d for d in dirs if not _matches(exc, exclude, prefix + d)]
        found.extend((prefix + name, Path(folder) / name) for name in files
                     if _matches(inc, include, prefix + name) and not _matches(exc, exclude, prefix + name))
    for rel, path in sorted(found):
        yield path, rel


def extract(config: ExtractConfig) -> ExtractResult:
    """Walk `config.root` and return the rows `config` asks for, with their file and line."""
    keep = re.compile(config.keep) if config.keep else None
    drop = re.compile(config.drop) if config.drop else None
    result = ExtractResult(rows=[])
    seen: set[str] = set()
    for path, rel in walk_files(config.root, config.include, config.exclude):
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):   # opening a FIFO would wait for a writer
                result.skipped.append((rel, "not a regular file (a pipe, socket or device)"))
                continue
            text = path.read_text(encoding="utf-8")   # universal newlines: \r\n and \r become \n
        except UnicodeDecodeError:
            result.skipped.append((rel, "not UTF-8 text"))
            continue
        except OSError as e:
            result.skipped.append((rel, e.strerror or str(e)))
            continue
        result.files_read += 1
        try:
            items = list(_items_of(text, rel, config))
        except SyntaxError as e:
            result.skipped.append((rel, f"Python syntax error at line {e.lineno}"))
            continue
        for item in items:
            body = item["text"]
            if (len(body) < config.min_chars or (config.max_chars and len(body) > config.max_chars)
                    or (keep and not keep.search(body)) or (drop and drop.search(body))):
                result.filtered_out += 1
                continue
            if config.dedupe:
                if body in seen:
                    result.duplicates_dropped += 1
                    continue
                seen.add(body)
            result.rows.append(item)
            result.kinds[item["kind"]] += 1
    return result


def split_lines(text: str) -> list[str]:
    """Lines as `ast` and editors count them: split at \n (\r\n and a lone \r are line ends too).
    Not str.splitlines(), which also splits at \f, \v, \x1c-\x1e, \x85, U+2028 and U+2029."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _items_of(text: str, rel: str, config: ExtractConfig) -> Iterator[dict]:
    unit = config.unit
    suffix = Path(rel).suffix.lower()
    if unit == "auto":
        unit = "blocks" if suffix in MARKDOWN else "python" if suffix == ".py" else "lines"
    if unit == "file":
        if text.strip():
            yield {"text": text.strip("\n"), "file": rel, "line": 1, "kind": "file"}
    elif unit == "lines":
        yield from _lines(split_lines(text), 1, rel, "line", config)
    elif unit == "blocks":
        yield from _markdown(text, rel, config)
    else:
        yield from _python(text, rel, config)


def _lines(lines: list[str], first: int, rel: str, kind: str, config: ExtractConfig,
           extra: dict | None = None) -> Iterator[dict]:
    comments: list[str] = []
    prefixes = tuple(config.comment_prefixes)
    for number, raw in enumerate(lines, first):
        line = raw.strip()
        if not line:
            comments = []
            continue
        if prefixes and line.startswith(prefixes):
            comments.append(line.lstrip("".join(prefixes)).strip())
            continue
        item = {"text": line, "file": rel, "line": number, "kind": kind, **(extra or {})}
        if config.context_from_comments:
            item["context"] = " ".join(c for c in comments if c)
        comments = []
        yield item


def _markdown(text: str, rel: str, config: ExtractConfig) -> Iterator[dict]:
    wanted = {lang.lower() for lang in config.languages}
    lines = split_lines(text)
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if config.inline_code:
                for span in INLINE.finditer(lines[i]):
                    code = span.group(2).strip()
                    if code:
                        yield {"text": code, "file": rel, "line": i + 1, "kind": "inline"}
            i += 1
            continue
        fence, language = m.group(1), m.group(2).lower()
        end = i + 1
        closing = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        body = lines[i + 1:end]
        if not wanted or language in wanted:
            extra = {"language": language} if language else {}
            if config.block_lines:
                yield from _lines(body, i + 2, rel, "block_line", config, extra)
            elif any(b.strip() for b in body):
                yield {"text": "\n".join(body).strip("\n"), "file": rel, "line": i + 2, "kind": "block", **extra}
        i = end + 1


def _python(text: str, rel: str, config: ExtractConfig) -> Iterator[dict]:
    tree = ast.parse(text)
    lines = split_lines(text)
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

    def visit(node: ast.AST, scope: str) -> Iterator[dict]:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, definitions):
                continue
            start = min([child.lineno] + [d.lineno for d in child.decorator_list])
            name = f"{scope}{child.name}"
            yield {"text": "\n".join(lines[start - 1:child.end_lineno]), "file": rel, "line": start,
                   "kind": "class" if isinstance(child, ast.ClassDef) else "function", "name": name,
                   "docstring": ast.get_docstring(child) or ""}
            if config.methods:
                yield from visit(child, name + ".")

    yield from visit(tree, "")
