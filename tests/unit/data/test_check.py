"""check: planted duplicates, near duplicates, leakage and bad rows are found with their lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fledge.data.check import CheckConfig, check, length_histogram, load_check_config, load_token_counter
from fledge.errors import DataError, RecipeError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
REPO = Path(__file__).resolve().parents[3]

SENTENCES = [f"the {a} {b} walks past the {c} river at dawn number {i}" for i, (a, b, c) in enumerate(
    (a, b, c) for a in ("red", "tall", "quiet", "old") for b in ("fox", "heron", "miller") for c in ("wide", "cold"))]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"input": f"q{i}: {s}", "output": f"answer {i}: {s[::-1]}", "metadata": {"type": "long"}}
            for i, s in enumerate(SENTENCES)]                                      # lines 1..24, all distinct
    rows.append(dict(rows[2]))                                                       # line 25: exact copy of 3
    rows.append({**rows[5], "output": rows[5]["output"] + "!"})                      # line 26: near copy of 6
    rows.append({"input": "same", "output": "same", "metadata": {"type": "echo"}})  # line 27: input == output
    rows.append('{"input": "broken"')                                                # line 28: bad JSON
    rows.append({"question": "q", "answer_text": "a"})                               # line 29: no format
    train = write(tmp_path / "train.jsonl", rows)
    val = write(tmp_path / "val.jsonl", [
        rows[7],                                                                     # line 1: verbatim leak of 8
        {**rows[9], "input": rows[9]["input"] + "?"},                                # line 2: near leak of 10
        {"input": rows[11]["input"], "output": "a different answer altogether"},     # line 3: same input only
        {"input": "fresh question", "output": "fresh answer"},                       # line 4: clean
    ])
    return train, val


def test_planted_problems_are_found_with_their_lines(planted):
    train, val = planted
    report = check([train], CheckConfig(), val=[val])
    assert report.rows == 27 and report.invalid == 2
    assert report.finding("schema").examples[0].startswith(f"{train}:28: not valid JSON")
    assert report.finding("schema").examples[1].startswith(f"{train}:29: row fits no known format")
    assert report.finding("duplicates").examples == [f"{train}:25 repeats {train}:3"]
    assert report.finding("near_duplicates").examples == [f"{train}:26 nearly repeats {train}:6"]
    assert report.finding("identity").examples == [f"{train}:27"]
    assert report.finding("leakage").examples == [f"{val}:1 is {train}:8"]
    assert report.finding("near_leakage").examples == [f"{val}:2 ~ {train}:10"]
    assert report.finding("prompt_leakage").examples == [f"{val}:3"]
    assert {f.check for f in report.errors} == {"schema", "duplicates", "identity", "leakage", "near_leakage"}
    assert {f.check for f in report.warnings} == {"near_duplicates", "prompt_leakage"}
    assert not report.ok


def test_thresholds_move_findings_between_errors_and_warnings(planted):
    train, _ = planted
    lenient = CheckConfig(max_invalid_rows=2, max_duplicate_rate=0.05, max_identity_rate=0.05,
                          max_near_duplicate_rate=0.01)
    report = check([train], lenient)
    assert [f.check for f in report.errors] == ["near_duplicates"]
    assert {f.check for f in report.warnings} == {"schema", "duplicates", "identity"}
    report = check([train], CheckConfig(max_invalid_rows=2, max_duplicate_rate=0.05, max_identity_rate=0.05,
                                        near_duplicates=False))
    assert report.ok and report.finding("near_duplicates") is None
    assert not check([train], CheckConfig(max_invalid_rows=2, max_duplicate_rate=0.05, max_identity_rate=0.05,
                                          near_duplicates=False, strict=True)).ok


def test_clean_file_passes(tmp_path):
    path = write(tmp_path / "ok.jsonl", [{"input": f"q {s}", "output": f"a {i}"} for i, s in enumerate(SENTENCES)])
    report = check([path])
    assert report.ok and not report.findings
    assert report.format().endswith("OK")


def test_report_text_and_json_keep_errors_and_warnings_apart(planted):
    train, val = planted
    report = check([train], CheckConfig(category_field="metadata.type"), val=[val])
    text = report.format()
    errors, warnings = text.split("Warnings")
    assert "x 1 exact duplicate rows" in errors and "near-duplicate" not in errors
    assert "! 1 near-duplicate rows" in warnings
    assert f"{train}:25 repeats {train}:3" in errors
    assert "Categories (metadata.type): 2 values" in text and text.endswith("FAILED: 5 errors")
    data = json.loads(json.dumps(report.to_dict()))
    assert [e["check"] for e in data["errors"]] == ["schema", "duplicates", "identity", "leakage", "near_leakage"]
    assert data["ok"] is False and data["stats"]["categories"]["counts"] == {"long": 26, "echo": 1}
    assert data["problems"][0].startswith(f"{train}:28")


def test_lengths_in_tokens_with_truncation(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"]))
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    rows = [{"input": s, "output": "the fox"} for s in SENTENCES]
    path = write(tmp_path / "t.jsonl", rows)
    counts = [len(tok.encode(f"{r['input']}\n{r['output']}").ids) for r in rows]
    limit = sorted(counts)[len(counts) // 2]
    report = check([path], CheckConfig(tokenizer=str(folder), max_length=limit))
    lengths = report.stats["lengths"]
    assert lengths["unit"] == "tokens" and lengths["max"] == max(counts)
    assert report.count("truncation") == sum(c > limit for c in counts) > 0
    assert sum(n for _, _, n in lengths["histogram"]) == len(rows)
    assert "(over max length)" in report.format()
    assert load_token_counter(str(folder / "tokenizer.json"))(["the fox"]) == [len(tok.encode("the fox").ids)]


def test_lengths_in_tokens_of_a_fledge_tokenizer(tmp_path):
    from fledge.recipe import TokenizerConfig
    from fledge.tokenizer import train_tokenizer
    tok = train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), SENTENCES)
    tok.save(tmp_path / "tok")
    rows = [{"input": s, "output": "ok"} for s in SENTENCES[:5]]
    report = check([write(tmp_path / "t.jsonl", rows)], CheckConfig(tokenizer=str(tmp_path / "tok")))
    assert report.stats["lengths"]["unit"] == "tokens"
    assert report.stats["lengths"]["max"] == max(len(tok.encode(f"{r['input']}\nok")) for r in rows)


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(DataError, match=r"no such tokenizer: .*nope"):
        load_token_counter(str(tmp_path / "nope"))


def test_histogram_covers_every_row():
    import numpy as np
    lengths = np.array([3, 4, 4, 9, 40, 41])
    bins = length_histogram(lengths, 4)
    assert bins[0][0] == 3 and bins[-1][1] >= 41 and sum(b[2] for b in bins) == 6 and len(bins) <= 4


def test_category_balance_warns_about_rare_values(tmp_path):
    rows = [{"input": f"q{i}", "output": f"a{i}", "metadata": {"type": "big"}} for i in range(200)]
    rows.append({"input": "q", "output": "a", "metadata": {"type": "rare"}})
    rows.append({"input": "q2", "output": "a2"})
    report = check([write(tmp_path / "c.jsonl", rows)], CheckConfig(category_field="metadata.type"))
    assert report.finding("category_balance").examples == ["rare: 1 rows (0.50%)"]
    assert report.count("category_missing") == 1
    assert report.ok


def test_validator_pass_rates(tmp_path, monkeypatch):
    (tmp_path / "check_validators.py").write_text("def starts_match(text):\n    return text.startswith('MATCH')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"input": f"q{i}", "output": "MATCH (n) RETURN n" if i % 4 else f"SELECT {i}"} for i in range(40)]
    path = write(tmp_path / "v.jsonl", rows)
    report = check([path], CheckConfig(validators=["output=check_validators:starts_match"]))
    stats = report.stats["validators"]["output=check_validators:starts_match"]
    assert (stats["passed"], stats["failed"], stats["pass_rate"]) == (30, 10, 0.75)
    finding = report.finding("validator:output=check_validators:starts_match")
    assert finding.level == "error" and finding.examples[0].startswith(f"{path}:1: ")
    relaxed = check([path], CheckConfig(validators=["output=check_validators:starts_match"], min_valid_rate=0.7))
    assert relaxed.ok and relaxed.warnings


def test_validator_flag_must_name_field_and_validator(tmp_path):
    with pytest.raises(RecipeError, match=r"validators\[0\]: --validate 'cypher': write FIELD=VALIDATOR"):
        load_check_config({"validators": ["cypher"]})


def test_check_config_file_names_bad_keys(tmp_path):
    path = tmp_path / "check.yaml"
    path.write_text("max_duplicate_rat: 0.1\nnear:\n  threshhold: 0.9\n")
    with pytest.raises(RecipeError) as e:
        load_check_config(path)
    assert "unknown key max_duplicate_rat; did you mean max_duplicate_rate?" in str(e.value)
    assert "unknown key near.threshhold; did you mean near.threshold?" in str(e.value)


def _peak_bytes(paths: list[Path]) -> tuple[int, object]:
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        report = check(paths, CheckConfig(near_duplicates=False))
        return tracemalloc.get_traced_memory()[1], report
    finally:
        tracemalloc.stop()


def test_memory_per_row_does_not_depend_on_files(tmp_path):
    rows = [{"input": f"question {i} " + "w" * 40, "output": f"answer {i} " + "v" * 40} for i in range(1200)]
    one = write(tmp_path / "one.jsonl", rows)
    many = [write(tmp_path / f"part{k:03d}.jsonl", rows[k * 10:(k + 1) * 10]) for k in range(120)]
    half = write(tmp_path / "half.jsonl", rows[:600])
    _peak_bytes([half])                              # warm up: lazy imports and caches are not rows
    (peak_one, a), (peak_many, b), (peak_half, _) = _peak_bytes([one]), _peak_bytes(many), _peak_bytes([half])
    assert a.rows == b.rows == 1200 and a.ok and b.ok
    per_row = (peak_one - peak_half) / 600          # what one more row costs at the peak
    assert per_row < 2_500, f"{per_row:.0f} bytes per row"
    # 120 files instead of 1: the same rows, so the same memory, give or take a few bytes per file
    assert peak_many < peak_one + 120 * 600, (peak_one, peak_many)


def test_limn_first3000_duplicates_and_identity_rows():
    path = SHARED / "limn" / "limn_train_first3000.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    report = check([path], CheckConfig(category_field="metadata.type"))
    assert report.rows + report.invalid == 3000
    assert report.invalid == 5
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in report.problems] == ["898", "1553", "1821", "1997", "2851"]
    assert report.count("duplicates") == 651
    assert report.count("identity") == 718
    assert report.count("near_duplicates") == 238
    assert report.finding("duplicates").examples[0] == f"{path}:11 repeats {path}:6"
    assert report.finding("identity").examples[0] == f"{path}:5"
    assert not report.ok


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "data").glob("*check*.yaml")), ids=lambda p: p.name)
def test_example_check_configs_load(path):
    assert path.read_text().startswith("# fledge data check ")
    load_check_config(path)


def test_empty_inputs_are_an_error_not_ok(tmp_path):
    empty = write(tmp_path / "empty.jsonl", [])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    report = check([empty, blank])
    assert not report.ok and [f.check for f in report.errors] == ["no_rows"]
    assert report.errors[0].message.startswith(f"no training rows: {empty}, {blank} hold no rows")
    assert report.format().endswith("FAILED: 1 error")
    good = write(tmp_path / "good.jsonl", [{"input": "q", "output": "a"}])
    assert [f.check for f in check([good], val=[empty]).errors] == ["val_no_rows"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"no data files in .*folder"):
        check([tmp_path / "folder"])


def test_check_config_refuses_nan_and_infinity(tmp_path):
    path = tmp_path / "check.yaml"
    path.write_text("max_duplicate_rate: .nan\nnear:\n  threshold: .inf\nmin_valid_rate: nan\n")
    with pytest.raises(RecipeError) as e:
        load_check_config(path)
    text = str(e.value)
    for key in ("max_duplicate_rate is nan", "near.threshold is inf", "min_valid_rate is nan"):
        assert f"{key}; it must be a finite number" in text
    with pytest.raises(RecipeError, match="max_identity_rate is nan; it must be a finite number"):
        check([write(tmp_path / "t.jsonl", [{"input": "q", "output": "a"}])],
              CheckConfig(max_identity_rate=float("nan")))


def test_a_tokenizer_folder_with_its_own_code_is_refused_and_the_code_never_runs(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
    (folder / "evil_tok.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(DataError) as e:
        load_token_counter(str(folder))
    assert str(e.value).startswith(f"{folder}: this tokenizer needs its own Python code (auto_map in "
                                   f"tokenizer_config.json), and fledge does not run code")
    assert "\n" not in str(e.value) and not marker.exists()


def test_transformers_is_told_not_to_trust_remote_code(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise OSError("no vocabulary")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match=r"transformers could not load it \(OSError: no vocabulary\)"):
        load_token_counter(str(tmp_path))
    assert seen == {"local_files_only": True, "trust_remote_code": False}
