"""pairs: named strategies over extracted expressions, seeded, each row tagged with its strategy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fledge.data.pairs import (CompletionStrategy, Expression, NextStrategy, SplitStrategy, TemplateStrategy,
                               load_pairs_config, make_pairs, parse_strategy_flag, read_expressions,
                               strategies_of)
from fledge.errors import DataError, RecipeError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"

EXPRS = [Expression("sol lux  gro vel", "a.limn", 1, "greeting"), Expression("lun nox", "a.limn", 2),
         Expression("qry wh | ans sol", "a.limn", 3), Expression("whe a", "b.limn", 1),
         Expression("whe b", "b.limn", 2), Expression("one", "b.limn", 3)]


def test_completion_cuts_at_word_boundaries_and_caps_per_expression():
    rows, report = make_pairs(EXPRS, [CompletionStrategy(max_per_expression=2)], seed=3, shuffle=False)
    first = [r for r in rows if r["metadata"]["line"] == 1 and r["metadata"]["file"] == "a.limn"]
    assert len(first) == 2
    for r in rows:
        whole = next(e.text for e in EXPRS if e.file == r["metadata"]["file"] and e.line == r["metadata"]["line"])
        assert whole.startswith(r["input"]) and whole.endswith(r["output"])
        assert whole[len(r["input"]):-len(r["output"])].strip() == ""   # cut only at whitespace
        assert r["input"] and r["output"]
    assert not any(r["metadata"]["file"] == "b.limn" and r["metadata"]["line"] == 3 for r in rows)  # one word
    assert report.made["completion"] == len(rows)


def test_next_uses_previous_expressions_of_the_same_file_only():
    rows, _ = make_pairs(EXPRS, [NextStrategy(context_size=2)], shuffle=False)
    assert [(r["input"], r["output"]) for r in rows] == [
        ("ctx sol lux  gro vel | qry nex", "lun nox"),
        ("ctx sol lux  gro vel | lun nox | qry nex", "qry wh | ans sol"),
        ("ctx whe a | qry nex", "whe b"), ("ctx whe a | whe b | qry nex", "one")]


def test_split_on_a_delimiter():
    rows, _ = make_pairs(EXPRS, [SplitStrategy()], shuffle=False)
    assert [(r["input"], r["output"]) for r in rows] == [("qry wh", "ans sol")]


def test_template_and_context_rows():
    rows, _ = make_pairs(EXPRS, [TemplateStrategy(input="int {x}", output="{x}", type="interpretation"),
                                 TemplateStrategy(input="why {x}", output="{context}")], shuffle=False)
    assert rows[0] == {"input": "int sol lux  gro vel", "output": "sol lux  gro vel",
                       "metadata": {"type": "interpretation", "strategy": "template", "file": "a.limn", "line": 1,
                                    "context": "greeting"}}
    assert [r["output"] for r in rows if r["input"].startswith("why")] == ["greeting"]


def test_identity_rows_and_duplicates_are_dropped_and_counted():
    rows, report = make_pairs(EXPRS, [TemplateStrategy(input="{x}", output="{x}"),
                                      TemplateStrategy(input="int {x}", output="{x}"),
                                      TemplateStrategy(input="int {x}", output="{x}")], shuffle=False)
    assert report.identity == len(EXPRS) and report.duplicates == len(EXPRS)
    assert len(rows) == len(EXPRS)
    kept, _ = make_pairs(EXPRS, [TemplateStrategy(input="{x}", output="{x}")], drop_identity=False)
    assert len(kept) == len(EXPRS)


def test_seeded_and_independent_per_strategy():
    one, _ = make_pairs(EXPRS, [CompletionStrategy(max_per_expression=1)], seed=7, shuffle=False)
    again, _ = make_pairs(EXPRS, [CompletionStrategy(max_per_expression=1)], seed=7, shuffle=False)
    assert one == again
    seeds = {json.dumps(make_pairs(EXPRS, [CompletionStrategy(max_per_expression=1)], seed=s)[0]) for s in range(6)}
    assert len(seeds) > 1
    both, _ = make_pairs(EXPRS, [CompletionStrategy(max_per_expression=1), SplitStrategy()], seed=7, shuffle=False)
    assert [r for r in both if r["metadata"]["strategy"] == "completion"] == one


def test_limit_draws_a_sample():
    rows, report = make_pairs(EXPRS, [TemplateStrategy(input="int {x}", limit=3)])
    assert len(rows) == 3 and report.made["template"] == len(EXPRS)


def test_spec_validation_names_keys_and_strategies(tmp_path):
    spec = tmp_path / "pairs.yaml"
    spec.write_text("inputs: [x.jsonl]\nsed: 1\nstrategies:\n  - name: completon\n  - name: template\n"
                    "    input: '{y}'\n    limt: 3\n  - name: next\n    context_size: 0\n")
    with pytest.raises(RecipeError) as e:
        load_pairs_config(spec)
    text = str(e.value)
    assert "unknown key sed; did you mean seed?" in text
    assert "strategies[0].name 'completon' is not a strategy; did you mean completion?" in text
    assert "unknown key strategies[1].limt; did you mean strategies[1].limit?" in text
    assert "strategies[1].input uses {y}" in text
    assert "strategies[2].context_size is 0; it must be at least 1" in text


def test_spec_builds_strategies(tmp_path):
    config = load_pairs_config({"inputs": ["x"], "strategies": [{"name": "completion", "max_per_expression": 3},
                                                                 {"name": "template", "input": "int {x}"}]})
    built = strategies_of(config)
    assert isinstance(built[0], CompletionStrategy) and built[0].max_per_expression == 3
    assert isinstance(built[1], TemplateStrategy) and built[1].output == "{x}"


def test_read_expressions_from_extract_output_and_bad_rows(tmp_path):
    good = tmp_path / "e.jsonl"
    good.write_text('{"text": "sol lux", "file": "a.md", "line": 4, "context": "c"}\n')
    assert read_expressions(good) == [Expression("sol lux", "a.md", 4, "c")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"words": "sol"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no text field .*the row has words.*--text-field"):
        read_expressions(bad)


def test_real_raw_corpus():
    path = SHARED / "limn" / "raw_corpus.json"
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    exprs = read_expressions(path)
    assert len(exprs) == 7067
    assert exprs[0] == Expression("whe a", "examples/test_chain_backward.limn", 4, "Given final value, compute initial")
    rows, report = make_pairs(exprs, [CompletionStrategy(), NextStrategy(), SplitStrategy(),
                                      TemplateStrategy(input="int {x}", type="interpretation")], seed=1)
    assert set(report.kept) == {"completion", "next", "split", "template"}
    assert len({(r["input"], r["output"]) for r in rows}) == len(rows)
    assert not any(r["input"].strip() == r["output"].strip() for r in rows)


@pytest.mark.parametrize("flag,expected", [
    ("template:input={x},output=a, b {x}", {"name": "template", "input": "{x}", "output": "a, b {x}"}),
    ("template:input=int {x},type=interp", {"name": "template", "input": "int {x}", "type": "interp"}),
    ("template:input={x: 1}", {"name": "template", "input": "{x: 1}"}),
    ("next:joiner= | ,context_size=3", {"name": "next", "joiner": " | ", "context_size": 3}),
    ("completion: max_per_expression=3, limit=2", {"name": "completion", "max_per_expression": 3, "limit": 2}),
    ("split:delimiter=true", {"name": "split", "delimiter": "true"}),
    ("template:type=1.5", {"name": "template", "type": "1.5"}),
])
def test_strategy_flag_values_are_text_except_known_numbers(flag, expected):
    assert parse_strategy_flag(flag) == expected


def test_strategy_flag_with_a_bad_number_names_the_key():
    with pytest.raises(RecipeError, match=r"strategies\[0\]\.limit must be an integer, got 'lots'"):
        load_pairs_config({"inputs": ["x"], "strategies": [parse_strategy_flag("completion:limit=lots")]})
    template = strategies_of(load_pairs_config({"inputs": ["x"], "strategies": [
        parse_strategy_flag("template:input={x},output=out {x}")]}))[0]
    assert (template.input, template.output) == ("{x}", "out {x}")
