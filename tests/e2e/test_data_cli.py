"""`fledge data ...` end to end on a tiny folder: extract -> pairs -> synth -> merge -> split -> check.

Runs the real CLI (`python -m fledge data ...`) in a subprocess, and the same flow in-process
through `fledge.cli.main`, the entry point itself (its error printing included). A missing
`data` verb fails both, never skips.
"""

from __future__ import annotations

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


@pytest.fixture(params=["in-process", "subprocess"])
def fledge(request, capsys, monkeypatch):
    if request.param == "subprocess":
        def run(args: list[str], cwd: Path) -> tuple[int, str, str]:
            proc = subprocess.run([sys.executable, "-m", "fledge", *args], cwd=cwd, env=ENV, capture_output=True,
                                  text=True, timeout=300)
            return proc.returncode, proc.stdout, proc.stderr
        return run

    def run_in_process(args: list[str], cwd: Path) -> tuple[int, str, str]:
        from fledge.cli import main
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err
    return run_in_process


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


REFUSALS = [   # (argv, start of the one error line); none of them may write a file or change an input
    (["data", "merge", "in.jsonl", "-o", "outdir"], "error: -o outdir is a folder; fledge writes only regular files"),
    (["data", "merge", "in.jsonl", "-o", "pipe.jsonl"], "error: -o pipe.jsonl is not a regular file"),
    (["data", "merge", "in.jsonl", "-o", "./in.jsonl"], "error: output ./in.jsonl is also an input (in.jsonl)"),
    (["data", "merge", "in.jsonl", "-o", "link.jsonl"], "error: output link.jsonl is also an input (in.jsonl)"),
    (["data", "split", "in.jsonl", "--train-out", "t.jsonl", "--val-out", "outdir/../t.jsonl"],
     "error: --train-out and --val-out name the same file"),
    (["data", "split", "in.jsonl", "--train-out", "in.jsonl", "--val-out", "v.jsonl"],
     "error: training output in.jsonl is also an input"),
    (["data", "check", "outdir"], "error: no data files in outdir"),
    (["data", "check", "pipe.jsonl"], "error: pipe.jsonl: not a regular file (a pipe, socket or device)"),
    (["data", "merge", "pipe.jsonl", "-o", "m.jsonl"], "error: pipe.jsonl: not a regular file"),
    (["data", "extract", "docs", "-o", "docs/rows.jsonl"], "error: -o docs/rows.jsonl is also an input"),
    (["data", "synth", "synth.yaml", "--count", "0", "-o", "s.jsonl"], "error: --count 0: count must be at least 1"),
    (["data", "synth", "synth.yaml", "-o", "synth.yaml"], "error: -o synth.yaml is also an input"),
    (["data", "pairs", "in.jsonl", "-o", "in.jsonl", "--strategy", "completion"],
     "error: -o in.jsonl is also an input"),
]


@pytest.fixture
def refusal_tree(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"input": "sol lux gro", "output": "vel"}\n{"input": "a b", "output": "c"}\n')
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    (tmp_path / "outdir").mkdir()
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "rows.jsonl").write_text("old rows\n")
    (tmp_path / "synth.yaml").write_text(SYNTH)
    return tmp_path


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv,start", REFUSALS, ids=[" ".join(a[1:3]) + f"-{i}" for i, (a, _) in enumerate(REFUSALS)])
def test_refusals_are_one_line_and_touch_nothing(refusal_tree, argv, start, capsys, monkeypatch):
    from fledge.cli import main
    monkeypatch.chdir(refusal_tree)
    before = _snapshot(refusal_tree)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0 and err.startswith(start), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    assert _snapshot(refusal_tree) == before


@pytest.mark.parametrize("argv,flag", [
    (["data", "check", "in.jsonl", "--near-threshold", "nan"], "--near-threshold"),
    (["data", "check", "in.jsonl", "--max-duplicate-rate", "inf"], "--max-duplicate-rate"),
    (["data", "split", "in.jsonl", "--out-dir", "o", "--ratio", "NaN"], "--ratio"),
    (["data", "merge", "in.jsonl", "-o", "m.jsonl", "--near-threshold=-inf"], "--near-threshold"),
])
def test_nan_and_infinity_flags_are_refused_naming_the_flag(refusal_tree, argv, flag, capsys, monkeypatch):
    from fledge.cli import main
    monkeypatch.chdir(refusal_tree)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"argument {flag}: {argv[-1].split('=')[-1]} is not a finite number" in capsys.readouterr().err


def test_a_nan_in_a_config_file_is_refused_naming_the_key(refusal_tree, capsys, monkeypatch):
    from fledge.cli import main
    monkeypatch.chdir(refusal_tree)
    (refusal_tree / "check.yaml").write_text("max_identity_rate: .nan\n")
    assert main(["data", "check", "in.jsonl", "--config", "check.yaml"]) != 0
    assert "check.yaml: max_identity_rate is nan; it must be a finite number" in capsys.readouterr().err


def test_template_strategy_flags_keep_their_braces(refusal_tree, capsys, monkeypatch):
    from fledge.cli import main
    monkeypatch.chdir(refusal_tree)
    (refusal_tree / "expr.jsonl").write_text('{"text": "sol lux", "file": "a", "line": 1}\n')
    assert main(["data", "pairs", "expr.jsonl", "-o", "p.jsonl", "--strategy",
                 "template:input={x},output=say, then {x}", "--keep-identity"]) == 0
    assert lines(refusal_tree / "p.jsonl")[0]["input"] == "sol lux"
    assert lines(refusal_tree / "p.jsonl")[0]["output"] == "say, then sol lux"
