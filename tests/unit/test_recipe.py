"""Recipe loading: every problem reported together, closest key suggested, ranges named,
overrides checked the same way, and every shipped recipe under recipes/ validates."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from fledge.errors import RecipeError
from fledge.model.registry import PRESETS
from fledge.recipe import Recipe, describe_keys, load_recipe

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_load_and_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: demo\n"))
    assert recipe.name == "demo" and recipe.run_path == Path("runs/demo")
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again == recipe


def test_all_problems_reported_together_with_closest_key(tmp_path):
    text = "train:\n  lr: fast\n  max_step: 10\n  batch_size: 0\nmodel:\n  n_layer: 2\ntokenizer:\n  kind: wordpiece\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    msg = str(e.value)
    assert "4 problems" not in msg and "problems" in msg
    assert "train.lr must be a number, got 'fast'" in msg
    assert "unknown key train.max_step; did you mean train.max_steps?" in msg
    assert "train.batch_size is 0; it must be at least 1" in msg
    assert "did you mean model.n_layers?" in msg
    assert "tokenizer.kind is 'wordpiece'; choose one of bpe, sentencepiece, char" in msg


def test_cross_key_rules(tmp_path):
    text = "train:\n  block_size: 2048\n  warmup_steps: 50\n  max_steps: 10\nmodel:\n  max_seq_len: 512\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    assert "train.block_size (2048) exceeds model.max_seq_len (512)" in str(e.value)
    assert "train.warmup_steps (50) exceeds train.max_steps (10)" in str(e.value)


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-3\n")
    recipe = load_recipe(path, ["train.lr=3e-4", "model.n_layers=2", "data.sources=[a.txt, b.txt]"])
    assert recipe.train.lr == 3e-4 and recipe.model.n_layers == 2 and recipe.data.sources == ["a.txt", "b.txt"]
    with pytest.raises(RecipeError, match="did you mean train.lr"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(path, ["train.lr"])


def test_preset_fills_unset_model_keys_only(tmp_path):
    recipe = load_recipe(write(tmp_path, "model:\n  preset: 15m\n  n_layers: 3\n"))
    assert (recipe.model.dim, recipe.model.n_heads, recipe.model.n_layers, recipe.model.hidden_dim) == (512, 8, 3, 1280)
    recipe = load_recipe(write(tmp_path, "model:\n  preset: 15m\n  dim: 384\n"))
    assert recipe.model.hidden_dim == 0        # the default 8/3 x 384 applies, not the preset's MLP
    with pytest.raises(RecipeError, match="Presets: 1m"):
        load_recipe(write(tmp_path, "model:\n  preset: 16m\n"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_true_to_their_names_and_export_friendly(name):
    """Non-embedding parameters within 10% of the name; every matrix row a multiple of 256 (llama.cpp's
    K-quant blocks) and heads 64 wide."""
    from fledge.model.gpt import GPT, GPTConfig
    p = PRESETS[name]
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=8, **{k: v for k, v in p.items() if k != "max_seq_len"}))
    body = sum(t.numel() for key, t in model.named_parameters() if "embed_tokens" not in key and "lm_head" not in key)
    assert abs(body / (float(name[:-1]) * 1e6) - 1) < 0.1, body
    assert p["dim"] % 256 == 0 and p["hidden_dim"] % 256 == 0 and p["dim"] // p["n_heads"] == 64


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe.yaml:2: not valid YAML"):
        load_recipe(write(tmp_path, "train:\n  lr: 1e-3: x\n"))


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe("does/not/exist.yaml")


def test_every_key_has_help():
    rows = describe_keys()
    assert len(rows) > 40
    assert all(helptext for _, _, helptext in rows)


RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
RUN_RECIPES = [p for p in RECIPES if p.parent.name != "data"]   # recipes/data/: the data tools' specs


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_shipped_recipe_opens_with_its_command(path):
    assert path.read_text().splitlines()[0].startswith("# fledge "), f"{path} must open with the command that runs it"


@pytest.mark.parametrize("path", RUN_RECIPES, ids=[str(p.relative_to(REPO)) for p in RUN_RECIPES])
def test_shipped_run_recipe_validates(path):
    load_recipe(path)


# --- values that pass a range check by accident, and hostile text ---------------------------

def float_keys(cls=Recipe, prefix: str = "") -> list[str]:
    """Every recipe key typed float, found by walking the dataclasses."""
    out = []
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            out += float_keys(typ, f"{prefix}{f.name}.")
        elif typ is float:
            out.append(prefix + f.name)
    return out


FLOAT_KEYS = float_keys()


def test_float_keys_are_found():
    assert {"train.lr", "model.norm_eps", "sample.top_p", "data.val_fraction"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_floats_are_refused_with_the_key_named(key, value):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [f"{key}={value}"])
    assert f"{key} is {float(yaml.safe_load(value))}; it must be a finite number" in str(e.value)


def test_an_integer_too_large_for_a_float_is_a_type_problem(tmp_path):
    with pytest.raises(RecipeError, match="train.lr must be a number"):
        load_recipe(write(tmp_path, f"train:\n  lr: {10**400}\n"))


def test_train_seed_must_fit_torch(tmp_path):
    with pytest.raises(RecipeError, match=r"train.seed is 18446744073709551616; it must be from 0 to"):
        load_recipe(None, [f"train.seed={2**64}"])


@pytest.mark.parametrize("item, fragment", [
    ("train.lr=[1,", "the value is not valid YAML"),
    ("train.lr=@x", "the value is not valid YAML"),
    ("=3", "empty part"),
    ("train.=3", "empty part"),
    (".lr=3", "empty part"),
    ("train..lr=3", "empty part"),
])
def test_bad_overrides_are_one_line(item, fragment):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [item])
    message = str(e.value)
    assert fragment in message and len(message.splitlines()) == 1 and repr(item) in message


def test_override_value_surrounded_by_tabs_is_read(tmp_path):
    assert load_recipe(None, ["train.lr=\t3e-4 "]).train.lr == 3e-4


def test_non_utf8_recipe_names_the_file_and_byte(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path} (byte 9): not UTF-8") and len(str(e.value).splitlines()) == 1


def test_yaml_error_without_a_line_is_one_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "train: !!python/object:os.system x\n"))
    assert "not valid YAML" in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("arch", [".foo:bar", "foo:.bar", "foo.:bar", "foo:bar:baz", "1foo:bar", "foo bar:x"])
def test_malformed_arch_reference_is_a_recipe_problem(arch):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [f"model.arch={arch}"])
    assert "model.arch" in str(e.value) and len(str(e.value).splitlines()) == 1
    if arch.startswith("."):
        assert "Relative imports are not allowed" in str(e.value)


def test_arch_module_that_fails_on_import_is_a_recipe_problem(tmp_path, monkeypatch):
    (tmp_path / "fledge_broken_arch.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match="importing fledge_broken_arch failed: RuntimeError: boom"):
        load_recipe(None, ["model.arch=fledge_broken_arch:build"])


def test_saved_recipe_naming_code_is_refused_without_permission(tmp_path):
    with pytest.raises(RecipeError, match="--allow-code"):
        load_recipe(write(tmp_path, "model:\n  arch: some_module:build\n"), allow_code=False)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "a\\b", ".hidden", "..", "", "-x", "a b"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, base={"name": name})
    assert f"name {name!r} must be a plain folder name" in str(e.value) and "run_dir" in str(e.value)


def test_run_name_and_run_dir_that_are_fine():
    assert load_recipe(None, base={"name": "gpt-2_small.v1"}).run_path == Path("runs/gpt-2_small.v1")
    assert load_recipe(None, base={"run_dir": "../elsewhere/x"}).run_path == Path("../elsewhere/x")


def test_tensorboard_without_the_package_is_caught_at_load_time(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RecipeError, match=r"train.tensorboard is true but the tensorboard package is not "
                                          r"installed. Install it with pip install 'fledge\[tensorboard\]'"):
        load_recipe(None, ["train.tensorboard=true"])
    assert load_recipe(None, ["train.tensorboard=true"], check_machine=False).train.tensorboard


def test_fp16_on_a_cpu_is_caught_at_load_time(monkeypatch):
    import torch
    with pytest.raises(RecipeError, match="train.precision fp16 does not run on a CPU"):
        load_recipe(None, ["train.precision=fp16", "train.device=cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="has no CUDA or MPS device"):
        load_recipe(None, ["train.precision=fp16"])
    assert load_recipe(None, ["train.precision=fp16"], check_machine=False).train.precision == "fp16"
    assert load_recipe(None, ["train.precision=fp16", "train.device=cuda"]).train.precision == "fp16"


def test_save_is_atomic_and_refuses_a_folder(tmp_path):
    from fledge.errors import StorageError
    recipe = load_recipe(None, base={"name": "demo"})
    recipe.save(tmp_path / "deep" / "recipe.yaml")
    assert load_recipe(tmp_path / "deep" / "recipe.yaml") == recipe
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["recipe.yaml"]
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(StorageError, match="is a folder"):
        recipe.save(tmp_path / "folder.yaml")


# --- eval: and train.select_by ---------------------------------------------------------------------

ROWS = {"data": {"rows": ["rows.jsonl"]}, "model": {"base": "runs/base"}}


def test_eval_keys_load_with_percent_targets_and_round_trip(tmp_path):
    recipe = load_recipe(None, base={**ROWS, "eval": {"validate": ["json", "regex:pattern=^a"], "every": 50,
                                                      "rows": 16, "targets": {"json": "85%", "ppl": 20}},
                                     "train": {"select_by": "json", "early_stop_patience": 3}})
    e = recipe.eval
    assert (e.data, e.every, e.rows, e.max_new_tokens) == ("", 50, 16, 0)
    assert e.targets == {"json": 0.85, "ppl": 20.0} and recipe.train.select_by == "json"
    assert load_recipe(write(tmp_path, recipe.to_yaml())) == recipe
    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("ra\nsu\n")
    recipe = load_recipe(None, base={"eval": {"data": "val.jsonl", "validate": [f"vocabulary:path={vocabulary}"],
                                              "every": 5, "targets": {"purity": 0.85, "adherence": 0.8}},
                                     "train": {"select_by": "adherence"}})
    assert recipe.eval.data == "val.jsonl"


@pytest.mark.parametrize("keys, message", [
    ({"eval": {"targets": {"purty": 0.8}}}, "eval.targets.purty: this evaluation computes no metric 'purty'"),
    ({"eval": {"targets": {"purity": 0.8}}}, "eval.targets.purity: this evaluation computes no metric 'purity'. It "
                                             "comes from the vocabulary validator: add vocabulary:path=WORDS_FILE "
                                             "to eval.validate."),
    ({"eval": {"validate": ["json"], "targets": {"dot": 0.9}}}, "eval.targets.dot: this evaluation computes no "
                                                                "metric 'dot'. Add dot to eval.validate"),
    ({"eval": {"validate": ["json"], "targets": {"json": 90}}}, "eval.targets.json (90): json is a share between 0 "
                                                                "and 1; did you mean 0.9?"),
    ({"eval": {"targets": {"ppl": 0}}}, "eval.targets.ppl (0): perplexity is a positive number"),
    ({"eval": {"validate": ["jsn"]}}, "eval.validate[0] 'jsn': no validator 'jsn'; did you mean 'json'?"),
    ({"eval": {"validate": ["json", "json"]}}, "eval.validate 'json' is given twice"),
    ({"eval": {"validate": [{"json": {}}]}}, "eval.validate[0] is {'json': {}}; write each validator as NAME"),
    ({"train": {"select_by": "jsn"}, "eval": {"validate": ["json"], "every": 5}},
     "train.select_by 'jsn' is not a metric the evaluations compute. Did you mean 'json'? Choose val_loss or one "
     "of exact_match, normalized_match, json"),
    ({"train": {"select_by": "dot"}, "eval": {"every": 5}}, "train.select_by 'dot' is not a metric the evaluations "
                                                            "compute. Add dot to eval.validate to measure it."),
    ({"train": {"select_by": "ppl"}}, "train.select_by 'ppl': the loss measured during training is the validation "
                                      "loss; write val_loss"),
    ({"train": {"select_by": "exact_match"}}, "train.select_by 'exact_match' is measured on generated answers, and "
                                              "eval.every is 0"),
    ({"eval": {"every": 5}, "data": {"rows": ["rows.jsonl"], "val_fraction": 0.0}},
     "eval.every (5) generates answers to held-out rows during training, and this run has none: give eval.data"),
])
def test_eval_problems_are_one_line_naming_the_key(keys, message):
    base = {**ROWS, **keys}
    with pytest.raises(RecipeError) as e:
        load_recipe(None, base=base)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_eval_validators_are_built_when_the_recipe_runs_here_only(tmp_path):
    """A missing word list or module is found at load time for a recipe about to run; a saved recipe
    (allow_code=False, as inference reads one) never imports code or reads files for it."""
    base = {"eval": {"validate": [f"vocabulary:path={tmp_path / 'nope.txt'}", "nomodule.sub:check"]}}
    with pytest.raises(RecipeError, match=r"eval.validate: vocabulary validator: .*nope.txt does not exist"):
        load_recipe(None, base=base)
    assert load_recipe(None, base=base, allow_code=False, check_machine=False).eval.validate == base["eval"]["validate"]
