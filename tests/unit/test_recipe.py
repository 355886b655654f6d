"""Recipe loading: every problem reported together, closest key suggested, ranges named,
overrides checked the same way, and every shipped recipe under recipes/ validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from fledge.errors import RecipeError
from fledge.recipe import describe_keys, load_recipe

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
    assert (recipe.model.dim, recipe.model.n_heads, recipe.model.n_layers) == (288, 6, 3)
    with pytest.raises(RecipeError, match="Presets: 1m"):
        load_recipe(write(tmp_path, "model:\n  preset: 16m\n"))


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
