"""synth: exactly the count asked for, unique, or an error that gives the numbers."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from fledge.data.synthesize import allocate, load_synth_spec, synthesize, template_space
from fledge.errors import DataError, RecipeError

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def validator_module(tmp_path_factory):
    """A user validator reachable as 'synth_checks:no_seven' (rejects outputs containing 7)."""
    folder = tmp_path_factory.mktemp("validators")
    (folder / "synth_checks.py").write_text("def no_seven(text):\n    return '7' not in text\n")
    sys.path.insert(0, str(folder))
    yield "synth_checks:no_seven"
    sys.path.remove(str(folder))
    sys.modules.pop("synth_checks", None)


def spec(**over) -> dict:
    base = {"count": 50, "seed": 1,
            "slots": {"n": list(range(10)), "label": ["Person", "Movie", "City"]},
            "templates": [{"name": "count", "category": "aggregation", "input": "How many {label}?",
                           "output": "MATCH (n:{label}) RETURN count(n) LIMIT {n}"},
                          {"name": "pair", "category": "pattern", "weight": 3, "input": "{label} near {label#2}",
                           "output": "MATCH (a:{label})--(b:{label#2}) RETURN a, b LIMIT {n}"}]}
    base.update(over)
    return base


def test_exact_count_of_unique_rows():
    result = synthesize(load_synth_spec(spec(count=117)))
    assert len(result.rows) == 117
    assert len({(r["input"], r["output"]) for r in result.rows}) == 117
    assert template_space(load_synth_spec(spec())) == {"count": 30, "pair": 90}


def test_too_few_combinations_is_an_error_with_the_numbers():
    with pytest.raises(DataError) as e:
        synthesize(load_synth_spec(spec(count=1000)))
    assert str(e.value) == ("asked for 1,000 rows but the templates can make at most 120 distinct rows (count 30, "
                            "pair 90). Add slot values or templates, lower count, or set allow_fewer: true.")


def test_allow_fewer_writes_every_combination():
    result = synthesize(load_synth_spec(spec(count=1000, allow_fewer=True)))
    assert len(result.rows) == 120
    assert "asked for 1,000 rows but made 120" in result.warnings[-1]


def test_weights_set_the_category_mix_and_it_is_reported():
    result = synthesize(load_synth_spec(spec(count=40)))
    assert result.categories_asked == {"aggregation": 0.25, "pattern": 0.75}
    assert Counter(r["metadata"]["type"] for r in result.rows) == {"aggregation": 10, "pattern": 30}
    assert result.categories_made == {"aggregation": 0.25, "pattern": 0.75}
    assert "aggregation" in result.summary() and "25.0%" in result.summary()


def test_a_small_template_hands_its_share_to_the_others_and_warns():
    result = synthesize(load_synth_spec(spec(count=100)))        # count holds 30 of its asked 25
    assert Counter(r["metadata"]["template"] for r in result.rows) == {"count": 25, "pair": 75}
    result = synthesize(load_synth_spec(spec(count=110)))        # asked 27.5 of count: still fits
    assert len(result.rows) == 110
    squeezed = synthesize(load_synth_spec(spec(count=118)))
    assert Counter(r["metadata"]["template"] for r in squeezed.rows)["pair"] == 88
    lopsided = spec(count=60)
    lopsided["templates"][1]["weight"] = 0.1
    result = synthesize(load_synth_spec(lopsided))
    assert Counter(r["metadata"]["template"] for r in result.rows) == {"count": 30, "pair": 30}
    assert any("category aggregation got 50.0% of rows instead of 90.9%" in w for w in result.warnings)


def test_validator_rejections_are_replaced_and_counted(validator_module):
    result = synthesize(load_synth_spec(spec(count=100, validate=[{"validator": validator_module}])))
    assert len(result.rows) == 100
    assert not any("7" in r["output"] for r in result.rows)
    assert result.rejected[validator_module] > 0
    with pytest.raises(DataError, match=rf"made 108: .*the {validator_module} validator rejected 12"):
        synthesize(load_synth_spec(spec(count=110, validate=[{"validator": validator_module}])))


def test_same_seed_same_rows_other_seed_other_rows():
    a = synthesize(load_synth_spec(spec())).rows
    assert a == synthesize(load_synth_spec(spec())).rows
    assert a != synthesize(load_synth_spec(spec()), seed=2).rows


def test_literal_braces_slot_files_chains_and_formats(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("Ada\n\nGrace\nAda\n")
    synth = load_synth_spec({
        "count": 4, "format": "chat", "instruction": "You write Cypher.",
        "slots": {"name": {"file": str(names)}, "rel": ["KNOWS", "LIKES"]},
        "templates": [{"name": "chain", "steps": [
            {"input": "Who does {name} {rel}?", "output": "MATCH (a {{name: '{name}'}})-[:{rel}]->(b)"},
            {"output": "{prev} RETURN b"}], "join": " | "}]})
    assert synth.slots["name"] == ["Ada", "Grace"]
    assert "slot name lists 1 repeated values; each counts once" in synth.warnings
    rows = synthesize(synth).rows
    outputs = {r["messages"][-1]["content"] for r in rows}
    assert "MATCH (a {name: 'Ada'})-[:KNOWS]->(b) | MATCH (a {name: 'Ada'})-[:KNOWS]->(b) RETURN b" in outputs
    assert rows[0]["messages"][0] == {"role": "system", "content": "You write Cypher."}
    assert rows[0]["metadata"]["chain_length"] == 2


def test_cypher_maps_without_double_braces_stay_literal():
    synth = load_synth_spec({"count": 2, "slots": {"s": ["a", "b"]},
                             "templates": [{"input": "status {s}", "output": "MATCH (n {status: '{s}'}) RETURN n"}]})
    assert {r["output"] for r in synthesize(synth).rows} == {"MATCH (n {status: 'a'}) RETURN n",
                                                             "MATCH (n {status: 'b'}) RETURN n"}


def test_spec_errors_are_reported_together(tmp_path):
    path = tmp_path / "synth.yaml"
    path.write_text("count: 10\ncuont: 3\nslots:\n  label: [A]\n  names: {file: missing.txt}\n"
                    "templates:\n  - name: t\n    input: '{lable}'\n    output: x\n    wieght: 2\n"
                    "  - name: t\n    output: '{label}'\n")
    with pytest.raises(RecipeError) as e:
        load_synth_spec(path)
    text = str(e.value)
    assert text.startswith(f"{path}: 5 problems:")
    assert "unknown key cuont; did you mean count?" in text
    assert "slots.names.file missing.txt does not exist" in text
    assert "templates[0].input uses {lable}, which is not a slot; did you mean {label}?" in text
    assert "unknown key templates[0].wieght; did you mean templates[0].weight?" in text
    assert "templates[1].name 't' is used twice" in text


def test_allocate_respects_capacity_and_weights():
    assert allocate(10, [1, 1], [100, 100]) == [5, 5]
    assert allocate(10, [1, 3], [100, 2]) == [8, 2]
    assert allocate(10, [1, 1], [3, 4]) == [3, 4]
    assert sum(allocate(7, [1, 1, 1], [9, 9, 9])) == 7


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "data").glob("*synth*.yaml")), ids=lambda p: p.name)
def test_example_synth_specs_load_and_make_their_count(path, monkeypatch):
    monkeypatch.chdir(REPO)
    synth = load_synth_spec(path)
    assert path.read_text().startswith("# fledge data synth ")
    assert len(synthesize(synth, count=min(synth.spec.count, 200)).rows) == min(synth.spec.count, 200)


def test_count_below_one_is_an_error_not_an_empty_file():
    synth = load_synth_spec(spec())
    for count in (0, -3):
        with pytest.raises(DataError, match=rf"count is {count}; it must be at least 1"):
            synthesize(synth, count=count)
    with pytest.raises(RecipeError, match="count is 0; it must be at least 1"):
        load_synth_spec(spec(count=0))


def test_nan_weights_are_refused_with_the_key():
    raw = spec()
    raw["templates"][1]["weight"] = float("nan")
    with pytest.raises(RecipeError, match=r"templates\[1\]\.weight is nan; it must be a finite number"):
        load_synth_spec(raw)
