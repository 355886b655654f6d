"""Every row format the fine-tuning stage reads, detected per row, with file:line for bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fledge.data.records import (FORMATS, OUTPUT_FORMATS, FieldMap, Record, RowProblem, expand_sources,
                                 format_problem, normalize_row, read_records, read_row, scan_file)
from fledge.errors import DataError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
REPO = Path(__file__).resolve().parents[3]

U, A, S = "user", "assistant", "system"


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# (row, messages, prompt, format): one table drives the detection checks. The prompt is the data
# tools' text form: one user turn as it is, "system, blank line, user", or "role: content" lines.
ROWS = [
    ({"input": "int sol", "output": "sol", "metadata": {"type": "interpretation"}},
     chat((U, "int sol"), (A, "sol")), "int sol", "io"),
    ({"instruction": "To Cypher", "input": "List all File", "output": "MATCH (n:File) RETURN n"},
     chat((U, "To Cypher\n\nList all File"), (A, "MATCH (n:File) RETURN n")), "To Cypher\n\nList all File", "alpaca"),
    ({"instruction": "Say hi", "output": "hi"}, chat((U, "Say hi"), (A, "hi")), "Say hi", "alpaca"),
    ({"instruction": "Say hi", "input": None, "output": "hi"}, chat((U, "Say hi"), (A, "hi")), "Say hi", "alpaca"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                   {"role": "assistant", "content": "Hello.", "name": "bot"}]},
     chat((S, "Be brief."), (U, "Hi?"), (A, "Hello.")), "Be brief.\n\nHi?", "chat"),
    ([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Arianna."}],
     chat((U, "Who are you?"), (A, "Arianna.")), "Who are you?", "chat"),
    ({"messages": chat((S, "Be brief."), (U, "a"), (A, "b"), (U, "c"), (A, "d"))},
     chat((S, "Be brief."), (U, "a"), (A, "b"), (U, "c"), (A, "d")),
     "system: Be brief.\nuser: a\nassistant: b\nuser: c", "chat"),
    ({"text": "once upon a time"}, chat((A, "once upon a time")), "", "text"),
    ({"prompt": "2+2=", "completion": "4"}, chat((U, "2+2="), (A, "4")), "2+2=", "prompt_completion"),
    ({"input_code": "a -> b", "output_dot": "digraph { a -> b }"}, chat((U, "a -> b"), (A, "digraph { a -> b }")),
     "a -> b", "io"),
    ({"input_text": "a calls b", "output_dot": "digraph { a -> b }"},
     chat((U, "a calls b"), (A, "digraph { a -> b }")), "a calls b", "io"),
]


@pytest.mark.parametrize("row,messages,prompt,fmt", ROWS, ids=[r[3] + str(i) for i, r in enumerate(ROWS)])
def test_each_format_is_detected_and_keeps_its_messages(row, messages, prompt, fmt):
    got_messages, _, got_format = read_row(row)
    assert (got_messages, got_format) == (messages, fmt)
    assert normalize_row(row)[:2] == (prompt, messages[-1]["content"])
    if fmt != "text" and "output_dot" not in row:   # a forced format reads its own rows the same way
        assert read_row(row, fmt=fmt)[0] == messages


@pytest.mark.parametrize("row,messages,prompt,fmt", ROWS, ids=[r[3] + str(i) for i, r in enumerate(ROWS)])
@pytest.mark.parametrize("to", [f for f in OUTPUT_FORMATS if f != "keep"])
def test_every_format_writes_what_reads_back(row, messages, prompt, fmt, to):
    record = Record(messages, {"type": "t"}, "x.jsonl", 1, fmt, row)
    written = record.to_format(to)
    assert written["metadata"] == {"type": "t"}
    back_messages, _, back_format = read_row(written)
    assert back_format == to
    back = Record(back_messages, {}, "x", 1, back_format, written)
    if to == "text":   # a plain completion: prompt and response are one text
        assert back.response == (f"{record.prompt}\n{record.response}" if record.prompt else record.response)
        return
    assert back.response == record.response
    assert back.prompt == record.prompt   # alpaca: a system message as the instruction reads back as the prompt
    if to == "chat":
        assert back_messages == messages


def test_alpaca_writes_a_system_message_as_its_instruction():
    record = Record.pair("List all File", "MATCH (n:File) RETURN n", system="To Cypher")
    assert record.to_format("alpaca") == {"instruction": "To Cypher", "input": "List all File",
                                          "output": "MATCH (n:File) RETURN n"}
    assert Record.pair("Say hi", "hi").to_format("alpaca") == {"instruction": "Say hi", "input": "", "output": "hi"}
    # the formats without a system role keep it as the prompt's first paragraph
    assert record.to_format("io") == {"input": "To Cypher\n\nList all File", "output": "MATCH (n:File) RETURN n"}


@pytest.mark.parametrize("fmt", ["io", "alpaca", "chat", "prompt_completion", "text"])
def test_synthesize_writes_rows_through_to_format(fmt):
    from fledge.data.synthesize import SynthSpec, Synth, _finish_row
    spec = SynthSpec(format=fmt, instruction="You write Cypher.")
    synth = Synth.__new__(Synth)
    synth.spec = spec
    row = _finish_row(synth, {"_in": "List all File", "_out": "MATCH (n:File) RETURN n", "metadata": {"type": "t"}})
    expected = Record.pair("List all File", "MATCH (n:File) RETURN n", {"type": "t"},
                           system="You write Cypher.").to_format(fmt)
    assert row == expected
    if fmt == "alpaca":
        assert (row["instruction"], row["input"]) == ("You write Cypher.", "List all File")


def test_forced_format_reads_every_row_as_it_and_names_the_misfits(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{"input": "c", "output": "d"}\n'
                    '[{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]\n')
    items = list(scan_file(path, fmt="chat"))
    assert [type(i).__name__ for i in items] == ["Record", "RowProblem", "Record"]
    assert str(items[1]) == (f'{path}:2: not a chat row, the format this source is read as: "messages" is missing '
                             f'(fields: input, output); a chat row is {{"messages": [...]}} or a bare array of '
                             f'messages. '
                             f'A chat row is {FORMATS["chat"].shape}')
    io = list(scan_file(path, fmt="io"))
    assert [type(i).__name__ for i in io] == ["RowProblem", "Record", "RowProblem"]
    assert io[0].message.startswith('not an io row, the format this source is read as: "input" and "output" are '
                                    'missing (fields: messages)')
    assert io[2].message.startswith("not an io row, the format this source is read as: a row is a "
                                    '{"input", "output"} object, not an array')


def test_forced_format_with_a_field_map(tmp_path):
    path = tmp_path / "dot.jsonl"
    path.write_text('{"input_code": "a", "output_dot": "digraph {}"}\n{"input": "b", "output": "c"}\n')
    items = list(scan_file(path, FieldMap("input_code", "output_dot"), fmt="io"))
    assert (items[0].messages, items[0].format) == (chat((U, "a"), (A, "digraph {}")), "mapped")
    assert items[1].message.startswith('not an io row, the format this source is read as: "input_code" and '
                                       '"output_dot" are missing (fields: input, output)')
    assert format_problem("chat", FieldMap("q", "a")).startswith("a field map (input_field 'q', output_field 'a') "
                                                                 "names the two fields of a pair")
    with pytest.raises(ValueError, match="applies to formats auto, io and prompt_completion, not text"):
        list(scan_file(path, FieldMap("q", "a"), fmt="text"))


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
    record = Record(chat((U, "p"), (A, "r")), {"type": "completion"}, "a.jsonl", 3, "io",
                    {"input": "p", "output": "r", "metadata": {"type": "completion"}})
    assert record.get("metadata.type") == "completion"
    assert record.get("type") == "completion"
    assert record.get("@file") == "a.jsonl"
    assert record.get("metadata.missing") is None


def test_repeats_input_per_format():
    def rec(row):
        messages, metadata, fmt = read_row(row)
        return Record(messages, metadata, "x", 1, fmt, row)
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


@pytest.mark.parametrize("relative,count,formats,empty", [
    ("arianna/arianna_conversations.jsonl", 171, {"chat"}, 0),
    ("nornicdb/cypher_training_count1000_seed42.jsonl", 885, {"alpaca"}, 0),
    ("nornicdb/tlp_chat.jsonl", 2, {"chat"}, 0),
    ("nornicdb/tlp_evaluation.jsonl", 5, {"alpaca"}, 0),
    ("dot/smcat_pairs.json", 162, {"io"}, 0),
    ("limn/limn_train_first3000.jsonl", 2995, {"io"}, 5),   # 5 real rows with an empty output
])
def test_real_files_read_without_problems(relative, count, formats, empty):
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    items = list(scan_file(path))
    records = [i for i in items if isinstance(i, Record)]
    problems = [i for i in items if isinstance(i, RowProblem)]
    assert len(records) == count and {i.format for i in records} == formats
    assert [p.message for p in problems] == ["the output is empty, so there is nothing to learn"] * empty


def test_real_dot_pairs_read_with_a_field_map_and_a_forced_format():
    path = SHARED / "dot/smcat_pairs.json"
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    items = list(scan_file(path, FieldMap("input_code", "output_dot"), fmt="io"))
    assert len(items) == 162 and {i.format for i in items} == {"mapped"}
    assert items[0].messages[1]["content"].startswith("digraph")


# --- Parquet ----------------------------------------------------------------------------------

def write_parquet(path: Path, columns: dict, row_group_size: int = 2) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_rows_read_like_json_rows_numbered_from_one(tmp_path):
    messages = [chat((U, "hi"), (A, "yo")), chat((S, "Be brief."), (U, "a"), (A, "b")), chat((U, "c"), (A, "d"))]
    path = write_parquet(tmp_path / "chat.parquet", {"messages": messages, "metadata": [{"type": "x"}] * 3})
    items = list(scan_file(path))
    assert [(i.line, i.messages, i.format, i.get("type")) for i in items] == [
        (n, m, "chat", "x") for n, m in enumerate(messages, 1)]
    pairs = write_parquet(tmp_path / "pairs.parquet", {"input_code": ["a", "b", "c"], "output_dot": ["x", "", "z"]})
    items = list(scan_file(pairs, FieldMap("input_code", "output_dot"), fmt="io"))
    assert [type(i).__name__ for i in items] == ["Record", "RowProblem", "Record"]
    assert str(items[1]) == f"{pairs}:2: the output is empty, so there is nothing to learn"


def test_parquet_values_a_json_row_cannot_hold_are_bad_rows(tmp_path):
    import datetime
    path = write_parquet(tmp_path / "odd.parquet", {
        "input": ["a", "b", "c", "d"], "output": ["w", "x", "y", "z"],
        "score": [1.0, float("nan"), 2.0, 3.0],
        "when": [None, None, datetime.datetime(2024, 1, 1), None]})
    items = list(scan_file(path))
    assert [type(i).__name__ for i in items] == ["Record", "RowProblem", "RowProblem", "Record"]
    assert items[1].message.startswith("column 'score' holds nan (pandas writes NaN for a missing number)")
    assert items[2].message.startswith("column 'when' holds a datetime value, which a row cannot hold")


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    import sys
    from fledge.errors import DependencyError
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DependencyError, match=r"rows\.parquet: reading \.parquet files needs pyarrow\. Install it: "
                                              r"pip install pyarrow"):
        list(scan_file(path))


def test_a_file_that_is_not_parquet_is_one_error(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "rows.parquet"
    path.write_text('{"input": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"rows\.parquet: not a readable Parquet file \(.*\)\. Check the file, or "
                                        r"convert it to \.jsonl"):
        list(scan_file(path))


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
