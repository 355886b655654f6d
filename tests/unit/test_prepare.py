"""prepare: shards decode back to the corpus, splits are clean and stable, re-runs reuse work,
and every bad input gets a one-line error naming the file.

    OMP_NUM_THREADS=1 pytest tests/unit/test_prepare.py -q
"""

from __future__ import annotations

import errno
import json
import os
import random

import numpy as np
import pytest

from conftest import shared_data
from fledge import prepare as prep
from fledge.errors import DataError, FledgeError, RecipeError, StorageError
from fledge.prepare import load_manifest, prepare, shard_arrays
from fledge.recipe import load_recipe
from fledge.tokenizer import load_tokenizer

WORDS = ("the of and to a in that it was he for on with as his they be at one have this from by "
         "hot word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her").split()


def prose(seed: int, lines: int = 60) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        indent = "  " * rng.randint(0, 3) if i % 4 == 0 else ""
        out.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
                   + rng.choice([".\n", ",\n", "!\r\n", " naïve 😀\n", "\n\n", "\t\n"]))
    return "".join(out)


def recipe(tmp_path, sources, out="prep", **data):
    tokenizer = data.pop("tokenizer", {})
    base = {"data": {"sources": [str(s) for s in sources], "prepared_dir": str(tmp_path / out), **data},
            "tokenizer": {"kind": "bpe", "vocab_size": 300, **tokenizer}}
    return load_recipe(None, base=base)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def documents(out, split: str) -> list[str]:
    """Decoded documents of a split: token runs that start at each bos."""
    manifest, tok = load_manifest(out), load_tokenizer(out)
    arrays = shard_arrays(out, split, manifest)
    if not arrays:
        return []
    ids = np.concatenate(arrays)
    assert ids[0] == tok.bos_id
    starts = np.flatnonzero(ids == tok.bos_id)
    return [tok.decode(run) for run in np.split(ids, starts)[1:]]


def corpus(tmp_path, n: int = 4) -> list:
    files = [write(tmp_path / "corpus" / f"doc{i}.txt", prose(i)) for i in range(n - 1)]
    return files + [write(tmp_path / "corpus" / "sub" / "notes.md", "# Notes\n\n" + prose(99))]


# --- shards hold exactly the corpus ------------------------------------------------------

@pytest.mark.parametrize("kind,vocab_size", [("bpe", 300), ("sentencepiece", 400), ("char", 100)])
def test_shards_decode_to_the_corpus(tmp_path, kind, vocab_size):
    files = corpus(tmp_path)
    r = recipe(tmp_path, [tmp_path / "corpus"], val_fraction=0.4, tokenizer={"kind": kind, "vocab_size": vocab_size})
    manifest = prepare(r, progress=False)
    got = documents(r.prepared_path, "train") + documents(r.prepared_path, "val")
    assert sorted(got) == sorted(f.read_bytes().decode() for f in files)
    assert manifest["tokenizer"]["kind"] == kind
    assert manifest["stats"]["documents"] == len(files) == sum(s["documents"] for s in manifest["splits"].values())
    assert [s["path"] for s in manifest["sources"]] == sorted(f.as_posix() for f in files)


def test_file_larger_than_the_chunk_size_encodes_as_a_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "READ_BYTES", 999)  # odd size: splits multi-byte characters
    monkeypatch.setattr(prep, "PIECE_CHARS", 200)
    monkeypatch.setattr(prep, "BATCH_CHARS", 1000)
    text = "".join(prose(i, 40) for i in range(6))
    text += text.replace("\n", "\r\n") + text.replace("\n", "  \n")  # whitespace runs before newlines
    big = write(tmp_path / "big.txt", text)
    write(tmp_path / "small.txt", prose(50))
    r = recipe(tmp_path, [big, tmp_path / "small.txt"], val_fraction=0.0)
    prepare(r, progress=False)
    tok = load_tokenizer(r.prepared_path)
    ids = np.concatenate(shard_arrays(r.prepared_path, "train")).tolist()
    first = ids[1:ids.index(tok.eos_id)]
    assert tok.decode(first) == text
    assert first == tok.encode(text)  # pieces end at pre-token boundaries: same ids as one call


def test_shards_respect_shard_tokens(tmp_path):
    r = recipe(tmp_path, corpus(tmp_path, 6), shard_tokens=1000, val_fraction=0.0)
    manifest = prepare(r, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] <= 1000 for s in shards)
    assert [s["file"] for s in shards][:2] == ["train/shard-00000.bin", "train/shard-00001.bin"]
    for s in shards:
        assert (r.prepared_path / s["file"]).stat().st_size == 2 * s["tokens"]  # uint16
    assert manifest["dtype"] == "uint16"
    assert sum(s["tokens"] for s in shards) == manifest["splits"]["train"]["tokens"]


def test_manifest_shape(tmp_path):
    r = recipe(tmp_path, corpus(tmp_path))
    manifest = prepare(r, progress=False)
    assert set(manifest) >= {"version", "dtype", "tokenizer", "splits", "split", "sources", "fingerprint"}
    assert manifest["tokenizer"] == {
        "file": "tokenizer.json", "kind": "bpe", "sha256": load_tokenizer(r.prepared_path).sha256,
        "vocab_size": 300, "bos_id": 0, "eos_id": 1}
    assert manifest["split"] == {"method": "document-hash", "val_fraction": 0.1, "seed": 1234}
    assert json.loads((r.prepared_path / "manifest.json").read_text()) == manifest
    assert (r.prepared_path / "recipe.yaml").is_file()


# --- splits -------------------------------------------------------------------------------

def jsonl_corpus(tmp_path, n: int = 300):
    rows = [json.dumps({"text": f"record {i}: " + prose(i, 2), "id": i}) for i in range(n)]
    return write(tmp_path / "rows.jsonl", "\n".join(rows) + "\n\n")


def test_document_split_is_disjoint_and_stable(tmp_path):
    path = jsonl_corpus(tmp_path)
    r1 = recipe(tmp_path, [path], out="a", val_fraction=0.2)
    m1 = prepare(r1, progress=False)
    train, val = documents(r1.prepared_path, "train"), documents(r1.prepared_path, "val")
    assert len(train) + len(val) == 300 and not set(train) & set(val)
    assert 30 < len(val) < 90 and m1["splits"]["val"]["documents"] == len(val)
    r2 = recipe(tmp_path, [path], out="b", val_fraction=0.2)
    prepare(r2, progress=False)
    assert documents(r2.prepared_path, "val") == val
    r3 = recipe(tmp_path, [path], out="c", val_fraction=0.2, split_seed=7)
    prepare(r3, progress=False)
    assert documents(r3.prepared_path, "val") != val


def test_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
    rows = jsonl_corpus(tmp_path).read_text(encoding="utf-8")
    moved = write(tmp_path / "elsewhere" / "deeper" / "rows.jsonl", rows)
    folder = corpus(tmp_path)[0].parent
    copy = tmp_path / "copy" / "corpus"
    for path in folder.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(folder)).write_bytes(path.read_bytes())
    vals = []
    for i, sources in enumerate([[tmp_path / "rows.jsonl", folder], [moved, copy],
                                 [moved, f"{copy}/**/*"]]):
        r = recipe(tmp_path, sources, out=f"loc{i}", val_fraction=0.3)
        prepare(r, progress=False)
        vals.append(sorted(documents(r.prepared_path, "val")))
    assert vals[0] and vals[0] == vals[1] == vals[2]


def test_val_never_empty_with_two_documents(tmp_path):
    files = [write(tmp_path / "a.txt", prose(1)), write(tmp_path / "b.txt", prose(2))]
    r = recipe(tmp_path, files, val_fraction=0.001)
    manifest = prepare(r, progress=False)
    assert manifest["splits"]["val"]["documents"] == 1 and manifest["splits"]["train"]["documents"] == 1


def test_single_document_takes_the_last_tenth(tmp_path):
    text = "".join(f"line {i:03d} " + "word " * (i % 7) + "\n" for i in range(400))
    r = recipe(tmp_path, [write(tmp_path / "input.txt", text)])
    manifest = prepare(r, progress=False)
    assert manifest["split"]["method"] == "contiguous-tail"
    tok = load_tokenizer(r.prepared_path)
    train = np.concatenate(shard_arrays(r.prepared_path, "train")).tolist()
    val = np.concatenate(shard_arrays(r.prepared_path, "val")).tolist()
    assert train[0] == val[0] == tok.bos_id and val[-1] == tok.eos_id and tok.eos_id not in train
    head, tail = tok.decode(train), tok.decode(val)
    assert head + tail == text
    assert head.endswith("\n") and text.index(tail) == len(head)
    cut = int(len(text.encode()) * 0.9)
    assert cut <= len(head.encode()) < cut + 40  # cut at the first line end past 90%
    assert manifest["stats"]["documents"] == 1


# --- re-runs --------------------------------------------------------------------------------

def stamps(out) -> dict:
    """(inode, mtime) of the tokenizer and every shard: unchanged iff the file was kept."""
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.suffix in (".bin", ".json", ".model") and p.name != "manifest.json"}


def test_rerun_reuses_tokenizer_and_shards(tmp_path):
    r = recipe(tmp_path, corpus(tmp_path))
    first = prepare(r, progress=False)
    before = stamps(r.prepared_path)
    assert prepare(r, progress=False) == first
    assert stamps(r.prepared_path) == before


def test_resume_after_crash_does_not_retrain(tmp_path):
    r = recipe(tmp_path, corpus(tmp_path))
    prepare(r, progress=False)
    tokenizer = stamps(r.prepared_path)["tokenizer.json"]
    (r.prepared_path / "manifest.json").unlink()  # as if killed while writing shards
    prepare(r, progress=False)
    assert stamps(r.prepared_path)["tokenizer.json"] == tokenizer


def test_changes_outside_the_tokenizer_sample_rebuild_shards_only(tmp_path):
    # train_bytes 1000 of ~8 KB: the sample is a.txt, the first piece of the even spread.
    a, b = write(tmp_path / "a.txt", prose(1)), write(tmp_path / "b.txt", prose(2))
    r = recipe(tmp_path, [a, b], tokenizer={"train_bytes": 1000})
    first = prepare(r, progress=False)
    tokenizer = stamps(r.prepared_path)["tokenizer.json"]
    write(b, prose(3))
    second = prepare(r, progress=False)
    assert second["fingerprint"] != first["fingerprint"]
    assert second["sources"][1]["sha256"] != first["sources"][1]["sha256"]
    assert stamps(r.prepared_path)["tokenizer.json"] == tokenizer
    third = prepare(recipe(tmp_path, [a, b], split_seed=5, tokenizer={"train_bytes": 1000}), progress=False)
    assert third["fingerprint"] != second["fingerprint"]
    assert stamps(r.prepared_path)["tokenizer.json"] == tokenizer
    write(a, prose(4))  # the tokenizer's own training text changed: retrain
    prepare(r, progress=False)
    assert stamps(r.prepared_path)["tokenizer.json"] != tokenizer


def test_changing_tokenizer_kind_replaces_the_file(tmp_path):
    files = corpus(tmp_path)
    prepare(recipe(tmp_path, files), progress=False)
    r = recipe(tmp_path, files, tokenizer={"kind": "sentencepiece", "vocab_size": 400})
    manifest = prepare(r, progress=False)
    assert manifest["tokenizer"]["file"] == "tokenizer.model"
    assert not (r.prepared_path / "tokenizer.json").exists()


def test_tokenizer_path_is_copied_not_trained(tmp_path):
    files = corpus(tmp_path)
    donor = recipe(tmp_path, files, out="donor", tokenizer={"vocab_size": 280})
    prepare(donor, progress=False)
    r = recipe(tmp_path, files, tokenizer={"path": str(donor.prepared_path / "tokenizer.json")})
    manifest = prepare(r, progress=False)
    assert manifest["tokenizer"]["sha256"] == load_tokenizer(donor.prepared_path).sha256
    assert manifest["tokenizer"]["vocab_size"] == 280


# --- text handling ---------------------------------------------------------------------------

def test_bom_is_stripped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfHello\nworld\n" + prose(1).encode())
    other = write(tmp_path / "bom.jsonl", "\ufeff" + json.dumps({"text": "x y z"}) + "\n")
    r = recipe(tmp_path, [path, other], val_fraction=0.0)
    prepare(r, progress=False)
    assert sorted(documents(r.prepared_path, "train")) == sorted(["Hello\nworld\n" + prose(1), "x y z"])


@pytest.mark.parametrize("strip", [True, False])
def test_gutenberg_books(tmp_path, strip):
    folder = shared_data("gutenberg")
    books = sorted(folder.glob("*.txt"))
    r = recipe(tmp_path, [folder], strip_gutenberg=strip, val_fraction=0.0)
    prepare(r, progress=False)
    expected = []
    for book in books:
        raw = book.read_bytes().decode("utf-8")
        assert raw.startswith("\ufeff")
        start = raw.index("\n", raw.index("*** START OF THE PROJECT GUTENBERG EBOOK")) + 1
        end = raw.index("*** END OF THE PROJECT GUTENBERG EBOOK")
        expected.append(raw[start:end] if strip else raw[1:])
    got = documents(r.prepared_path, "train")
    assert sorted(got) == sorted(expected) and len(got) == len(books) == 2
    assert all("PROJECT GUTENBERG EBOOK" not in text for text in got) == strip


def test_gutenberg_marker_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "READ_BYTES", 64)
    monkeypatch.setattr(prep, "PIECE_CHARS", 32)
    body = prose(1, 20)
    text = "Header\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n" + body + \
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence " * 3
    r = recipe(tmp_path, [write(tmp_path / "g.txt", text)], strip_gutenberg=True, val_fraction=0.0)
    prepare(r, progress=False)
    assert documents(r.prepared_path, "train") == [body]


def test_bad_utf8_names_file_and_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "READ_BYTES", 7)  # the bad byte lies in a later block
    path = tmp_path / "latin1.txt"
    path.write_bytes("héllo wörld\n".encode() + b"caf\xe9\n")
    with pytest.raises(DataError) as err:
        prepare(recipe(tmp_path, [path]), progress=False)
    assert str(err.value).startswith(f"{path.as_posix()} (byte 17): byte 0xe9 is not UTF-8.")
    assert "data.on_decode_error: replace" in str(err.value)


def test_bad_utf8_in_jsonl_names_line_and_offset(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path.as_posix()}:2: byte 0xe9 at byte offset 28 is not UTF-8"):
        prepare(recipe(tmp_path, [path]), progress=False)


def test_replace_mode_counts_bad_bytes(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 cr\xe8me\n" + prose(1).encode())
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "na\xefve"}\n')
    r = recipe(tmp_path, [bad, rows], on_decode_error="replace", val_fraction=0.0)
    manifest = prepare(r, progress=False)
    assert manifest["stats"]["replaced_bytes"] == 3
    assert manifest["stats"]["replaced_bytes_by_file"] == {bad.as_posix(): 2, rows.as_posix(): 1}
    assert sorted(documents(r.prepared_path, "train")) == sorted(["caf\ufffd cr\ufffdme\n" + prose(1),
                                                                  "na\ufffdve"])


# --- errors ------------------------------------------------------------------------------------

def test_missing_source_names_it_and_lists_the_folder(tmp_path):
    write(tmp_path / "data" / "books.txt", "x")
    (tmp_path / "data" / "more").mkdir()
    missing = tmp_path / "data" / "book.txt"
    with pytest.raises(DataError) as err:
        prepare(recipe(tmp_path, [missing]), progress=False)
    assert str(err.value) == (f"{missing}: no such file or folder. {(tmp_path / 'data').as_posix()}/ holds: "
                              f"books.txt, more/. Fix data.sources.")


@pytest.mark.parametrize("sources,match", [
    ([], "data.sources is empty"),
    (["{tmp}/*.txt"], r"/\*\.txt: the glob matches no files\. .*/ holds: a\.csv, nothing/, x\.json\."),
    (["{tmp}"], r": the folder holds no \.txt, \.md, \.jsonl files\. .*holds: a\.csv.*\*\.limn"),
    (["{tmp}/a.csv", "{tmp}/x.json"], r"x\.json: a JSON file; .*Convert it to \.jsonl"),
])
def test_source_errors(tmp_path, sources, match):
    write(tmp_path / "a.csv", "a,b\n")
    write(tmp_path / "x.json", "[]")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=match):
        prepare(recipe(tmp_path, [s.format(tmp=tmp_path) for s in sources]), progress=False)


@pytest.mark.parametrize("line,match", [
    ('{"text": "a"', r"rows\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 13\)"),
    ('{"input": "a", "output": "b"}', r"rows\.jsonl:2: 'text' is missing; this record has 'input', 'output'\. "
                                      r"Set data\.text_field"),
    ('["a", "b"]', r"rows\.jsonl:2: a JSON array, not an object with a 'text' field"),
    ('{"text": 5}', r"rows\.jsonl:2: 'text' is a JSON number, not a string"),
])
def test_bad_jsonl_rows(tmp_path, line, match):
    path = write(tmp_path / "rows.jsonl", '{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        prepare(recipe(tmp_path, [path]), progress=False)


def test_text_field(tmp_path):
    path = write(tmp_path / "rows.jsonl", "".join(json.dumps({"output": prose(i, 3)}) + "\n" for i in range(5)))
    r = recipe(tmp_path, [path], text_field="output", val_fraction=0.0)
    prepare(r, progress=False)
    assert documents(r.prepared_path, "train") == [prose(i, 3) for i in range(5)]


def test_empty_corpus(tmp_path):
    write(tmp_path / "a.txt", "")
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare(recipe(tmp_path, [tmp_path / "a.txt"]), progress=False)
    g = write(tmp_path / "g.txt", "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n*** END OF THE PROJECT "
                                  "GUTENBERG EBOOK X ***\nlicence\n")
    with pytest.raises(DataError, match="the corpus is empty: no text left in .*g.txt"):
        prepare(recipe(tmp_path, [g], strip_gutenberg=True), progress=False)


def test_vocab_larger_than_corpus_is_one_line(tmp_path):
    r = recipe(tmp_path, [write(tmp_path / "a.txt", "tiny text\n")], tokenizer={"vocab_size": 5000})
    with pytest.raises(DataError) as err:
        prepare(r, progress=False)
    assert "\n" not in str(err.value) and "supports only" in str(err.value)
    assert not (r.prepared_path / "manifest.json").exists()


def test_load_manifest_of_unprepared_folder(tmp_path):
    with pytest.raises(FledgeError, match=r"not prepared \(no manifest.json; found: nothing\)\. "
                                          r"Run `fledge prepare RECIPE` first\."):
        load_manifest(tmp_path / "never")


def test_unchanged_sources_are_not_read_again(tmp_path, monkeypatch):
    files = corpus(tmp_path)
    r = recipe(tmp_path, files)
    first = prepare(r, progress=False)
    hashed = []
    real = prep._file_sha256
    sources = set(files)
    monkeypatch.setattr(prep, "_file_sha256", lambda path: (path in sources and hashed.append(path)) or real(path))
    assert prepare(r, progress=False)["fingerprint"] == first["fingerprint"]
    assert hashed == []
    write(files[0], prose(42))                                   # new content, new mtime
    second = prepare(r, progress=False)
    assert hashed == [files[0]] and second["fingerprint"] != first["fingerprint"]


def test_corrupt_manifest_is_a_data_error(tmp_path):
    r = recipe(tmp_path, corpus(tmp_path))
    prepare(r, progress=False)
    (r.prepared_path / "manifest.json").write_text('{"version": 1, "splits": ')
    with pytest.raises(DataError, match=r"manifest\.json: not a readable manifest \(.*\)\. Rerun `fledge prepare"):
        load_manifest(r.prepared_path)


# --- the prepared folder: prepare deletes only what it can prove it created -------------------

def snapshot(root) -> dict:
    """Every file below `root` (links not followed) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setting", ["run_dir: .", "name: ..", "data.prepared_dir: corpus"])
def test_prepared_folder_over_the_sources_is_refused(tmp_path, monkeypatch, setting):
    monkeypatch.chdir(tmp_path)
    folder = "corpus" if "corpus" in setting else "data"
    write(tmp_path / folder / "train" / "a.txt", prose(1))
    write(tmp_path / folder / "train" / "rows.jsonl", json.dumps({"text": prose(2)}) + "\n")
    write(tmp_path / folder / "val" / "b.txt", prose(3))
    base = {"data": {"sources": [f"{folder}/train", f"{folder}/val"]}, "tokenizer": {"kind": "char", "vocab_size": 100}}
    if setting == "run_dir: .":
        base["run_dir"] = "."
    if folder == "corpus":
        base["data"]["prepared_dir"] = "corpus"
    r = load_recipe(None, base=base)
    if setting == "name: ..":
        r.name = ".."  # the recipe check refuses this name now; prepare must not rely on that
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as err:
        prepare(r, progress=False)
    assert snapshot(tmp_path) == before  # every source byte is still there, and nothing was written
    message = str(err.value)
    assert message.startswith(f"{folder}/train/a.txt: this source lies inside the prepared folder "
                              f"{r.prepared_path}, where prepare writes train/, val/")
    assert "Set data.prepared_dir to a folder outside the sources" in message and "\n" not in message


def test_prepared_folder_inside_a_source_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.txt", prose(1))
    with pytest.raises(DataError, match=r"^\.: the prepared folder out/prep lies inside this source folder, "
                                        r".*Set data\.prepared_dir to a folder outside the sources"):
        prepare(load_recipe(None, base={"data": {"sources": ["."], "prepared_dir": "out/prep"}}), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_rerun_replaces_old_shards_in_marked_folders(tmp_path):
    files = corpus(tmp_path, 6)
    r = recipe(tmp_path, files, shard_tokens=1000, val_fraction=0.0, tokenizer={"kind": "char", "vocab_size": 100})
    out = r.prepared_path
    first = prepare(r, progress=False)
    assert len(first["splits"]["train"]["shards"]) > 2
    for folder in (out, out / "train"):
        assert json.loads((folder / ".fledge-prepared").read_text()) == {"fledge": "prepared",
                                                                        "id": first["prepared_id"]}
    for f in files:
        write(f, f"short {f.name}\n")
    second = prepare(r, progress=False)
    assert second["prepared_id"] == first["prepared_id"] and len(second["splits"]["train"]["shards"]) == 1
    assert sorted(p.name for p in (out / "train").iterdir()) == [".fledge-prepared", "shard-00000.bin"]
    assert sorted(documents(out, "train")) == sorted(f.read_bytes().decode() for f in files)
    assert not list(out.glob(".tmp-*")) and not list(out.rglob("*.tmp"))


def test_a_folder_prepare_cannot_prove_it_made_is_kept(tmp_path):
    files = corpus(tmp_path)
    r = recipe(tmp_path, files, tokenizer={"kind": "char", "vocab_size": 100})
    out = r.prepared_path
    prepare(r, progress=False)
    write(out / "train" / "notes.txt", "mine\n")
    for n, reason in enumerate(["it holds notes.txt, which prepare did not write",
                                "it has no .fledge-prepared of this prepared folder"]):
        if n == 1:
            (out / "train" / ".fledge-prepared").unlink()
        write(files[0], prose(10 + n))  # a changed source: the shards must be rebuilt
        before = snapshot(out / "train")
        with pytest.raises(StorageError) as err:
            prepare(r, progress=False)
        assert str(err.value) == (f"{out / 'train'}: prepare did not create this folder ({reason}), so it will "
                                  f"not delete it. If it holds only shards of an earlier prepare, delete it "
                                  f"yourself; otherwise move it away or set data.prepared_dir to a new folder.")
        assert snapshot(out / "train") == before


def test_a_foreign_prepared_folder_is_refused(tmp_path):
    mine = write(tmp_path / "mine" / "recipe.yaml", "my own notes\n")
    r = recipe(tmp_path, corpus(tmp_path), out="mine")
    with pytest.raises(StorageError, match=r"mine: the prepared folder already holds files prepare did not write "
                                           r"\(recipe\.yaml\) and no \.fledge-prepared; .*Set data\.prepared_dir"):
        prepare(r, progress=False)
    assert mine.read_text() == "my own notes\n" and sorted(p.name for p in mine.parent.iterdir()) == ["recipe.yaml"]


def test_stale_temporary_folders_go_only_with_the_marker(tmp_path):
    files = corpus(tmp_path)
    r = recipe(tmp_path, files, tokenizer={"kind": "char", "vocab_size": 100})
    out = r.prepared_path
    marker = json.dumps({"fledge": "prepared", "id": prepare(r, progress=False)["prepared_id"]})
    own = write(out / ".tmp-1-aaaa" / ".fledge-prepared", marker).parent
    write(own / "train" / ".fledge-prepared", marker)
    (own / "train" / "shard-00000.bin").write_bytes(b"\0\0")
    foreign = write(out / ".tmp-2-bbbb" / "keep.txt", "x").parent
    write(files[0], prose(11))
    prepare(r, progress=False)
    assert not own.exists() and (foreign / "keep.txt").read_text() == "x"


# --- which files are read -------------------------------------------------------------------------

def test_symlink_loop_lists_each_folder_once(tmp_path, monkeypatch):
    write(tmp_path / "c" / "a.txt", prose(1))
    write(tmp_path / "c" / "sub" / "b.md", prose(2))
    (tmp_path / "c" / "sub" / "up").symlink_to("..")  # c/sub/up/sub/up/... loops
    listed, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(str(path)) or scandir(path))
    sources = [tmp_path / "c", f"{tmp_path}/c/**/*.txt", f"{tmp_path}/c/**", tmp_path / "c" / "a.txt"]
    manifest = prepare(recipe(tmp_path, sources, tokenizer={"kind": "char", "vocab_size": 100}), progress=False)
    assert [s["path"] for s in manifest["sources"]] == [f"{tmp_path}/c/a.txt", f"{tmp_path}/c/sub/b.md"]
    assert manifest["stats"]["documents"] == 2
    walked = [p for p in listed if p.startswith(str(tmp_path / "c"))]
    assert sorted(set(walked)) == [str(tmp_path / "c"), str(tmp_path / "c" / "sub")]  # never c/sub/up/...
    assert len(walked) <= 10  # a few walks of two real folders; glob.glob listed 40+ folders for one glob


def test_symlinked_folders_are_entered_once(tmp_path):
    write(tmp_path / "c" / "a.txt", prose(1))
    write(tmp_path / "other" / "x.txt", prose(2))
    write(tmp_path / "around.txt", prose(3))  # beside the walked folder: a link up must not reach it
    for name, target in [("link", tmp_path / "other"), ("link2", tmp_path / "other"), ("self", "."), ("up", "..")]:
        (tmp_path / "c" / name).symlink_to(target)
    for entry in [tmp_path / "c", f"{tmp_path}/c/**/*.txt", f"{tmp_path}/c/**", f"{tmp_path}/c/*"]:
        manifest = prepare(recipe(tmp_path, [entry], tokenizer={"kind": "char", "vocab_size": 100}), progress=False)
        assert [s["path"] for s in manifest["sources"]] == [f"{tmp_path}/c/a.txt", f"{tmp_path}/c/link/x.txt"]


def test_a_source_named_twice_is_read_once(tmp_path):
    a, b = write(tmp_path / "a.txt", prose(1)), write(tmp_path / "b.txt", prose(2))
    (tmp_path / "link.txt").symlink_to(a)
    r = recipe(tmp_path, [a, a, f"{tmp_path}/*.txt", tmp_path / "link.txt"], val_fraction=0.0)
    manifest = prepare(r, progress=False)
    assert [s["path"] for s in manifest["sources"]] == [a.as_posix(), b.as_posix()]
    assert sorted(documents(r.prepared_path, "train")) == sorted([prose(1), prose(2)])


@pytest.mark.parametrize("entry", ["{tmp}/pipe.txt", "{tmp}", "{tmp}/*.txt", "{tmp}/**/*.txt"])
def test_a_pipe_is_refused_not_read(tmp_path, entry):
    write(tmp_path / "a.txt", prose(1))
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would wait forever
    with pytest.raises(DataError, match=rf"^{tmp_path}/pipe\.txt: not a regular file \(a pipe, socket or device\); "
                                        r"fledge reads only regular files"):
        prepare(recipe(tmp_path, [entry.format(tmp=tmp_path)]), progress=False)


def test_a_dangling_symlink_is_refused_where_a_file_would_be_read(tmp_path):
    write(tmp_path / "c" / "a.txt", prose(1))
    (tmp_path / "c" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "c" / "gone.csv").symlink_to(tmp_path / "nowhere.csv")  # not a suffix a walk reads: ignored
    for entry in [tmp_path / "c", f"{tmp_path}/c/*.txt", f"{tmp_path}/c/**/*.txt"]:
        with pytest.raises(DataError, match=rf"^{tmp_path}/c/gone\.txt: a symlink that leads nowhere "
                                            r"\(its target is missing, or the links loop\); fledge reads only"):
            prepare(recipe(tmp_path, [entry]), progress=False)


def test_suffixes_match_in_any_case(tmp_path):
    write(tmp_path / "c" / "A.TXT", prose(1))
    write(tmp_path / "c" / "rows.JSONL", json.dumps({"text": "a row"}) + "\n")
    manifest = prepare(recipe(tmp_path, [tmp_path / "c"], tokenizer={"kind": "char", "vocab_size": 100},
                              val_fraction=0.0), progress=False)
    assert [s["path"] for s in manifest["sources"]] == [f"{tmp_path}/c/A.TXT", f"{tmp_path}/c/rows.JSONL"]
    assert sorted(documents(tmp_path / "prep", "train")) == sorted([prose(1), "a row"])  # rows, not raw JSON


def test_nul_bytes_in_text_files_are_text(tmp_path):
    text = "before\x00after\n" + prose(1)
    r = recipe(tmp_path, [write(tmp_path / "a.txt", text), write(tmp_path / "b.txt", prose(2))], val_fraction=0.0)
    prepare(r, progress=False)
    assert sorted(documents(r.prepared_path, "train")) == sorted([text, prose(2)])


def test_on_bad_row_is_validated():
    with pytest.raises(RecipeError, match=r"data\.on_bad_row is 'drop'; choose one of error, skip"):
        load_recipe(None, base={"data": {"on_bad_row": "drop"}})


# --- a full disk ----------------------------------------------------------------------------------

def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def no_temp_files(out) -> bool:
    return not list(out.glob(".tmp-*")) and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_full_disk_while_writing_shards(tmp_path, monkeypatch):
    files = corpus(tmp_path)
    r = recipe(tmp_path, files, tokenizer={"kind": "char", "vocab_size": 100})
    prepare(r, progress=False)
    write(files[0], prose(20))
    with monkeypatch.context() as m:
        m.setattr(prep.ShardWriter, "write", full_disk)
        with pytest.raises(StorageError) as err:
            prepare(r, progress=False)
    assert str(err.value) == (f"could not write shards into {r.prepared_path}: the disk is full; free some space "
                              f"and run the command again (finished work is kept)")
    assert no_temp_files(r.prepared_path)
    with pytest.raises(DataError, match="not prepared"):  # cleanly absent, never a manifest over old shards
        load_manifest(r.prepared_path)
    prepare(r, progress=False)
    assert sorted(documents(r.prepared_path, "train") + documents(r.prepared_path, "val")) == \
        sorted(f.read_bytes().decode() for f in files)


@pytest.mark.parametrize("target", ["manifest.json", "source-scan.json", "tokenizer.json"])
def test_full_disk_on_a_small_file(tmp_path, monkeypatch, target):
    files = corpus(tmp_path)
    r = recipe(tmp_path, files, tokenizer={"kind": "char", "vocab_size": 100})
    first = prepare(r, progress=False)
    write(files[0], prose(21) + "\u00e6")  # changed text (a new character): scan, tokenizer and shards are redone
    replace = os.replace
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda src, dst: full_disk() if str(dst).endswith(target) else replace(src, dst))
        with pytest.raises(StorageError, match=rf"^could not write .*{target}: the disk is full"):
            prepare(r, progress=False)
    assert no_temp_files(r.prepared_path)
    if target == "source-scan.json":  # nothing was touched yet: the previous manifest still works
        assert load_manifest(r.prepared_path) == first
    else:
        with pytest.raises(DataError, match="not prepared"):
            load_manifest(r.prepared_path)
    assert prepare(r, progress=False)["fingerprint"] != first["fingerprint"]
