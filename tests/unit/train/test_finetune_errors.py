"""Fine-tunes through `fledge train` (in-process): bad input is one line and a non-zero exit (a base
that does not exist or is no causal LM, a template that renders no row, rows with nothing to
train, a recipe naming another tokenizer than the base's, bad rows without --skip-invalid), and
--skip-invalid reports what it dropped. Continued pretraining (data.sources with model.base)
prepares the corpus with the base's tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from fledge.cli import main
from fledge.errors import RecipeError
from fledge.recipe import TokenizerConfig, load_recipe
from fledge.tokenizer import find_tokenizer_file, train_tokenizer
from fledge.train import checkpoint as ckpt
from fledge.train import train
from test_finetune import base_run, rows_file  # noqa: F401  (a module fixture)
from tiny_runs import CORPUS

TRAIN = {"max_steps": 4, "batch_size": 4, "block_size": 64, "lr": 3e-3, "warmup_steps": 1, "log_every": 2,
         "eval_every": 4, "eval_batches": 1, "checkpoint_every": 0, "threads": 1}


def write_recipe(root: Path, name: str, base, **sections) -> Path:
    recipe = {"name": name, "run_dir": str(root / "runs" / name), "model": {"base": str(base)},
              "data": {"rows": [str(rows_file(root))], "val_fraction": 0.2}, "template": {"name": "qa"},
              "finetune": {"method": "lora", "lora_r": 4}, "train": dict(TRAIN), "sample": {"prompts": []}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fledge_train(capsys, recipe: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["train", str(recipe), "--quiet", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *expected: str) -> None:
    """A non-zero exit whose error is one line, the last one (transformers' progress bars may precede it)."""
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for text in expected:
        assert text in errors[0], errors[0]


def test_a_base_that_does_not_exist(tmp_path, capsys):
    code, _, err = fledge_train(capsys, write_recipe(tmp_path, "missing", tmp_path / "runs" / "nothing-here"))
    one_line_error(code, err, "model.base", "no such folder")


def test_a_base_of_an_unsupported_kind(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    code, _, err = fledge_train(capsys, write_recipe(tmp_path, "bert", tmp_path / "bert"))
    one_line_error(code, err, "not a causal language model")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    code, _, err = fledge_train(capsys, write_recipe(tmp_path, "notes", tmp_path / "notes"))
    one_line_error(code, err, "neither a fledge run", "readme.txt")


def test_a_template_that_renders_no_row(base_run, tmp_path, capsys):  # noqa: F811
    plain = "{%- for m in messages -%}{{ m['content'] + '\\n' }}{%- endfor -%}"
    code, _, err = fledge_train(capsys, write_recipe(tmp_path, "no-blocks", base_run, template={"jinja": plain}))
    one_line_error(code, err, "{% generation %}")
    code, _, err = fledge_train(capsys, write_recipe(tmp_path, "no-name", base_run, template={"name": ""}))
    one_line_error(code, err, "template.name is empty", "carries no chat template")


def test_rows_with_no_trainable_tokens(base_run, tmp_path, capsys):  # noqa: F811
    recipe = write_recipe(tmp_path, "too-long", base_run, finetune={"max_length": 8, "on_too_long": "drop"})
    code, _, err = fledge_train(capsys, recipe)
    one_line_error(code, err, "no trainable tokens")


def test_a_recipe_naming_another_tokenizer_than_the_base_s(base_run, tmp_path, capsys):  # noqa: F811
    other = train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), ["completely different text!"])
    recipe = write_recipe(tmp_path, "other-tok", base_run, tokenizer={"path": str(other.save(tmp_path))})
    code, _, err = fledge_train(capsys, recipe)
    one_line_error(code, err, "tokenizer.path", "another tokenizer")
    code, _, err = fledge_train(capsys, write_recipe(tmp_path, "other-kind", base_run, tokenizer={"kind": "bpe"}))
    one_line_error(code, err, "tokenizer.kind: recipe 'bpe'", "has 'char'")


def test_bad_rows_stop_the_run_unless_skipped_and_reported(base_run, tmp_path, capsys):  # noqa: F811
    rows = tmp_path / "bad.jsonl"
    good = [json.dumps({"input": f"{i} little pigs", "output": f"the {i % 7} wolves"}) for i in range(40)]
    rows.write_text("\n".join(good[:2] + ['{"input": "4 little pigs", "output": '] + good[2:]) + "\n")
    recipe = write_recipe(tmp_path, "bad-rows", base_run, data={"rows": [str(rows)]})
    code, _, err = fledge_train(capsys, recipe)
    one_line_error(code, err, "bad.jsonl:3")
    code, out, err = fledge_train(capsys, recipe, "--skip-invalid")
    assert code == 0, err
    assert "bad rows skipped: 1 (" in out and "bad.jsonl:3" in out


def test_continued_pretraining_prepares_the_corpus_with_the_base_s_tokenizer(base_run, tmp_path, capsys):  # noqa: F811
    (tmp_path / "more.txt").write_text(CORPUS[::-1])
    recipe = write_recipe(tmp_path, "continued", base_run, finetune={"method": "full"}, template={"name": ""},
                          data={"rows": [], "sources": [str(tmp_path / "more.txt")]},
                          train={**TRAIN, "block_size": 32}, sample={"prompts": ["1 "], "max_new_tokens": 4})
    code, out, err = fledge_train(capsys, recipe)
    assert code == 0, err
    base_file = find_tokenizer_file(ckpt.best_checkpoint(base_run))
    manifest = json.loads((tmp_path / "runs" / "continued" / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(base_file.read_bytes()).hexdigest()
    folder = ckpt.latest_checkpoint(tmp_path / "runs" / "continued")
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names and "chat_template.jinja" not in names
    assert "full fine-tune of" in out and "summary:" in out


def test_continued_pretraining_refuses_shards_of_another_tokenizer(base_run, tmp_path):  # noqa: F811
    from fledge.prepare import prepare
    (tmp_path / "more.txt").write_text(CORPUS.upper())
    recipe = load_recipe(write_recipe(tmp_path, "own-tok", base_run, finetune={"method": "full"},
                                      template={"name": ""}, data={"rows": [], "sources": [str(tmp_path / "more.txt")]},
                                      train={**TRAIN, "block_size": 32}))
    own = load_recipe(None, base={**recipe.to_dict(), "tokenizer": {"kind": "char", "vocab_size": 64}})
    prepare(own, progress=False)            # its own tokenizer: `fledge prepare` would have used the base's
    with pytest.raises(RecipeError, match="tokenized with another tokenizer than base") as e:
        train(recipe, progress=False)
    assert "\n" not in str(e.value)


def test_continued_pretraining_needs_a_tokenizer_fledge_reads(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    (tmp_path / "more.txt").write_text(CORPUS)
    recipe = write_recipe(tmp_path, "no-tok", tmp_path / "llama", finetune={"method": "full"}, template={"name": ""},
                          data={"rows": [], "sources": [str(tmp_path / "more.txt")]})
    code, _, err = fledge_train(capsys, recipe)
    one_line_error(code, err, "continued pretraining", "has no tokenizer.json")


def test_prepare_of_a_rows_recipe_says_train_reads_rows(base_run, tmp_path, capsys):  # noqa: F811
    code = main(["prepare", str(write_recipe(tmp_path, "rows-prepare", base_run)), "--quiet"])
    one_line_error(code, capsys.readouterr().err, "data.rows are read by `fledge train` itself")


def test_continued_pretraining_of_a_transformers_base_reads_its_tokenizer_json(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from test_finetune import hf_base
    base = hf_base(tmp_path, "llama")
    (tmp_path / "more.txt").write_text(CORPUS[::-1])
    recipe = write_recipe(tmp_path, "hf-continued", base, finetune={"method": "full"}, template={"name": ""},
                          data={"rows": [], "sources": [str(tmp_path / "more.txt")]},
                          train={**TRAIN, "block_size": 32}, sample={"prompts": ["1 "], "max_new_tokens": 4})
    code, out, err = fledge_train(capsys, recipe)
    assert code == 0, err
    manifest = json.loads((tmp_path / "runs" / "hf-continued" / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((base / "tokenizer.json").read_bytes()).hexdigest()
    AutoModelForCausalLM.from_pretrained(ckpt.latest_checkpoint(tmp_path / "runs" / "hf-continued"))
