"""Fine-tuning rows as batches: trained tokens are exactly the answers, bad rows point at file:line,
long rows are caught, cut or dropped, packing loses and splits nothing, batches are a pure function
of the step, weights and groups hold, and a packed row computes what it computes alone.

    OMP_NUM_THREADS=1 pytest tests/unit/train/test_rows.py -q

One table of row formats (io, alpaca, a three-turn chat with a system message, a bare message
array, prompt/completion, a field-mapped pair, a text row) crossed with every built-in template.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from fledge.errors import DataError, RecipeError, TokenizerError
from fledge.recipe import load_recipe
from fledge.templates import BUILTINS, add_template_tokens, hf_tokenizer
from fledge.tokenizer import train_tokenizer
from fledge.train.batches import IGNORE
from fledge.train.rows import build_row_batches, pack_rows, shifted_labels

SYSTEM = "You answer briefly."


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CHAT3 = [msg("system", SYSTEM), msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"),
         msg("user", "Name a big river in Spain."), msg("assistant", "The Ebro, or the Tagus\nif you count Portugal."),
         msg("user", "Thanks"), msg("assistant", "You are welcome.")]
TEXT = "Once upon a time the quick brown fox was hot."
# (name, source keys besides path, rows, the answers of each row in order)
CASES = [
    ("io", {}, [{"input": "What is two plus two?", "output": "Four."},
                {"input": "Name a colour", "output": "Red, or blue.", "metadata": {"type": "x"}}],
     [["Four."], ["Red, or blue."]]),
    ("alpaca", {}, [{"instruction": "Convert to Cypher", "input": "List all File", "output": "MATCH (n:File) RETURN n"},
                    {"instruction": "Say hi", "output": "hi there"}],
     [["MATCH (n:File) RETURN n"], ["hi there"]]),
    ("chat", {}, [{"messages": CHAT3}], [["Hello! How can I help?", "The Ebro, or the Tagus\nif you count Portugal.",
                                          "You are welcome."]]),
    ("bare", {}, [[msg("user", "Who are you?"), msg("assistant", "Arianna, a voice.")]], [["Arianna, a voice."]]),
    ("prompt_completion", {}, [{"prompt": "2+2=", "completion": "4"}], [["4"]]),
    ("mapped", {"input_field": "input_code", "output_field": "output_dot", "format": "io"},
     [{"input_code": "on => off;", "output_dot": "digraph { on -> off }"}], [["digraph { on -> off }"]]),
    ("text", {}, [{"text": TEXT}], [[TEXT]]),
]
WORDS = ("the of and to a in that it was he for on with as his they be at one have this from by hot word but "
         "what some we can out other were all there when up use your how said an each she which do their time")


def corpus() -> list[str]:
    rows = json.dumps([rows for _, _, rows, _ in CASES])
    lines = [" ".join(WORDS.split()[i:i + 9]) for i in range(0, 60, 3)] * 20
    return ["\n".join(lines), rows, *(m["content"] for m in CHAT3), TEXT]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    config = load_recipe(None, base={"tokenizer": {"kind": "bpe", "vocab_size": 400}}).tokenizer
    return train_tokenizer(config, corpus()).save(tmp_path_factory.mktemp("tok") / "bpe")


def tokenizer_for(path: Path, template: str = "qa"):
    tok = hf_tokenizer(path)
    add_template_tokens(tok, template)
    return tok


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_recipe(rows: list, *, val_fraction: float = 0.0, **sections):
    """A fine-tuning recipe over `rows` (RowSource mappings or paths); other keys by section."""
    base = {"model": {"base": "unused", "max_seq_len": 512},
            "data": {"rows": rows, "val_fraction": val_fraction, **sections.pop("data", {})},
            "train": {"block_size": 256, "batch_size": 2, "seed": 3, **sections.pop("train", {})},
            **sections}
    return load_recipe(None, base=base, check_machine=False)


def build(recipe, tok, template="qa", messages=None):
    said = messages if messages is not None else []
    return build_row_batches(recipe, tok, BUILTINS[template] if template in BUILTINS else template,
                             say=said.append)


def epoch_sequences(batches) -> list[dict]:
    """Every sequence of epoch 0 through the public train_batch, as dicts of 1-D tensors."""
    out, step = [], 0
    b = batches.layout.batch_size
    while len(out) < batches.stats.sequences:
        batch = batches.train_batch(step, 0, 0, 1)
        for j in range(b):
            out.append({"ids": batch.input_ids[j], "labels": batch.labels[j],
                        "positions": None if batch.position_ids is None else batch.position_ids[j],
                        "documents": None if batch.document_ids is None else batch.document_ids[j]})
        step += 1
    return out[:batches.stats.sequences]


def segments(sequence: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) of each row in a sequence: by document id when packed, else the one row."""
    if sequence["documents"] is None:
        return [(sequence["ids"], sequence["labels"])]
    docs = sequence["documents"]
    return [(sequence["ids"][docs == d], sequence["labels"][docs == d]) for d in docs.unique().tolist() if d >= 0]


def trained_runs(labels: torch.Tensor) -> list[list[int]]:
    """The target ids of each run of trained positions (labels are the next tokens, so shifted back)."""
    runs, current = [], []
    for value in labels.tolist() + [IGNORE]:
        if value != IGNORE:
            current.append(value)
        elif current:
            runs.append(current)
            current = []
    return runs


def answers_of(batches, tok) -> Counter:
    return Counter(tuple(tok.decode(run, skip_special_tokens=False) for run in trained_runs(labels))
                   for seq in epoch_sequences(batches) for _, labels in segments(seq))


def expected_answers(template_name: str, tok) -> Counter:
    template = BUILTINS[template_name]
    end = template.end_token or tok.eos_token
    out = Counter()
    for name, _, _, answers in CASES:
        for row in answers:
            if name == "text":   # a plain completion: no lead, EOS
                out[tuple(a + tok.eos_token for a in row)] += 1
            else:
                out[tuple(template.answer_lead + a + end for a in row)] += 1
    return out


def case_sources(tmp_path: Path) -> list[dict]:
    return [{"path": str(write_rows(tmp_path / f"{name}.jsonl", rows)), **keys} for name, keys, rows, _ in CASES]


# --- what is trained -------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("template", list(BUILTINS))
def test_trained_tokens_are_exactly_the_answers_with_their_end_tokens(tmp_path, tokenizer_file, template, packing):
    tok = tokenizer_for(tokenizer_file, template)
    batches = build(make_recipe(case_sources(tmp_path), finetune={"packing": packing}), tok, template)
    assert batches.n_train_rows == sum(len(rows) for _, _, rows, _ in CASES)
    assert answers_of(batches, tok) == expected_answers(template, tok)


def test_text_rows_are_bos_text_eos_and_every_token_trains(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file, "chatml")
    path = write_rows(tmp_path / "t.jsonl", [{"text": TEXT}, [msg("assistant", TEXT)]])   # a lone answer too
    rows = build(make_recipe([str(path)]), tok, "chatml").train_rows
    assert len(rows) == 2
    for row in rows:
        ids = row.ids.tolist()
        assert ids == [tok.bos_token_id, *tok.encode(TEXT, add_special_tokens=False), tok.eos_token_id]
        assert row.labels.tolist() == ids[1:] + [IGNORE]


def test_train_on_prompt_trains_every_next_token(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CHAT3}])
    [row] = build(make_recipe([str(path)], finetune={"train_on_prompt": True}), tok).train_rows
    assert row.labels.tolist() == row.ids.tolist()[1:] + [IGNORE]


def test_labels_are_shifted_and_the_last_position_has_none():
    assert shifted_labels([5, 6, 7, 8], [False, False, True, True]).tolist() == [IGNORE, 7, 8, IGNORE]
    assert shifted_labels([5, 6, 7], [False, False, False], every_token=True).tolist() == [6, 7, IGNORE]


def test_the_recipe_system_prompt_is_rendered_and_a_second_one_is_a_bad_row(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = write_rows(tmp_path / "s.jsonl", [{"input": "Hi", "output": "Hello."}, {"messages": CHAT3}])
    recipe = make_recipe([str(path)], template={"system": "Be kind."})
    with pytest.raises(DataError, match=rf"s\.jsonl:2: the conversation has its own system message and a system "
                                        rf"prompt was given too"):
        build(recipe, tok)
    recipe.data.on_bad_row = "skip"
    [row] = build(recipe, tok).train_rows
    assert tok.decode(row.ids.tolist()).startswith("<|bos|>Be kind.\n\nQ: Hi\nA:")


# --- bad rows ------------------------------------------------------------------------------------

BAD = ['{"input": "a", "output": "b"}', '{"input": "a",', '{"question": "q", "answer": "a"}',
       json.dumps({"messages": [msg("user", "hi"), msg("assistant", "yo"), msg("user", "and?")]}),
       json.dumps([msg("user", "one"), msg("user", "two"), msg("assistant", "three")]),
       '{"input": "c", "output": "d"}']


def test_bad_rows_stop_with_file_and_line_and_the_fix(tmp_path, tokenizer_file):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD) + "\n")
    with pytest.raises(DataError) as caught:
        build(make_recipe([str(path)]), tokenizer_for(tokenizer_file))
    message = str(caught.value)
    assert message.startswith(f"{path}:2: not valid JSON")
    assert f"3 more bad rows: {path}:3 (row fits no known format" in message
    assert f"{path}:4 (\"messages\" ends with a 'user' message" in message
    assert f"{path}:5 (message 2: role 'user' where 'assistant' belongs" in message
    assert message.endswith("Fix the rows, or set data.on_bad_row: skip (--skip-invalid) to drop bad rows and have "
                            "them listed.")


def test_skipped_bad_rows_are_reported_with_their_places(tmp_path, tokenizer_file):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD) + "\n")
    said: list[str] = []
    batches = build(make_recipe([str(path)], data={"on_bad_row": "skip"}), tokenizer_for(tokenizer_file),
                    messages=said)
    assert batches.n_train_rows == 2
    assert said[0].startswith(f"skipped 4 bad rows (data.on_bad_row: skip): {path}:2 (not valid JSON")
    assert batches.stats.skipped == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "bad rows skipped: 4" in batches.stats.format()


def test_many_bad_rows_are_listed_ten_then_counted(tmp_path, tokenizer_file):
    path = tmp_path / "many.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n' + '{"oops": 1}\n' * 25)
    said: list[str] = []
    build(make_recipe([str(path)], data={"on_bad_row": "skip"}), tokenizer_for(tokenizer_file), messages=said)
    assert said[0].count(f"{path}:") == 10 and said[0].endswith("and 15 more")


def test_a_forced_format_reports_rows_that_do_not_fit(tmp_path, tokenizer_file):
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": CHAT3}, {"input": "a", "output": "b"}])
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: not a chat row, the format this source is read as: "
                                        rf"\"messages\" is missing \(fields: input, output\)"):
        build(make_recipe([{"path": str(path), "format": "chat"}]), tokenizer_for(tokenizer_file))
    with pytest.raises(RecipeError, match=r"data.rows\[0\] .*a field map .* applies to formats auto, io and "
                                          r"prompt_completion, not chat"):
        build(make_recipe([{"path": str(path), "format": "chat", "input_field": "q"}]), tokenizer_for(tokenizer_file))


def test_a_pad_token_that_is_eos_is_refused(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    tok.pad_token = tok.eos_token
    path = write_rows(tmp_path / "a.jsonl", [{"input": "a", "output": "b"}])
    with pytest.raises(TokenizerError, match="padding needs its own id, never EOS. Call fledge.templates.set_pad"):
        build(make_recipe([str(path)]), tok)


# --- long rows -----------------------------------------------------------------------------------

LONG_CHAT = [msg("user", "the of and to a in that it was " * 6), msg("assistant", "he for on with"),
             msg("user", "as his they be at one have this " * 4), msg("assistant", "Short answer.")]


def long_rows(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "long.jsonl", [{"input": "Hi", "output": "Hello."}, {"messages": LONG_CHAT},
                                                {"input": "Hey", "output": "the of and to a in that it " * 8}])


def lengths(path: Path, tok) -> list[int]:
    return [len(r) for r in build(make_recipe([str(path)], train={"block_size": 512}), tok).train_rows]


def test_rows_too_long_stop_with_their_places_lengths_and_what_to_set(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = long_rows(tmp_path)
    short, chat, answer = lengths(path, tok)
    limit = max(short, chat // 2, min(chat, answer) - 1)
    with pytest.raises(DataError) as caught:
        build(make_recipe([str(path)], finetune={"max_length": limit}), tok)
    assert str(caught.value) == (
        f"2 rows are longer than {limit} tokens (finetune.max_length): {path}:2 ({chat} tokens), {path}:3 ({answer} "
        f"tokens). Raise finetune.max_length to at least {max(chat, answer)} (packed rows must also fit "
        f"train.block_size), or set finetune.on_too_long: truncate (cut prompts from the left) or drop.")


def test_truncate_cuts_the_prompt_from_the_left_and_keeps_the_last_answer_whole(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = write_rows(tmp_path / "long.jsonl", [{"input": "Hi", "output": "Hello."}, {"messages": LONG_CHAT}])
    short, chat = lengths(path, tok)
    limit = chat - 30
    batches = build(make_recipe([str(path)], finetune={"max_length": limit, "on_too_long": "truncate"}), tok)
    cut = max(batches.train_rows, key=len)
    assert len(cut) == limit and cut.ids[0] == tok.bos_token_id and cut.labels[0] == IGNORE
    runs = [tok.decode(run, skip_special_tokens=False) for run in trained_runs(cut.labels)]
    assert runs[-1] == " Short answer." + tok.eos_token
    assert batches.stats.cut == [f"{path}:2"] and batches.stats.sources[0].cut == 1


def test_truncate_refuses_a_row_whose_answer_alone_is_too_long(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = long_rows(tmp_path)
    short, chat, answer = lengths(path, tok)
    with pytest.raises(DataError, match=rf"1 row cannot be cut to 20 tokens \(finetune.max_length\) because the last "
                                        rf"answer and its end token alone are longer: .*long\.jsonl:3 \(last answer "):
        build(make_recipe([str(path)], finetune={"max_length": 20, "on_too_long": "truncate"},
                          data={"rows": [str(path)]}), tok)


def test_drop_drops_and_reports(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = long_rows(tmp_path)
    short, chat, answer = lengths(path, tok)
    said: list[str] = []
    batches = build(make_recipe([str(path)], finetune={"max_length": short, "on_too_long": "drop"}), tok, messages=said)
    assert batches.n_train_rows == 1
    assert said[-1:] == [f"dropped 2 rows longer than {short} tokens (finetune.max_length; finetune.on_too_long: "
                         f"drop): {path}:2 ({chat} tokens), {path}:3 ({answer} tokens)"]
    assert batches.stats.dropped == [f"{path}:2 ({chat} tokens)", f"{path}:3 ({answer} tokens)"]


def test_nothing_left_to_train_is_an_error(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = long_rows(tmp_path)
    with pytest.raises(DataError, match="no trainable tokens: 0 training rows remain of 3 read"):
        build(make_recipe([str(path)], finetune={"max_length": 4, "on_too_long": "drop"}), tok)


# --- packing -------------------------------------------------------------------------------------

def many_rows(tmp_path: Path, n: int = 40, name: str = "many.jsonl", group: int = 0) -> Path:
    words = WORDS.split()
    rows = [{"input": " ".join(words[i % 20:i % 20 + 1 + i % 7]), "output": " ".join(words[i % 11:i % 11 + 2 + i % 13]),
             "metadata": {"doc": i // group if group else i}} for i in range(n)]
    return write_rows(tmp_path / name, rows)


def test_packing_loses_no_row_never_splits_one_and_restarts_positions(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    batches = build(make_recipe([str(many_rows(tmp_path))], train={"block_size": 64}), tok)
    rows = Counter(tuple(r.ids.tolist()) for r in batches.train_rows)
    seen = Counter()
    for seq in epoch_sequences(batches):
        docs, positions = seq["documents"], seq["positions"]
        assert len(seq["ids"]) == 64
        for d in docs.unique().tolist():
            where = docs == d
            assert positions[where].tolist() == list(range(int(where.sum())))   # restarts at 0, contiguous
            if d < 0:   # padding: pad id (never EOS), no targets
                assert set(seq["ids"][where].tolist()) == {tok.pad_token_id} != {tok.eos_token_id}
                assert set(seq["labels"][where].tolist()) == {IGNORE}
            else:
                seen[tuple(seq["ids"][where].tolist())] += 1
        assert (docs >= 0).int().diff().le(0).all()   # padding only after the rows
    assert seen == rows
    assert 0.5 < batches.stats.efficiency <= 1
    assert batches.stats.sequences < len(batches.train_rows)


def test_pack_rows_is_best_fit_in_order():
    assert pack_rows([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert pack_rows([8, 1], 8) == [[0], [1]]
    with pytest.raises(ValueError):
        pack_rows([9], 8)


def test_unpacked_rows_are_one_per_sequence_right_padded_to_the_longest(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    batches = build(make_recipe([str(many_rows(tmp_path))], finetune={"packing": False},
                                train={"batch_size": 4}), tok)
    batch = batches.train_batch(0, 0, 0, 1)
    assert batch.position_ids is None and batch.document_ids is None
    lengths = {tuple(r.ids.tolist()): len(r) for r in batches.train_rows}
    widths = []
    for ids, labels in zip(batch.input_ids, batch.labels):
        n = next(n for key, n in lengths.items() if list(key) == ids[:n].tolist())
        widths.append(n)
        assert set(ids[n:].tolist()) <= {tok.pad_token_id} and set(labels[n - 1:].tolist()) == {IGNORE}
    assert batch.input_ids.shape[1] == max(widths)


# --- determinism ---------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_batches_are_a_pure_function_of_the_step(tmp_path, tokenizer_file, packing):
    tok = tokenizer_for(tokenizer_file)
    path = str(many_rows(tmp_path))
    one = build(make_recipe([path], finetune={"packing": packing}, train={"batch_size": 4, "grad_accum": 2}), tok)
    again = build(make_recipe([path], finetune={"packing": packing}, train={"batch_size": 4, "grad_accum": 2}), tok)
    two = build(make_recipe([path], finetune={"packing": packing}, train={"batch_size": 2, "grad_accum": 2}), tok)
    late = one.train_batch(40, 1, 0, 1)   # several epochs in, asked first
    for step in (0, 1, 7, 40):
        for micro in (0, 1):
            want = one.train_batch(step, micro, 0, 1)
            assert torch.equal(want.input_ids, again.train_batch(step, micro, 0, 1).input_ids)
            halves = [two.train_batch(step, micro, rank, 2) for rank in (0, 1)]
            got = [row for half in halves for row in rows_of(half)]
            assert got == rows_of(want)
    assert torch.equal(late.labels, one.train_batch(40, 1, 0, 1).labels)
    assert not torch.equal(one.train_batch(0, 0, 0, 1).input_ids, one.train_batch(1, 0, 0, 1).input_ids)


def rows_of(batch) -> list[list[int]]:
    """The sequences of a batch without padding (packed: as they are; unpacked: up to the last target)."""
    if batch.document_ids is not None:
        return [ids.tolist() for ids in batch.input_ids]
    out = []
    for ids, labels in zip(batch.input_ids, batch.labels):
        last = int((labels != IGNORE).nonzero().max()) + 2
        out.append(ids[:last].tolist())
    return out


def test_epochs_reshuffle_and_steps_per_epoch_counts_sequences(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    batches = build(make_recipe([str(many_rows(tmp_path))], train={"block_size": 64, "batch_size": 2}), tok)
    n = batches.stats.sequences
    assert batches.steps_per_epoch(1, 2, 1) == math.ceil(n / 2)
    assert batches.steps_per_epoch(2, 2, 2) == math.ceil(n / 8)
    assert batches.tokens_per_step(2) > batches.tokens_per_step(1) > 0
    assert batches._epoch(0) != batches._epoch(1)
    assert "packed into" in batches.describe() and "no validation rows" in batches.describe()


# --- weights -------------------------------------------------------------------------------------

def test_weights_repeat_rows_and_draw_fractional_subsets_per_epoch(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    sources = []
    for name, n, weight in (("a", 3, 2.0), ("b", 4, 0.5), ("c", 2, 0.0)):
        rows = [{"input": f"{name} {i}", "output": f"{name} answer {i}"} for i in range(n)]
        sources.append({"path": str(write_rows(tmp_path / f"{name}.jsonl", rows)), "weight": weight})
    batches = build(make_recipe(sources, finetune={"packing": False}, train={"batch_size": 1}), tok)
    assert batches.stats.rows_per_epoch == 3 * 2 + 2
    answer = {tuple(r.ids.tolist()): tok.decode(r.ids.tolist()).split("A: ")[1].split("<")[0]
              for r in batches.train_rows}
    epochs = []
    for e in range(6):
        drawn = [answer[tuple(rows_of(batches.train_batch(e * 8 + k, 0, 0, 1))[0])] for k in range(8)]
        epochs.append(Counter(drawn))
    for counts in epochs:
        assert all(counts[f"a answer {i}"] == 2 for i in range(3))
        assert sum(v for k, v in counts.items() if k.startswith("b")) == 2
        assert not any(k.startswith("c") for k in counts)
    assert len({k for counts in epochs for k in counts if k.startswith("b")}) == 4   # subsets differ by epoch


# --- validation ------------------------------------------------------------------------------------

def test_the_split_keeps_groups_and_copies_on_one_side(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    path = many_rows(tmp_path, n=60, group=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows += [rows[0]] * 5   # copies of one row
    write_rows(path, rows)
    batches = build(make_recipe([{"path": str(path)}], val_fraction=0.2, data={"group_by": "doc"}), tok)
    group = {n: row["metadata"]["doc"] for n, row in enumerate(rows, 1)}
    train_groups = {group[int(r.location.rsplit(":", 1)[1])] for r in batches.train_rows}
    val_groups = {group[int(r.location.rsplit(":", 1)[1])] for r in batches.val_rows}
    assert train_groups and val_groups and not train_groups & val_groups
    assert batches.stats.leaked == 0
    assert len(batches.val_rows) == pytest.approx(0.2 * len(rows), abs=4)


def test_a_small_val_fraction_still_holds_out_one_row(tmp_path, tokenizer_file):
    batches = build(make_recipe([str(many_rows(tmp_path, n=5))], val_fraction=0.01), tokenizer_for(tokenizer_file))
    assert (batches.n_train_rows, len(batches.val_rows)) == (4, 1)


def test_copies_between_train_and_val_rows_are_a_warning_with_counts(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    train = many_rows(tmp_path, n=10)
    val = write_rows(tmp_path / "val.jsonl", [json.loads(train.read_text().splitlines()[3]),
                                              {"input": "new", "output": "unseen"}])
    said: list[str] = []
    batches = build(make_recipe([str(train)], data={"val_rows": [str(val)]}), tok, messages=said)
    assert said == ["note: data.val_rows holds the validation rows, so data.val_fraction does not apply",
                    "warning: 1 of 2 validation rows are exact copies of training rows, so validation loss will look "
                    "better than the model is. Remove them from data.val_rows (fledge data split keeps copies on one "
                    "side)."]
    assert batches.stats.leaked == 1 and batches.stats.val_sources[0].val == 2
    assert "warning: 1 validation rows are exact copies" in batches.stats.format()


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_val_batches_hold_every_val_row_once_split_evenly_across_ranks(tmp_path, tokenizer_file, packing):
    tok = tokenizer_for(tokenizer_file)
    batches = build(make_recipe([str(many_rows(tmp_path, n=30))], val_fraction=0.3, finetune={"packing": packing},
                                train={"block_size": 64, "batch_size": 2}), tok)
    want = Counter(tuple(r.ids.tolist()) for r in batches.val_rows)
    for world in (1, 2, 3):
        per_rank = [batches.val_batches(rank, world) for rank in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        got = Counter()
        for batch in (b for rank in per_rank for b in rank):
            for k in range(batch.input_ids.shape[0]):
                seq = {"ids": batch.input_ids[k], "labels": batch.labels[k],
                       "documents": None if batch.document_ids is None else batch.document_ids[k]}
                for ids, labels in segments(seq):
                    if (labels != IGNORE).any():
                        n = int((labels != IGNORE).nonzero().max()) + 2 if seq["documents"] is None else len(ids)
                        got[tuple(ids[:n].tolist())] += 1
        assert got == want
    first = batches.val_batches(0, 1)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, batches.val_batches(0, 1)))


def test_zero_val_fraction_trains_without_validation(tmp_path, tokenizer_file):
    said: list[str] = []
    batches = build(make_recipe([str(many_rows(tmp_path, n=5))]), tokenizer_for(tokenizer_file), messages=said)
    assert batches.val_batches(0, 1) == [] and said == [
        "no validation rows: data.val_fraction is 0 and data.val_rows is empty"]


def test_stats_name_sources_lengths_and_trained_share(tmp_path, tokenizer_file):
    tok = tokenizer_for(tokenizer_file)
    batches = build(make_recipe(case_sources(tmp_path)), tok)
    text = batches.stats.format()
    for name, *_ in CASES:
        assert f"{name}.jsonl" in text
    s = batches.stats
    assert 0 < s.tokens_min <= s.tokens_median <= s.tokens_max and 0 < s.trained_share < 1
    assert f"median {s.tokens_median}" in text and "of tokens are trained" in text and "filled" in text


def test_parquet_rows_train_like_jsonl_rows(tmp_path, tokenizer_file):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tok = tokenizer_for(tokenizer_file)
    pq.write_table(pa.table({"messages": [CHAT3, CHAT3[1:3]]}), tmp_path / "chat.parquet")
    batches = build(make_recipe([str(tmp_path / "chat.parquet")]), tok)
    assert sorted(r.location for r in batches.train_rows) == [f"{tmp_path / 'chat.parquet'}:{n}" for n in (1, 2)]


# --- packed rows compute what they compute alone -------------------------------------------------------

def test_a_packed_batch_gives_each_row_its_own_loss_in_fledge_gpt(tmp_path, tokenizer_file):
    from fledge.model.gpt import GPT, GPTConfig
    tok = tokenizer_for(tokenizer_file, "chatml")
    batches = build(make_recipe(case_sources(tmp_path) + [str(many_rows(tmp_path))], train={"block_size": 160}),
                    tok, "chatml")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(tok), n_layers=2, n_heads=2, dim=32, max_seq_len=160)).eval()
    batch = batches.train_batch(0, 0, 0, 1)
    assert batch.document_ids.max() > 0   # several rows share a sequence
    with torch.no_grad():
        _, packed = model(**batch.model_inputs(), reduction="none")
        for b in range(batch.input_ids.shape[0]):
            docs = batch.document_ids[b]
            for d in docs.unique().tolist():
                if d < 0:
                    continue
                where = docs == d
                _, alone = model(batch.input_ids[b][where][None], batch.labels[b][where][None], reduction="none")
                torch.testing.assert_close(packed[b][where], alone[0], atol=1e-5, rtol=1e-5)
