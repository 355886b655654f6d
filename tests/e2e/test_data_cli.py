"""`fledge data ...` end to end on a tiny folder: extract -> pairs -> synth -> merge -> split -> check.

Runs the real CLI (`python -m fledge data ...`) in a subprocess, and the same flow in-process
through `fledge.data.commands.register` on a bare parser, so the CLI layer is tested even where
the main parser does not register `data` yet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

GUIDE = "# Limn\n\n```limn\n# greeting\nsol lux gro vel\nlun nox whe joi\n```\n\nProse.\n\n```limn\nmov res cut sa\n```\n"
SYNTH = """# fledge data synth synth.yaml -o out/synth.jsonl
count: 40
seed: 3
slots:
  word: [sol, lux, gro, vel, lun, nox, whe, joi]
  op: [joi, cut, sa]
templates:
  - name: combine
    category: combine
    input: "{word} {op} {word#2}"
    output: "{word#2} {op} {word}"
  - name: define
    category: define
    weight: 0.5
    input: "def {word}"
    output: "{word} = {word#2}"
"""


def _cli_has_data() -> bool:
    proc = subprocess.run([sys.executable, "-m", "fledge", "data", "--help"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode == 0


def _in_process(args: list[str], cwd: Path) -> tuple[int, str, str]:
    from fledge.data.commands import register
    from fledge.errors import FledgeError
    parser = argparse.ArgumentParser(prog="fledge")
    register(parser.add_subparsers())
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            parsed = parser.parse_args(args)
            try:
                code = parsed.func(parsed)
            except FledgeError as e:
                print(f"error: {e}", file=sys.stderr)
                code = e.exit_code
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(params=["in-process", "subprocess"])
def fledge(request):
    if request.param == "subprocess":
        if not _cli_has_data():
            pytest.skip("fledge.cli does not register the `data` verb yet (one line: "
                        "fledge.data.commands.register(verbs))")

        def run(args: list[str], cwd: Path) -> tuple[int, str, str]:
            proc = subprocess.run([sys.executable, "-m", "fledge", *args], cwd=cwd, env=ENV, capture_output=True,
                                  text=True, timeout=300)
            return proc.returncode, proc.stdout, proc.stderr
        return run
    return _in_process


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_data_verb(tmp_path, fledge):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(GUIDE)
    (tmp_path / "docs" / "more.limn").write_text("# var\nwhe a\nwhe b\n")
    (tmp_path / "synth.yaml").write_text(SYNTH)

    code, out, err = fledge(["data", "extract", "docs", "-o", "out/expr.jsonl", "--include", "*.md", "--include",
                             "*.limn", "--language", "limn", "--block-lines", "--comment-prefix", "#",
                             "--context-from-comments"], tmp_path)
    assert code == 0, err
    expressions = lines(tmp_path / "out" / "expr.jsonl")
    assert [(e["text"], e["file"], e["line"]) for e in expressions] == [
        ("sol lux gro vel", "guide.md", 5), ("lun nox whe joi", "guide.md", 6), ("mov res cut sa", "guide.md", 12),
        ("whe a", "more.limn", 2), ("whe b", "more.limn", 3)]
    assert "5 rows" in out

    code, out, err = fledge(["data", "pairs", "out/expr.jsonl", "-o", "out/pairs.jsonl", "--strategy",
                             "completion:max_per_expression=2", "--strategy", "template:input=int {x},type=interp",
                             "--seed", "1"], tmp_path)
    assert code == 0, err
    pairs = lines(tmp_path / "out" / "pairs.jsonl")
    assert {p["metadata"]["strategy"] for p in pairs} == {"completion", "template"}

    code, out, err = fledge(["data", "synth", "synth.yaml", "-o", "out/synth.jsonl"], tmp_path)
    assert code == 0, err
    assert len(lines(tmp_path / "out" / "synth.jsonl")) == 40 and "category" in out
    code, out, err = fledge(["data", "synth", "synth.yaml", "-o", "out/too_many.jsonl", "--count", "5000"], tmp_path)
    assert code != 0 and err.startswith("error: asked for 5,000 rows but the templates can make at most 256")
    assert not (tmp_path / "out" / "too_many.jsonl").exists()

    code, out, err = fledge(["data", "merge", "out/pairs.jsonl", "out/synth.jsonl", "-o", "out/merged.jsonl",
                             "--dedupe", "near"], tmp_path)
    assert code == 0, err
    merged = lines(tmp_path / "out" / "merged.jsonl")

    code, out, err = fledge(["data", "split", "out/merged.jsonl", "--out-dir", "out/split", "--ratio", "0.8",
                             "--stratify", "metadata.type", "--json"], tmp_path)
    assert code == 0, err
    report = json.loads(out)
    assert report["leaked_exact"] == 0 and report["train"] + report["val"] == len(merged)

    code, out, err = fledge(["data", "check", "out/split/train.jsonl", "--val", "out/split/val.jsonl", "--by",
                             "metadata.type", "--json"], tmp_path)
    data = json.loads(out)
    assert code == 0 and data["ok"], data["errors"]
    assert data["stats"]["val_rows"] == report["val"]

    code, out, err = fledge(["data", "check", "out/nope.jsonl"], tmp_path)
    assert code != 0 and err.startswith("error: no such file: out/nope.jsonl")
    assert len(err.strip().splitlines()) == 1


def test_check_reports_limn_duplicates_and_exits_nonzero(tmp_path, fledge):
    path = SHARED / "limn" / "limn_train_first3000.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    code, out, err = fledge(["data", "check", str(path), "--json"], tmp_path)
    data = json.loads(out)
    assert code == 1
    counts = {e["check"]: e["count"] for e in data["errors"] + data["warnings"]}
    assert counts == {"schema": 5, "duplicates": 651, "identity": 718, "near_duplicates": 238}
    code, out, err = fledge(["data", "check", str(path), "--examples", "1"], tmp_path)
    assert "x 651 exact duplicate rows" in out and "x 718 rows have input == output" in out
