"""The reference users' real rows (../shared/data) become batches whose trained tokens are their answers.

    OMP_NUM_THREADS=1 pytest tests/unit/train/test_rows_real.py -q -s     # -s prints the stats

Skipped, saying why, when ../shared/data is absent. One recipe per user: persona chats as bare
message arrays (qa, user 5), code -> DOT pairs with their own field names (chatml and a system
prompt, user 3), Cypher instructions with a chat file beside them (llama-3, user 4), conlang
pairs with 5 rows whose output is empty (plain, user 1).
"""

from __future__ import annotations

from collections import Counter

import pytest

from fledge.data.records import FieldMap, Record, scan_file
from fledge.recipe import load_recipe
from fledge.templates import BUILTINS, add_template_tokens, hf_tokenizer
from fledge.tokenizer import train_tokenizer
from fledge.train.rows import build_row_batches

from conftest import shared_data
from test_rows import epoch_sequences, segments, trained_runs

DOT_SYSTEM = "You are a DOT graph generator. Answer with one Graphviz graph."
# name: (sources, template, block_size, system, bad rows skipped)
USERS = {
    "arianna": ([{"path": "arianna/arianna_conversations.jsonl"}], "qa", 1024, "", 0),
    "dot": ([{"path": "dot/smcat_pairs.json", "format": "io", "input_field": "input_code",
              "output_field": "output_dot"}], "chatml", 2048, DOT_SYSTEM, 0),
    "nornicdb": ([{"path": "nornicdb/cypher_training_count1000_seed42.jsonl"}, {"path": "nornicdb/tlp_chat.jsonl"}],
                 "llama-3", 256, "", 0),
    "limn": ([{"path": "limn/limn_train_first3000.jsonl"}], "plain", 128, "", 5),
}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    texts = [shared_data(path).read_text(encoding="utf-8")[:400_000] for path in (
        "arianna/arianna_conversations.jsonl", "dot/smcat_pairs.json",
        "nornicdb/cypher_training_count1000_seed42.jsonl", "limn/limn_train_first3000.jsonl")]
    config = load_recipe(None, base={"tokenizer": {"kind": "bpe", "vocab_size": 2000}}).tokenizer
    return train_tokenizer(config, texts).save(tmp_path_factory.mktemp("tok") / "bpe")


@pytest.mark.parametrize("user", USERS)
def test_real_rows_train_exactly_their_answers(user, tokenizer_file):
    sources, template_name, block, system, skipped = USERS[user]
    sources = [{**s, "path": str(shared_data(s["path"]))} for s in sources]
    tok = hf_tokenizer(tokenizer_file)
    add_template_tokens(tok, template_name)
    template = BUILTINS[template_name]
    recipe = load_recipe(None, base={
        "model": {"base": "unused", "max_seq_len": 4096}, "template": {"system": system},
        "data": {"rows": sources, "on_bad_row": "skip", "val_fraction": 0.1},
        "train": {"block_size": block, "batch_size": 8}, "finetune": {"on_too_long": "drop"}}, check_machine=False)
    said: list[str] = []
    batches = build_row_batches(recipe, tok, template, say=said.append)
    stats = batches.stats
    print(f"\n--- {user} ({template_name}, block {block})\n{stats.format()}\n{batches.describe()}")

    records: dict[str, Record] = {}
    for s in sources:
        fields = FieldMap(s.get("input_field", ""), s.get("output_field", ""))
        records.update((r.location, r) for r in scan_file(s["path"], fields, fmt=s.get("format", "auto"))
                       if isinstance(r, Record))
    end = template.end_token or tok.eos_token
    for row in batches.train_rows + batches.val_rows:
        record = records[row.location]
        answers = [m["content"] for m in record.messages if m["role"] == "assistant"]
        decoded = [tok.decode(run, skip_special_tokens=False) for run in trained_runs(row.labels)]
        assert decoded == [template.answer_lead + a + end for a in answers], row.location
    kept = len(batches.train_rows) + len(batches.val_rows)
    assert kept + len(stats.dropped) == len(records) and len(stats.skipped) == skipped
    assert stats.leaked == 0 and stats.efficiency > 0.8
    # the first epoch through train_batch holds every training row once
    seen = Counter(tuple(ids.tolist()) for seq in epoch_sequences(batches) for ids, _ in segments(seq))
    assert seen == Counter(tuple(r.ids.tolist()) for r in batches.train_rows)
