"""extract: fenced blocks, lines, inline code and Python definitions, each with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fledge.data.extract import ExtractConfig, extract, glob_regex, load_extract_config
from fledge.errors import DataError, RecipeError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"

GUIDE = """# Guide

Say `sol lux` to greet.

```limn
# greeting
sol lux
lun nox
```

```python
print("not limn")
```

~~~limn
gro vel
~~~
"""

CODE = '''"""Module."""


def plain(x):
    """Add one."""
    return x + 1


@decorator
class Thing:
    """A thing."""

    def method(self):
        return 2
'''


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(GUIDE)
    (tmp_path / "lib.py").write_text(CODE)
    (tmp_path / "notes.limn").write_text("# var (variables)\nwhe a\nwhe b\n\n# cns\na joi b sa c\n---\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "junk.md").write_text("```limn\njunk\n```\n")
    return tmp_path


def rows_of(root: Path, **kw) -> list[dict]:
    return extract(ExtractConfig(root=str(root), **kw)).rows


def test_fenced_blocks_of_chosen_languages_with_first_content_line(tree):
    rows = rows_of(tree, include=["*.md"], languages=["limn"])
    assert [(r["text"], r["file"], r["line"], r["language"]) for r in rows] == [
        ("# greeting\nsol lux\nlun nox", "docs/guide.md", 6, "limn"), ("gro vel", "docs/guide.md", 16, "limn")]
    lines = GUIDE.splitlines()
    assert lines[rows[1]["line"] - 1] == "gro vel"


def test_block_lines_get_their_own_line_and_comment_context(tree):
    rows = rows_of(tree, include=["*.md"], languages=["limn"], block_lines=True, comment_prefixes=["#"],
                   context_from_comments=True)
    assert [(r["text"], r["line"], r["context"]) for r in rows] == [
        ("sol lux", 7, "greeting"), ("lun nox", 8, ""), ("gro vel", 16, "")]


def test_inline_code_spans(tree):
    rows = rows_of(tree, include=["*.md"], languages=["limn"], inline_code=True)
    inline = [r for r in rows if r["kind"] == "inline"]
    assert [(r["text"], r["line"]) for r in inline] == [("sol lux", 3)]


def test_python_functions_and_classes_with_docstrings(tree):
    rows = rows_of(tree, include=["*.py"])
    assert [(r["name"], r["kind"], r["line"], r["docstring"]) for r in rows] == [
        ("plain", "function", 4, "Add one."), ("Thing", "class", 9, "A thing."),
        ("Thing.method", "function", 13, "")]
    assert rows[1]["text"].startswith("@decorator\nclass Thing:")
    assert rows_of(tree, include=["*.py"], methods=False)[-1]["name"] == "Thing"


def test_lines_skip_comments_and_take_them_as_context(tree):
    rows = rows_of(tree, include=["*.limn"], comment_prefixes=["#"], context_from_comments=True, drop=r"^---$")
    assert [(r["text"], r["line"], r["context"]) for r in rows] == [
        ("whe a", 2, "var (variables)"), ("whe b", 3, ""), ("a joi b sa c", 6, "cns")]


def test_walk_is_sorted_and_skips_excluded_folders(tree):
    rows = rows_of(tree, unit="file")
    assert [r["file"] for r in rows] == ["docs/guide.md", "lib.py", "notes.limn"]


def test_keep_filter_and_dedupe_counts(tree):
    (tree / "again.limn").write_text("whe a\nwhe z\n")
    result = extract(ExtractConfig(root=str(tree), include=["*.limn"], comment_prefixes=["#"], keep=r"^whe"))
    assert [r["text"] for r in result.rows] == ["whe a", "whe z", "whe b"]
    assert result.duplicates_dropped == 1 and result.filtered_out == 2
    assert len(extract(ExtractConfig(root=str(tree), include=["*.limn"], keep=r"^whe", dedupe=False)).rows) == 4


def test_unreadable_files_are_skipped_and_named(tree):
    (tree / "bad.limn").write_bytes(b"\xff\xfe\x00bad")
    (tree / "broken.py").write_text("def (:\n")
    result = extract(ExtractConfig(root=str(tree), include=["*.limn", "broken.py"]))
    assert ("bad.limn", "not UTF-8 text") in result.skipped
    assert ("broken.py", "Python syntax error at line 1") in result.skipped
    assert "2 files skipped" in result.summary()


@pytest.mark.parametrize("pattern,path,hit", [
    ("*.md", "a/b/c.md", True), ("docs/*.md", "docs/x.md", True), ("docs/*.md", "docs/sub/x.md", False),
    ("docs/**/*.md", "docs/sub/x.md", True), ("**/*.md", "x.md", True), ("[ab].txt", "b.txt", True),
])
def test_glob_rules(pattern, path, hit):
    regex = glob_regex(pattern)
    subject = path if "/" in pattern else path.rsplit("/", 1)[-1]
    assert bool(regex.match(subject)) is hit


def test_missing_root_says_which_folder(tmp_path):
    with pytest.raises(DataError, match=r"no such folder: .*nowhere"):
        extract(ExtractConfig(root=str(tmp_path / "nowhere")))


def test_spec_errors_name_the_key(tmp_path):
    spec = tmp_path / "extract.yaml"
    spec.write_text("root: .\nlanguage: [limn]\nkeep: '('\nunit: blocs\n")
    with pytest.raises(RecipeError) as e:
        load_extract_config(spec)
    text = str(e.value)
    assert "3 problems" in text
    assert "unknown key language; did you mean languages?" in text
    assert "keep is not a valid regular expression" in text
    assert "unit is 'blocs'; choose one of auto, file, lines, blocks, python" in text


def test_real_limn_files_give_expressions_with_comment_context():
    folder = SHARED / "limn" / "limn_files"
    if not folder.exists():
        pytest.skip(f"{folder} is absent: the real-data tests need ../shared/data beside the repository")
    rows = rows_of(folder, comment_prefixes=["#"], context_from_comments=True, drop=r"^(---|\[\d+\]|::.*)$")
    by_text = {r["text"]: r for r in rows}
    assert by_text["a joi b sa c"]["file"] == "examples_addition.limn"
    assert by_text["a joi b sa c"]["line"] == 10
    assert by_text["a joi b sa c"]["context"] == "cns (constraints)"
    assert len(rows) == len({r["text"] for r in rows}) > 100


# \f, \v, \x1c-\x1e, \x85, U+2028 and U+2029 end a line for str.splitlines() but not for files or ast
ODD_BREAKS = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_line_numbers_count_newlines_only(tmp_path):
    odd = "".join(ODD_BREAKS)
    (tmp_path / "a.limn").write_text(f"one{odd}still one\r\ntwo\nthree\n", newline="")
    rows = rows_of(tmp_path, include=["*.limn"])
    assert [(r["text"], r["line"]) for r in rows] == [(f"one{odd}still one", 1), ("two", 2), ("three", 3)]
    (tmp_path / "g.md").write_text(f"# a{odd}b\n\n```limn\nx{odd}y\nz\n```\n", newline="")
    rows = rows_of(tmp_path, include=["*.md"], block_lines=True)
    assert [(r["text"], r["line"]) for r in rows] == [(f"x{odd}y", 4), ("z", 5)]


def test_python_definitions_after_odd_line_breaks_keep_their_text(tmp_path):
    source = f'X = "{"".join(ODD_BREAKS)}"\r\n\r\ndef after(x):\r\n    return x\r\n\r\n\r\nclass Later:\r\n    pass\r\n'
    (tmp_path / "m.py").write_text(source, newline="")
    rows = rows_of(tmp_path, include=["*.py"])
    assert [(r["name"], r["line"], r["text"]) for r in rows] == [
        ("after", 3, "def after(x):\n    return x"), ("Later", 7, "class Later:\n    pass")]


def test_a_fifo_in_the_folder_is_skipped_and_named(tree):
    import os
    import signal

    def stuck(*_):
        raise AssertionError("extract opened the FIFO and waited for a writer")
    os.mkfifo(tree / "pipe.limn")
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    try:
        result = extract(ExtractConfig(root=str(tree), include=["*.limn"]))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert ("pipe.limn", "not a regular file (a pipe, socket or device)") in result.skipped
    assert "pipe.limn: not a regular file" in result.summary()
    assert [r["file"] for r in result.rows] == ["notes.limn"] * len(result.rows) and result.rows
