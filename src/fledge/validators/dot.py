"""DOT validator: Graphviz's own `dot` program judges each graph, as a user rendering it would.

    v = get_validator("dot")                  # options: program="dot", timeout=10.0, batch_size=64
    v('digraph { a -> b [label="x{y}"] }').ok   # True
    v("graph { a -> b }").message              # "line 1: '->' in an undirected graph; ..."

Each candidate goes to `dot -Tcanon` on stdin. A graph is valid when dot exits 0 and prints no
"Error:" line (warnings, e.g. an unknown color, are fine). dot exits 1 on syntax errors, but
also finishes other graphs and exits 1 for errors like a bad HTML label, so both the exit
status and stderr are read. Whatever dot's version, an edge operator that does not match the
graph (`->` in `graph`, `--` in `digraph`) is rejected before dot runs. Text with no graph in
it (empty, only comments) is rejected: dot accepts it silently.

Without `dot` on PATH every verdict is ok=None with a message saying how to install Graphviz;
the validator never guesses. A graph dot cannot finish within `timeout` seconds is ok=None too.

validate_many sends up to `batch_size` graphs to one dot process, each followed by a tiny
sentinel graph whose name marks where it ended in dot's output. A batch with no error confirms
every graph whose output sits between its sentinels; after a syntax error (dot stops there)
the graphs before it are confirmed, the failing one is judged alone and the rest go on in a
new batch; any other error splits the batch in two. Verdicts equal those of one call each.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from fledge.validators.extract import extract_candidate, iter_code, take_construct
from fledge.validators.verdict import Validator, Verdict, empty_verdict

FENCE_TAGS = ("dot", "graphviz", "gv")
INSTALL_HINT = ("install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
                "conda: conda install graphviz) so that `dot` is on PATH")
_DOT_CODE = dict(quotes='"', line_comments=("//",), block_comments=True, hash_lines=True, html_strings=True)
_GRAPH_START = re.compile(r'\b(?:strict\s+)?(?:di)?graph(?:\s+(?:"(?:[^"\\]|\\.)*"|[\w.]+))?\s*\{', re.IGNORECASE)
_GRAPH_HEADER = re.compile(r"^(?:strict\s+)?(?:di)?graph\b", re.IGNORECASE | re.MULTILINE)
_EDGE_TOKENS = re.compile(r"\b(digraph|graph)\b|->|--|[{}]", re.IGNORECASE)
_SENTINEL = "graph __fledge_end_{} {{}}"
_SENTINEL_OUT = re.compile(r"^graph __fledge_end_(\d+) \{$", re.MULTILINE)
_SURROGATE = re.compile("[\ud800-\udfff]")


def make_dot_validator(*, program: str = "dot", timeout: float = 10.0, batch_size: int = 64,
                       extract: bool = True) -> Validator:
    """Validate Graphviz DOT with the real `dot` program (found on PATH when the validator is made)."""
    runner = _DotRunner(shutil.which(program), program, timeout, max(1, batch_size))
    return Validator(
        name="dot",
        judge=runner.judge_one,
        extract=extract_dot if extract else str.strip,
        judge_many=runner.judge_many,
    )


def extract_dot(text: str) -> str:
    """Fenced block, else `[strict] [di]graph [name] { ... }` with balanced braces, else all of it."""
    return extract_candidate(text, FENCE_TAGS, _find_graph)


def _find_graph(text: str) -> str | None:
    start = _GRAPH_START.search(text)
    if start is None:
        return None
    return take_construct(text, start.start(), start.end() - 1, **_DOT_CODE)


def edge_operator_problem(graph: str) -> str | None:
    """An edge operator that does not match its graph's kind, or None."""
    masked = _mask_non_code(graph)
    directed, depth = None, 0
    for match in _EDGE_TOKENS.finditer(masked):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth = max(0, depth - 1)
        elif token.lower() in ("graph", "digraph"):
            if depth == 0:
                directed = token.lower() == "digraph"
        elif depth > 0 and directed is not None and (token == "->") != directed:
            line = graph.count("\n", 0, match.start()) + 1
            if directed:
                return f"line {line}: '--' in a directed graph (digraph); use '->', or declare 'graph'"
            return f"line {line}: '->' in an undirected graph; use '--', or declare 'digraph'"
    return None


def _mask_non_code(text: str) -> str:
    """`text` with strings, comments and HTML labels blanked out (newlines kept)."""
    chars = [c if c == "\n" else " " for c in text]
    for i, c in iter_code(text, **_DOT_CODE):
        chars[i] = c
    return "".join(chars)


class _DotRunner:
    """Runs dot on candidates, one at a time or in sentinel-separated batches."""

    def __init__(self, path: str | None, program: str, timeout: float, batch_size: int):
        self.path, self.program, self.timeout, self.batch_size = path, program, timeout, batch_size

    def judge_one(self, candidate: str) -> Verdict:
        early = self._precheck(candidate)
        if early is not None:
            return early
        result = self._run(candidate, self.timeout)
        if result is None:
            return Verdict(None, candidate, f"dot did not finish within {self.timeout:g} s; cannot judge "
                                            "(raise the validator's timeout for large graphs)")
        returncode, out, err = result
        errors = _errors(err)
        if returncode != 0 or errors:
            detail = " ".join(errors) if errors else (
                f"dot crashed (signal {-returncode})" if returncode < 0 else f"dot exited with status {returncode}")
            return Verdict(False, candidate, detail)
        if not _GRAPH_HEADER.search(out):
            return Verdict(False, candidate, "no graph found: the text holds no graph or digraph definition")
        return Verdict(True, candidate)

    def judge_many(self, candidates: list[str]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [self._precheck(c) for c in candidates]
        pending = [i for i, v in enumerate(verdicts) if v is None]
        for start in range(0, len(pending), self.batch_size):
            self._judge_batch(candidates, pending[start:start + self.batch_size], verdicts)
        return verdicts

    def _precheck(self, candidate: str) -> Verdict | None:
        """The verdict when dot need not (or cannot) run, else None."""
        if self.path is None:
            return Verdict(None, candidate, f"cannot judge DOT: the Graphviz program {self.program!r} is not on "
                                            f"PATH; {INSTALL_HINT}")
        if not candidate.strip():
            return empty_verdict("graph")
        if _SURROGATE.search(candidate):   # not encodable as UTF-8, so dot could not even be given it
            return Verdict(False, candidate, "the text holds a lone surrogate (\\ud800-\\udfff), which is not text")
        problem = edge_operator_problem(candidate)
        return Verdict(False, candidate, problem) if problem else None

    def _judge_batch(self, candidates: list[str], indices: list[int], verdicts: list) -> None:
        while indices:
            if len(indices) == 1:
                verdicts[indices[0]] = self.judge_one(candidates[indices[0]])
                return
            text = "".join(f"{candidates[i]}\n{_SENTINEL.format(k)}\n" for k, i in enumerate(indices))
            # One timeout for the whole batch: a graph that hangs costs a few halvings, not len * timeout.
            result = self._run(text, self.timeout)
            confirmed = None
            if result is not None:
                returncode, out, err = result
                errors = _errors(err)
                clean = returncode == 0 and not errors
                # dot stops at a syntax error: what it printed before the error is clean.
                syntax_stop = returncode != 0 and len(errors) == 1 and "syntax error" in errors[0]
                if clean or syntax_stop:
                    confirmed = _confirmed_prefix(out, len(indices))
                    if syntax_stop and confirmed == len(indices):
                        confirmed = None
            if confirmed is None:  # a timeout, or errors dot went on after: split and retry
                half = len(indices) // 2
                self._judge_batch(candidates, indices[:half], verdicts)
                self._judge_batch(candidates, indices[half:], verdicts)
                return
            for i in indices[:confirmed]:
                verdicts[i] = Verdict(True, candidates[i])
            if confirmed == len(indices):
                return
            verdicts[indices[confirmed]] = self.judge_one(candidates[indices[confirmed]])
            indices = indices[confirmed + 1:]

    def _run(self, text: str, timeout: float) -> tuple[int, str, str] | None:
        try:
            done = subprocess.run([self.path, "-Tcanon"], input=text.encode("utf-8"), capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def _confirmed_prefix(out: str, count: int) -> int:
    """How many leading graphs of a batch dot printed in full, each between its sentinels."""
    ends = {}
    for match in _SENTINEL_OUT.finditer(out):
        ends.setdefault(int(match.group(1)), match)
    begin = 0
    for k in range(count):
        end = ends.get(k)
        if end is None or end.start() < begin or not _GRAPH_HEADER.search(out, begin, end.start()):
            return k
        begin = end.end()
    return count


def _errors(stderr: str) -> list[str]:
    """dot's error messages, one string each, without the 'Error: <stdin>:' prefix."""
    errors, current = [], None
    for line in stderr.splitlines():
        if line.startswith("Error:"):
            current = [line.removeprefix("Error:").strip().removeprefix("<stdin>:").strip()]
            errors.append(current)
        elif line.startswith("Warning:"):
            current = None
        elif current is not None and line.strip():
            current.append(line.strip())
    return [" ".join(parts) for parts in errors]
