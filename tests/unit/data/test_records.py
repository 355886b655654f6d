"""Every row format the fine-tuning stage reads, detected per row, with file:line for bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fledge.data.records import (OUTPUT_FORMATS, FieldMap, Record, RowProblem, expand_sources, normalize_row,
                                 read_records, scan_file)
from fledge.errors import DataError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
REPO = Path(__file__).resolve().parents[3]

# (row, prompt, response, format): one table drives the detection checks
ROWS = [
    ({"input": "int sol", "output": "sol", "metadata": {"type": "interpretation"}}, "int sol", "sol", "io"),
    ({"instruction": "To Cypher", "input": "List all File", "output": "MATCH (n:File) RETURN n"},
     "To Cypher\n\nList all File", "MATCH (n:File) RETURN n", "alpaca"),
    ({"instruction": "Say hi", "output": "hi"}, "Say hi", "hi", "alpaca"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                   {"role": "assistant", "content": "Hello."}]}, "system: Be brief.\nuser: Hi?", "Hello.", "chat"),
    ([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Arianna."}],
     "user: Who are you?", "Arianna.", "chat"),
    ({"text": "once upon a time"}, "", "once upon a time", "text"),
    ({"prompt": "2+2=", "completion": "4"}, "2+2=", "4", "prompt_completion"),
    ({"input_code": "a -> b", "output_dot": "digraph { a -> b }"}, "a -> b", "digraph { a -> b }", "io"),
    ({"input_text": "a calls b", "output_dot": "digraph { a -> b }"}, "a calls b", "digraph { a -> b }", "io"),
]


@pytest.mark.parametrize("row,prompt,response,fmt", ROWS, ids=[r[3] + str(i) for i, r in enumerate(ROWS)])
def test_each_format_is_detected(row, prompt, response, fmt):
    got_prompt, got_response, _, got_format = normalize_row(row)
    assert (got_prompt, got_response, got_format) == (prompt, response, fmt)


@pytest.mark.parametrize("fmt", [f for f in OUTPUT_FORMATS if f not in ("keep", "text", "alpaca")])
def test_converting_a_row_keeps_prompt_and_response(fmt):
    record = Record("int sol", "sol", {"type": "t"}, "x.jsonl", 1, "io", {"input": "int sol", "output": "sol"})
    prompt, response, _, _ = normalize_row(record.to_format(fmt))
    assert response == "sol"
    assert prompt.endswith("int sol")


def test_unknown_row_names_its_fields_and_the_mapping_flags(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer_cypher": "MATCH (n) RETURN n"}\n')
    [problem] = list(scan_file(path))
    assert isinstance(problem, RowProblem)
    assert str(problem).startswith(f"{path}:1: row fits no known format (fields: question, answer_cypher)")
    assert "--input-field question --output-field answer_cypher" in problem.message


def test_half_a_pair_says_which_field_is_missing():
    with pytest.raises(ValueError, match='"output" is missing; a row with "input" needs "input" and "output"'):
        normalize_row({"input": "x"})


@pytest.mark.parametrize("row,fragment", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "and?"}]}, "ends with a 'user' message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "has role 'bot'"),
    ({"input": "x", "output": 3}, '"output" must be a string, got a number'),
    ({"input": "x", "output": "y", "metadata": "t"}, '"metadata" must be an object'),
    ("just a string", "not a string"),
])
def test_bad_rows_say_what_is_wrong(row, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        normalize_row(row)


def test_jsonl_problems_carry_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "a", \n{"input": "c", "output": ""}\n'
                    '{"input": "d", "output": "e"}\n')
    items = list(scan_file(path))
    assert [(type(i).__name__, i.line) for i in items] == [("Record", 1), ("RowProblem", 3), ("RowProblem", 4),
                                                          ("Record", 5)]
    assert "not valid JSON" in items[1].message
    assert items[2].message == "the output is empty, so there is nothing to learn"


def test_bytes_that_are_not_utf8_are_a_row_problem(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "bom ok"}\n{"text": "caf\xe9"}\n')
    items = list(scan_file(path))
    assert items[0].response == "bom ok"
    assert (items[1].line, items[1].message) == (2, "not UTF-8 text (byte 14 of the line); save the file as UTF-8")


def test_json_array_rows_get_the_line_they_start_on(tmp_path):
    rows = [{"input_code": "a", "output_dot": "digraph {\n a }"}, {"input_code": "b", "output_dot": "x"}]
    path = tmp_path / "dot.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r, indent=2) for r in rows) + "\n]\n")
    lines = [r.line for r in scan_file(path)]
    text = path.read_text().splitlines()
    assert [text[n - 1].strip() for n in lines] == ["{", "{"]
    assert lines[0] == 2 and lines[1] > lines[0] + 2


def test_json_object_holding_the_rows(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text('{"meta": {"n": 2},\n "rows": [\n  {"text": "a"},\n  {"text": "b"}\n ]\n}\n')
    assert [(r.response, r.line) for r in scan_file(path)] == [("a", 3), ("b", 4)]


def test_csv_rows_spanning_lines_keep_their_first_line(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('question,cypher,type\nWho?,"MATCH (n)\nRETURN n",simple\nHow many?,"MATCH (n)\nRETURN '
                    'count(n)",agg\n')
    records = list(scan_file(path, FieldMap("question", "cypher")))
    assert [(r.prompt, r.line, r.get("type")) for r in records] == [("Who?", 2, "simple"), ("How many?", 4, "agg")]


def test_field_map_falls_back_to_detection_for_rows_without_those_fields(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"q": "a", "a": "b"}\n{"input": "c", "output": "d"}\n')
    records = list(scan_file(path, FieldMap("q", "a")))
    assert [(r.prompt, r.response, r.format) for r in records] == [("a", "b", "mapped"), ("c", "d", "io")]


def test_read_records_stops_at_the_first_bad_row_with_the_fix(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n{"inptu": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: .*Fix the row or rerun with --drop-invalid"):
        list(read_records([path]))
    problems: list = []
    assert len(list(read_records([path], drop_invalid=True, problems=problems))) == 1
    assert problems[0].line == 2


def test_get_reads_dotted_paths_metadata_and_the_source_file():
    record = Record("p", "r", {"type": "completion"}, "a.jsonl", 3, "io",
                    {"input": "p", "output": "r", "metadata": {"type": "completion"}})
    assert record.get("metadata.type") == "completion"
    assert record.get("type") == "completion"
    assert record.get("@file") == "a.jsonl"
    assert record.get("metadata.missing") is None


def test_repeats_input_per_format():
    def rec(row):
        prompt, response, metadata, fmt = normalize_row(row)
        return Record(prompt, response, metadata, "x", 1, fmt, row)
    assert rec({"input": "a b", "output": " a b"}).repeats_input
    assert rec({"instruction": "copy", "input": "a", "output": "a"}).repeats_input
    assert rec([{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"}]).repeats_input
    assert not rec({"input": "a", "output": "b"}).repeats_input
    assert not rec({"text": "a"}).repeats_input


def test_missing_source_names_it_and_the_data_files_beside_it(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"no such file: .*trian\.jsonl\. Data files next to it: .*train\.jsonl"):
        expand_sources([tmp_path / "trian.jsonl"])


def test_folders_expand_to_their_data_files_sorted(tmp_path):
    for name in ("b.jsonl", "a.csv", "notes.txt", "sub/c.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    assert [p.name for p in expand_sources([tmp_path])] == ["a.csv", "b.jsonl", "c.json"]


@pytest.mark.parametrize("relative,count,formats", [
    ("arianna/arianna_conversations.jsonl", 171, {"chat"}),
    ("nornicdb/cypher_training_count1000_seed42.jsonl", 885, {"alpaca"}),
    ("nornicdb/tlp_chat.jsonl", 2, {"chat"}),
    ("nornicdb/tlp_evaluation.jsonl", 5, {"alpaca"}),
])
def test_real_files_read_without_problems(relative, count, formats):
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    items = list(scan_file(path))
    assert all(isinstance(i, Record) for i in items)
    assert len(items) == count and {i.format for i in items} == formats


def _loaders() -> dict:
    from fledge.data.check import load_check_config
    from fledge.data.extract import load_extract_config
    from fledge.data.pairs import load_pairs_config, strategies_of
    from fledge.data.synthesize import load_synth_spec
    return {"extract": load_extract_config, "pairs": lambda p: strategies_of(load_pairs_config(p)),
            "synth": load_synth_spec, "check": load_check_config}


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "data").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_data_recipe_opens_with_its_command_and_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# fledge data "), f"{path} must open with the command that runs it"
    verb = first.split()[3]
    _loaders()[verb](path)
