"""Merging adapters: for a fledge base (with template tokens added) and a tiny transformers llama, the
merged folder gives the unmerged run's logits and answers through fledge, loads into the base's own
class and with AutoModelForCausalLM / AutoTokenizer, and serves as the base of another fine-tune; a
run with full weights has nothing to merge; an output folder fledge did not write is never touched."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from fledge import cli
from fledge.errors import CheckpointError
from fledge.merge import MARKER, merge
from fledge.model.bases import TransformersLM, load_base
from fledge.model.gpt import GPT
from fledge.recipe import load_recipe
from fledge.sample import load_for_inference, sample
from fledge.templates import render
from fledge.train.checkpoint import latest_checkpoint, verify_checkpoint
from finetuned_runs import A1, A2, CONVERSATIONS, Q1, Q2, fledge_base, finetune, hf_base, messages

KINDS = {"fledge": "chatml", "hf": "qa"}     # base kind: template (chatml adds tokens the adapters train)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge")
    bases = {"fledge": fledge_base(root), "hf": hf_base(root)}
    tuned = {kind: finetune(root, f"lora-{kind}", bases[kind], method="lora", template=template)
             for kind, template in KINDS.items()}
    tuned["full"] = finetune(root, "full", bases["fledge"], method="full", steps=1)
    return tuned


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_merged_weights_give_the_unmerged_logits_everywhere_they_load(runs, kind):
    ft = runs[kind]
    folder = merge(ft.run)
    assert folder == ft.run / "merged"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "recipe.yaml", "state.json", "integrity.json", MARKER} <= \
        {p.name for p in folder.iterdir()}
    assert not (folder / "adapter_model.safetensors").exists()
    verify_checkpoint(folder)
    assert json.loads((folder / "state.json").read_text()).get("base_sha256") is None    # whole weights now
    unmerged, merged = load_for_inference(ft.run), load_for_inference(folder)
    ids = torch.tensor([render(messages(*CONVERSATIONS[2]), ft.tokenizer, ft.template).input_ids])
    expected = logits(unmerged.model, ids)
    torch.testing.assert_close(logits(merged.model, ids), expected, atol=1e-5, rtol=1e-4)
    if kind == "fledge":                                 # the base's own class, no adapter layers left
        assert type(merged.model) is GPT
    else:
        assert type(merged.model) is TransformersLM and type(merged.model.hf) is LlamaForCausalLM
    assert merged.template.name == KINDS[kind] and sample(folder, Q2, temperature=0.0, max_new_tokens=30) == [A2]

    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(folder)
    conversation = messages(*CONVERSATIONS[2])
    assert tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"] == ids[0].tolist()

    recipe = load_recipe(None, base={"model": {"base": str(folder)}, "finetune": {"method": "lora"},
                                     "train": {"block_size": 64}}, check_machine=False)
    base, _ = load_base(recipe, "cpu")                  # the base of another fine-tune
    assert base.chat_template.name == KINDS[kind]
    torch.testing.assert_close(logits(base.model.eval(), ids), expected, atol=1e-5, rtol=1e-4)


def test_merging_again_replaces_the_earlier_merge_and_empty_folders_are_used(runs, tmp_path):
    run = runs["hf"].run
    first = merge(run)
    (first / "stale.txt").write_text("from before")
    assert merge(run) == first and not (first / "stale.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge(run, empty) == empty and (empty / MARKER).is_file()
    assert not list(run.glob(".*merg*")) and not list(tmp_path.glob(".*"))      # no staging left behind


def test_a_folder_fledge_did_not_write_is_never_touched(runs, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli.main(["merge", str(runs["hf"].run), "-o", str(mine)]) == 1
    err = capsys.readouterr().err
    assert "fledge did not write it" in err and "notes.txt" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        merge(runs["hf"].run, tmp_path / "a-file")


def test_a_run_with_full_weights_has_nothing_to_merge(runs, capsys):
    capsys.readouterr()
    assert cli.main(["merge", str(runs["full"].run)]) == 1
    err = capsys.readouterr().err
    assert "there are no adapters to merge" in err and "finetune.method full" in err
    assert len(err.strip().splitlines()) == 1
    assert not (runs["full"].run / "merged").exists()


def test_the_merge_command_names_the_folder(runs, tmp_path, capsys):
    out = tmp_path / "exports" / "merged-fledge"
    assert cli.main(["merge", str(latest_checkpoint(runs["fledge"].run)), "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: full weights")
    assert sample(out, Q1, temperature=0.0, max_new_tokens=30) == [A1]


def test_a_qlora_run_samples_on_its_quantized_base_and_merges_into_full_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    ft = finetune(tmp_path, "qlora", hf_base(tmp_path), method="qlora")
    loaded = load_for_inference(ft.run)
    assert any(type(m).__module__.startswith("bitsandbytes") for m in loaded.model.modules())    # as trained
    assert sample(ft.run, Q1, temperature=0.0, max_new_tokens=30) == [A1]
    merged = load_for_inference(merge(ft.run))
    assert type(merged.model.hf) is LlamaForCausalLM and merged.model.hf.dtype == torch.float32
    assert sample(ft.run / "merged", Q1, temperature=0.0, max_new_tokens=30) == [A1]
