"""fledge eval --outputs: planted systems with known counts give the right rates, differences and
p-values through the real CLI; targets, per-row files, metric definitions and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fledge.cli import main
from fledge.errors import RecipeError
from fledge.evaluate.metrics import normalize_answer, parse_validator_flag
from fledge.evaluate.score import default_out_dir, score_outputs
from conftest import shared_data


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def outputs(texts: list[str], field: str = "generation") -> list[dict]:
    return [{field: t, "id": i} for i, t in enumerate(texts)]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- a JSON task: needs no external tool -----------------------------------------------------------

@pytest.fixture
def json_task(tmp_path: Path) -> dict:
    """20 rows; tuned: reference on 0-14, other valid JSON on 15-17, broken on 18-19 (18/20 valid);
    baseline: valid JSON inside chatter on 0-4 only (5/20). Tuned only valid on 13 rows, baseline only on 0."""
    references = [json.dumps({"id": i, "name": f"item {i}"}) for i in range(20)]
    data = write_jsonl(tmp_path / "data.jsonl",
                       [{"input": f"object {i}", "output": r} for i, r in enumerate(references)])
    tuned = references[:15] + ['{"id": 1, "x": [1, 2]}'] * 3 + ['{"id": 18, "name": ', '{"id": 19,, }']
    base = [f"Sure! Here it is: {r}" for r in references[:5]] + ["I cannot do that."] * 15
    return {"data": data, "tuned": write_jsonl(tmp_path / "tuned.jsonl", outputs(tuned)),
            "base": write_jsonl(tmp_path / "base.jsonl", outputs(base)), "dir": tmp_path}


def test_planted_json_systems_through_the_cli(json_task, capsys):
    code = main(["eval", "--data", str(json_task["data"]), "--outputs", str(json_task["tuned"]),
                 "--baseline", str(json_task["base"]), "--validate", "json"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((json_task["dir"] / "tuned.eval" / "summary.json").read_text())
    assert summary["n_rows"] == 20
    assert {k: (v["k"], v["n"]) for k, v in summary["metrics"].items()} == {
        "exact_match": (15, 20), "normalized_match": (15, 20), "json": (18, 20)}
    assert summary["baseline_metrics"]["json"]["k"] == 5
    json_cmp = next(c for c in summary["comparisons"] if c["metric"] == "json")
    assert (json_cmp["tuned_k"], json_cmp["baseline_k"], json_cmp["tuned_only"], json_cmp["baseline_only"]) == \
        (18, 5, 13, 0)
    assert json_cmp["diff"] == pytest.approx(13 / 20)
    assert json_cmp["lo"] < 13 / 20 < json_cmp["hi"]
    assert json_cmp["p_value"] == pytest.approx(2 / 2 ** 13)
    assert json_cmp["sentence"] == "tuned is better on json validity: 18/20 vs 5/20, p < 0.001"
    assert "tuned is better on json validity: 18/20 vs 5/20, p < 0.001" in out
    assert "json validity     18/20 90.0% [69.9, 97.2]" in out


def test_rows_file_holds_every_row_with_verdicts(json_task):
    result = score_outputs(json_task["data"], json_task["tuned"], validators=["json"],
                           baseline_file=json_task["base"])
    result.write(json_task["dir"] / "out")
    rows = read_rows(json_task["dir"] / "out" / "rows.jsonl")
    assert [r["row"] for r in rows] == list(range(1, 21))
    assert rows[0]["source"].endswith("data.jsonl:1") and rows[0]["prompt"] == "object 0"
    assert rows[18]["validators"]["json"]["ok"] is False and rows[18]["validators"]["json"]["message"]
    assert rows[0]["baseline"]["generation"].startswith("Sure!")
    assert rows[0]["baseline"]["validators"]["json"] == {"ok": True, "extracted": rows[0]["reference"],
                                                         "message": ""}
    assert rows[0]["baseline"]["exact_match"] is False
    assert result.to_dict()["rows_file"] == str(json_task["dir"] / "out" / "rows.jsonl")


@pytest.mark.parametrize("targets, code, verdicts", [
    (["json=0.85", "exact_match=70%"], 0, "met, met"),
    (["json=0.95", "exact_match=0.7"], 3, "MISSED, met"),
])
def test_targets_met_or_missed(json_task, capsys, targets, code, verdicts):
    flags = [x for t in targets for x in ("--target", t)]
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(json_task["tuned"]),
                 "--validate", "json", *flags]) == code
    out = capsys.readouterr().out
    assert ", ".join(line.rsplit(": ", 1)[1] for line in out.split("targets\n")[1].splitlines()[:2]) == verdicts
    summary = json.loads((json_task["dir"] / "tuned.eval" / "summary.json").read_text())
    assert summary["targets"]["json"]["direction"] == "higher"
    assert summary["targets"]["json"]["met"] is (code == 0)


@pytest.mark.parametrize("flag, message", [
    ("ppl=20", "--target ppl: perplexity needs a model"),
    ("purity=0.85", "--target purity: this evaluation computes no metric 'purity'. It comes from the vocabulary "
                    "validator"),
    ("exact_mach=0.5", "Did you mean 'exact_match'?"),
    ("dot=0.9", "Add --validate dot"),
    ("json=85", "json is a share between 0 and 1; did you mean 0.85?"),
])
def test_bad_target_is_one_line_before_scoring(json_task, capsys, flag, message):
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(json_task["tuned"]),
                 "--validate", "json", "--target", flag]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (json_task["dir"] / "tuned.eval").exists()


# --- mismatched files: one line naming file:line ---------------------------------------------------

def test_fewer_outputs_than_rows_names_the_first_row_without_one(json_task, capsys):
    short = write_jsonl(json_task["dir"] / "short.jsonl", outputs(["{}"] * 19))
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(short)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{short}: 19 outputs for 20 data rows: {json_task['data']}:20 has none" in err


def test_more_outputs_than_rows_names_the_extra_line(json_task, capsys):
    long = write_jsonl(json_task["dir"] / "long.jsonl", outputs(["{}"] * 21))
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(long)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{long}:21: an output beyond the 20 data rows" in err


def test_missing_field_names_the_line_and_the_flag(json_task, capsys):
    rows = outputs(["{}"] * 20)
    rows[6] = {"text": "{}"}
    bad = write_jsonl(json_task["dir"] / "bad.jsonl", rows)
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f'{bad}:7: "generation" is missing (fields: text)' in err and "--field NAME" in err


def test_field_flag_reads_another_field(json_task, capsys):
    other = write_jsonl(json_task["dir"] / "other.jsonl", outputs(["{}"] * 20, field="text"))
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(other), "--field", "text",
                 "--validate", "json", "-o", str(json_task["dir"] / "o")]) == 0
    assert json.loads((json_task["dir"] / "o" / "summary.json").read_text())["metrics"]["json"]["k"] == 20


def test_a_run_or_outputs_is_required_and_not_both(json_task, capsys):
    assert main(["eval", "--data", str(json_task["data"])]) == 2
    err = capsys.readouterr().err
    assert "give a RUN to generate with" in err and "--outputs FILE" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "runs/x", "--data", str(json_task["data"]), "--outputs", str(json_task["tuned"])]) == 2
    err = capsys.readouterr().err
    assert "RUN and --outputs" in err and len(err.strip().splitlines()) == 1


# --- user 3's DOT case: real data, real Graphviz -------------------------------------------------

def test_planted_dot_systems_user_3(tmp_path, capsys):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not on PATH: the dot validator cannot judge without it")
    pairs = json.loads(shared_data("dot/smcat_pairs.json").read_text())[:45]
    data = tmp_path / "smcat45.json"
    data.write_text(json.dumps(pairs))
    references = [p["output_dot"] for p in pairs]
    # tuned: the reference on 38 rows, the reference cut before its last brace on 7.
    tuned = [r if i < 38 else r.rstrip().rstrip("}") for i, r in enumerate(references)]
    # base: a small valid graph in a chatty answer on 14 of tuned's valid rows and 2 of its broken ones.
    base = ["Here is the graph:\n```dot\ndigraph { on -> off }\n```" if i < 14 or i in (38, 39) else "digraph { on -> "
            for i in range(45)]
    write_jsonl(tmp_path / "tuned.jsonl", outputs(tuned))
    write_jsonl(tmp_path / "base.jsonl", outputs(base))
    code = main(["eval", "--data", str(data), "--outputs", str(tmp_path / "tuned.jsonl"), "--baseline",
                 str(tmp_path / "base.jsonl"), "--validate", "dot", "--target", "dot=0.9", "--json"])
    assert code == 3                                                   # 38/45 = 84% misses 90%
    summary = json.loads(capsys.readouterr().out)
    assert (summary["metrics"]["dot"]["k"], summary["baseline_metrics"]["dot"]["k"]) == (38, 16)
    assert summary["metrics"]["exact_match"]["k"] == 38
    dot = next(c for c in summary["comparisons"] if c["metric"] == "dot")
    assert (dot["tuned_only"], dot["baseline_only"]) == (24, 2)
    assert dot["diff"] == pytest.approx(22 / 45)
    assert dot["p_value"] == pytest.approx(2 * (1 + 26 + 325) / 2 ** 26) and dot["p_value"] < 0.001
    assert dot["sentence"] == "tuned is better on dot validity: 38/45 vs 16/45, p < 0.001"
    assert summary["targets"]["dot"] == {"target": 0.9, "value": 38 / 45, "met": False, "direction": "higher"}
    rows = read_rows(tmp_path / "tuned.eval" / "rows.jsonl")
    assert len(rows) == 45
    assert rows[0]["baseline"]["validators"]["dot"]["extracted"] == "digraph { on -> off }"
    assert rows[40]["validators"]["dot"]["ok"] is False and "syntax error" in rows[40]["validators"]["dot"]["message"]


# --- metric definitions -----------------------------------------------------------------------------

def test_vocabulary_purity_and_adherence(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("sol\nliq\ngas\nhot\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": f"q{i}", "output": "sol liq"} for i in range(4)])
    # words in / words: 2/2, 2/3 (cold), 0/1, none (no words: left out of both)
    outs = write_jsonl(tmp_path / "o.jsonl", outputs(["sol liq", "sol → gas cold", "water", "→ ∎"]))
    result = score_outputs(data, outs, validators=[f"vocabulary:path={words}"], targets={"purity": 0.3})
    purity, adherence = result.metrics["purity"], result.metrics["adherence"]
    assert (purity["k"], purity["n"], purity["unjudged"]) == (1, 3, 1)
    assert adherence["value"] == pytest.approx(4 / 6) and adherence["n"] == 3 and "k" not in adherence
    assert adherence["lo"] <= adherence["value"] <= adherence["hi"]
    assert result.targets["purity"]["met"] is True
    assert "purity: 1 of 4 rows could not be judged (no words to judge)" in result.format()


def test_vocabulary_comparison_uses_the_bootstrap(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("sol\nliq\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": f"q{i}", "output": "sol"} for i in range(30)])
    tuned = write_jsonl(tmp_path / "t.jsonl", outputs(["sol liq"] * 30))
    base = write_jsonl(tmp_path / "b.jsonl", outputs(["sol water"] * 30))
    result = score_outputs(data, tuned, validators=[f"vocabulary:path={words}"], baseline_file=base)
    adherence = next(c for c in result.comparisons if c["metric"] == "adherence")
    assert (adherence["diff"], adherence["lo"], adherence["hi"], adherence["p_value"]) == (0.5, 0.5, 0.5, None)
    assert adherence["sentence"] == ("tuned is better on adherence: 1.00 vs 0.50 "
                                     "(difference +0.50, 95% bootstrap interval +0.50 to +0.50)")


@pytest.mark.parametrize("text, normal", [
    ('  "The  Cat." ', "the cat"),
    ("the cat?!", "the cat"),
    ("'Paris'.", "paris"),
    ("A\tB\nC", "a b c"),
    ("x.y", "x.y"),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("flag, parsed", [
    ("dot", ("dot", {})),
    ("sql:dialect=postgres", ("sql", {"dialect": "postgres"})),
    ("dot:timeout=2.5,batch_size=8", ("dot", {"timeout": 2.5, "batch_size": 8})),
    ('vocabulary:path=a,b.txt,words=["qry","ctx"]', ("vocabulary", {"path": "a,b.txt", "words": ["qry", "ctx"]})),
    ("regex:pattern=^a{2,3}$,ignore_case=true", ("regex", {"pattern": "^a{2,3}$", "ignore_case": True})),
    ("pkg.mod:func", ("pkg.mod:func", {})),
    ("pkg.mod:func:limit=3", ("pkg.mod:func", {"limit": "3"})),
])
def test_parse_validator_flag(flag, parsed):
    assert parse_validator_flag(flag) == parsed


@pytest.mark.parametrize("flag, message", [
    ("output=dot", "name only the validator, e.g. --validate dot"),
    ("vocabulary:path", "write options as key=value"),
    ("dot:timeout=soon", "'soon' is not a float"),
])
def test_bad_validator_flags(flag, message):
    with pytest.raises(RecipeError, match=message):
        parse_validator_flag(flag)


def test_default_out_dir_is_beside_the_outputs():
    assert default_out_dir("runs/x/outputs.jsonl") == Path("runs/x/outputs.eval")


def test_out_dir_never_overwrites_an_input(json_task, capsys):
    folder = json_task["dir"] / "gen"
    folder.mkdir()
    inside = folder / "rows.jsonl"
    inside.write_text(json_task["tuned"].read_text())
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(inside), "-o", str(folder)]) == 1
    assert f"the per-row file {inside} is also an input" in capsys.readouterr().err
    assert main(["eval", "--data", str(json_task["data"]), "--outputs", str(inside), "-o", str(inside)]) == 2
    assert "-o names a folder" in capsys.readouterr().err
    assert inside.read_text() == json_task["tuned"].read_text()
