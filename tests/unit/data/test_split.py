"""split and merge: no leakage for any seed or ratio, groups whole, strata in proportion."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fledge.data.dedupe import NearOptions
from fledge.data.split import MergeOptions, SplitOptions, assign_split, merge, split
from fledge.errors import DataError, RecipeError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def dataset(n: int, seed: int = 0) -> list[dict]:
    """n rows over 5 types and 12 source files, with some exact and near copies planted."""
    rng = random.Random(seed)
    words = "sol lux gro vel lun nox whe joi sa cut mov res".split()
    rows = []
    for i in range(n):
        if rows and rng.random() < 0.1:
            rows.append(dict(rng.choice(rows)))
            continue
        text = " ".join(rng.choice(words) for _ in range(6)) + f" {i}"
        rows.append({"input": f"int {text}", "output": text,
                     "metadata": {"type": f"t{i % 5}", "file": f"f{rng.randrange(12)}.limn"}})
    return rows


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.9, 0.97])
def test_split_never_leaks_and_loses_nothing(tmp_path, seed, ratio):
    src = write(tmp_path / "all.jsonl", dataset(150, seed))
    report = split([src], tmp_path / "train.jsonl", tmp_path / "val.jsonl",
                   SplitOptions(ratio=ratio, seed=seed, dedupe="none"))
    train, val = read(tmp_path / "train.jsonl"), read(tmp_path / "val.jsonl")
    key = lambda r: (r["input"], r["output"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, read(src)))
    assert abs(len(val) - round(150 * (1 - ratio))) <= 3
    assert report.leaked_exact == 0 and report.leaked_near == 0
    assert (report.train, report.val) == (len(train), len(val))


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    src = write(tmp_path / "all.jsonl", dataset(200))
    runs = []
    for seed in (1, 1, 2):
        split([src], tmp_path / "t.jsonl", tmp_path / "v.jsonl", SplitOptions(seed=seed))
        runs.append((tmp_path / "v.jsonl").read_text())
    assert runs[0] == runs[1] != runs[2]


def test_grouped_split_keeps_groups_whole(tmp_path):
    src = write(tmp_path / "all.jsonl", dataset(300))
    report = split([src], tmp_path / "t.jsonl", tmp_path / "v.jsonl",
                   SplitOptions(group="metadata.file", ratio=0.75, seed=3))
    train_files = {r["metadata"]["file"] for r in read(tmp_path / "t.jsonl")}
    val_files = {r["metadata"]["file"] for r in read(tmp_path / "v.jsonl")}
    assert train_files and val_files and not train_files & val_files
    assert report.groups == 12


def test_group_by_source_file(tmp_path):
    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(120)]
    files = [write(tmp_path / f"src{k}.jsonl", rows[k * 20:(k + 1) * 20]) for k in range(6)]
    report = split(files, tmp_path / "t.jsonl", tmp_path / "v.jsonl", SplitOptions(group="@file", ratio=0.5,
                                                                                  seed=0))
    origin = {r["input"]: k for k in range(6) for r in rows[k * 20:(k + 1) * 20]}
    sides = [{origin[r["input"]] for r in read(tmp_path / name)} for name in ("t.jsonl", "v.jsonl")]
    assert len(sides[0]) == len(sides[1]) == 3 and not sides[0] & sides[1]
    assert report.groups == 6 and report.units == 6


def test_a_split_that_cannot_reach_its_ratio_says_so(tmp_path):
    rows = [{"input": f"q{i}", "output": f"a{i}", "metadata": {"file": "one" if i < 90 else "two"}}
            for i in range(100)]
    src = write(tmp_path / "g.jsonl", rows)
    report = split([src], tmp_path / "t.jsonl", tmp_path / "v.jsonl", SplitOptions(group="metadata.file",
                                                                                  ratio=0.5))
    assert (report.train, report.val) == (90, 10)
    assert "warning: validation has 10 rows where 50 were asked" in report.summary()


def test_stratified_split_keeps_proportions(tmp_path):
    rows = [{"input": f"q{i}", "output": f"a{i}", "metadata": {"type": t}}
            for i, t in enumerate(["common"] * 600 + ["middle"] * 300 + ["rare"] * 40)]
    src = write(tmp_path / "s.jsonl", rows)
    report = split([src], tmp_path / "t.jsonl", tmp_path / "v.jsonl",
                   SplitOptions(stratify="metadata.type", ratio=0.9, seed=5))
    val = Counter(r["metadata"]["type"] for r in read(tmp_path / "v.jsonl"))
    assert val == {"common": 60, "middle": 30, "rare": 4}
    assert report.strata == {"common": [540, 60], "middle": [270, 30], "rare": [36, 4]}
    assert "rare" in report.summary()


def test_near_duplicates_stay_on_one_side(tmp_path):
    base = [{"input": f"question number {i} about the river", "output": f"answer {i} the river flows east"}
            for i in range(100)]
    near = [{**r, "output": r["output"] + "."} for r in base[:30]]
    src = write(tmp_path / "n.jsonl", base + near)
    report = split([src], tmp_path / "t.jsonl", tmp_path / "v.jsonl", SplitOptions(ratio=0.7, seed=2))
    assert report.leaked_near == 0
    loose = split([src], tmp_path / "t.jsonl", tmp_path / "v.jsonl",
                  SplitOptions(ratio=0.5, seed=2, keep_near_together=False))
    assert loose.leaked_near is None


def test_assign_split_units_and_targets():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5, 6])
    is_val, units = assign_split(10, 0.7, seed=0, links=[labels])
    assert units == 7 and is_val.sum() == 3
    assert len({bool(v) for v in is_val[labels == 0]}) == 1 and len({bool(v) for v in is_val[labels == 1]}) == 1


def test_merge_drops_exact_and_near_duplicates_and_converts(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"input": "int sol lux gro", "output": "sol lux gro"},
                                     {"input": "int sol lux gro", "output": "sol lux gro"}])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"instruction": "Convert", "input": "List all File",
                              "output": "MATCH (n:File) RETURN n"},
                             {"input_text": "int sol lux gro", "output_dot": "sol lux gro "}]))
    report = merge([a, b], tmp_path / "m.jsonl", MergeOptions(dedupe="near", to="io"))
    rows = read(tmp_path / "m.jsonl")
    assert rows == [{"input": "int sol lux gro", "output": "sol lux gro"},
                    {"input": "Convert\n\nList all File", "output": "MATCH (n:File) RETURN n"}]
    assert (report.exact_dropped, report.near_dropped, report.written) == (1, 1, 2)
    assert report.per_source == {str(a): [2, 1], str(b): [2, 1]}
    kept = merge([a, b], tmp_path / "k.jsonl", MergeOptions(dedupe="exact"))
    assert kept.written == 3 and read(tmp_path / "k.jsonl")[2] == {"input_text": "int sol lux gro",
                                                                    "output_dot": "sol lux gro "}


def test_bad_rows_stop_a_merge_unless_dropped(tmp_path):
    src = write(tmp_path / "x.jsonl", [{"input": "a", "output": "b"}, {"inptu": "a", "output": "c"}])
    with pytest.raises(DataError, match=r"x\.jsonl:2: .*rerun with --drop-invalid"):
        merge([src], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
    report = merge([src], tmp_path / "m.jsonl", MergeOptions(drop_invalid=True))
    assert report.written == 1 and report.invalid[0].line == 2


def test_real_limn_split_has_no_leakage(tmp_path):
    path = SHARED / "limn" / "limn_train_first3000.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    report = split([path], tmp_path / "t.jsonl", tmp_path / "v.jsonl",
                   SplitOptions(drop_invalid=True, stratify="metadata.type", seed=1))
    assert report.exact_dropped == 651 and len(report.invalid) == 5
    assert report.train + report.val == 3000 - 651 - 5
    assert report.leaked_exact == 0 and report.leaked_near == 0


def test_a_failed_split_leaves_no_temp_files_and_the_old_outputs(tmp_path, monkeypatch):
    from fledge.data.records import Record
    src = write(tmp_path / "all.jsonl", dataset(60))
    (tmp_path / "out").mkdir()
    train, val = tmp_path / "out" / "train.jsonl", tmp_path / "out" / "val.jsonl"
    train.write_text("old train\n")
    val.write_text("old val\n")
    real, calls = Record.to_format, []

    def failing(self, fmt):
        calls.append(fmt)
        if len(calls) == 30:
            raise DataError("trouble in the middle of writing")
        return real(self, fmt)
    monkeypatch.setattr(Record, "to_format", failing)
    with pytest.raises(DataError, match="trouble in the middle"):
        split([src], train, val, SplitOptions(ratio=0.5))
    assert (train.read_text(), val.read_text()) == ("old train\n", "old val\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.jsonl", "val.jsonl"]
    monkeypatch.setattr(Record, "to_format", real)
    report = split([src], train, val, SplitOptions(ratio=0.5))
    assert len(read(train)) == report.train and len(read(val)) == report.val


def test_outputs_never_overwrite_inputs_or_each_other(tmp_path):
    src = write(tmp_path / "all.jsonl", dataset(20))
    before = src.read_text()
    with pytest.raises(DataError, match=r"output .*all\.jsonl is also an input"):
        merge([src], tmp_path / "." / "all.jsonl")
    with pytest.raises(DataError, match=r"validation output .*all\.jsonl is also an input"):
        split([tmp_path], tmp_path / "t.jsonl", src)
    with pytest.raises(DataError, match=r"training output and validation output name the same file"):
        split([src], tmp_path / "same.jsonl", tmp_path / "same.jsonl")
    assert src.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["all.jsonl"]


@pytest.mark.parametrize("options,key", [
    (SplitOptions(ratio=float("nan")), "ratio is nan"),
    (SplitOptions(near=NearOptions(threshold=float("inf"))), "near.threshold is inf"),
])
def test_nan_and_infinity_options_are_refused(tmp_path, options, key):
    src = write(tmp_path / "all.jsonl", dataset(20))
    with pytest.raises(RecipeError, match=rf"split options: {key}; it must be a finite number"):
        split([src], tmp_path / "t.jsonl", tmp_path / "v.jsonl", options)
