"""Generation evaluations during training (eval.every, fledge.train.evalstage) on tiny LoRA
fine-tunes: the answers are scored and logged without changing what trains; `train.select_by` a
validator's pass rate keeps the checkpoint the planted answers make best, not val loss's; early
stopping counts evaluations of that metric; a killed run resumes onto the uninterrupted one; every
process stops together; `fledge eval RUN` takes its data, validators and targets from the recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fledge.cli import main
from fledge.env import matmul_peak, pick_precision
from fledge.recipe import load_recipe
from fledge.sample import resolve_checkpoint
from fledge.train import checkpoint as ckpt
from fledge.train import loop, train
from fledge.train.checkpoint import TrainingState
from fledge.train.distributed import Distributed
from fledge.train.report import Reporter, read_metrics
from tiny_runs import losses, make_recipe, rows_file

EVAL = {"every": 4, "rows": 6, "validate": ["json"], "targets": {"json": 0.5, "ppl": 100}}


class Killed(BaseException):
    """SIGKILL: the run stops where it is and nothing is caught."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-stage")


@pytest.fixture(scope="module")
def base_run(root) -> Path:
    recipe = make_recipe(root, "base", max_steps=20, eval_every=10, checkpoint_every=10, log_every=10)
    train(recipe, progress=False)
    return recipe.run_path


def ft_recipe(root: Path, base: Path, name: str, *, eval: dict | None = None, **train_keys):
    """A LoRA fine-tune with adapter dropout (it draws from the global RNG every step)."""
    t = dict(max_steps=12, batch_size=4, block_size=64, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=4,
             eval_every=4, eval_batches=2, checkpoint_every=4, keep_last=10, threads=1, seed=11)
    t.update(train_keys)
    return load_recipe(None, base={
        "name": name, "run_dir": str(root / "runs" / name), "model": {"base": str(base)},
        "data": {"rows": [str(rows_file(root))], "val_fraction": 0.2}, "template": {"name": "chatml"},
        "finetune": {"method": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "train": t, "eval": eval or {}, "sample": {"prompts": ["3 little pigs"], "max_new_tokens": 6}})


def generation_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "eval_metrics" in r]


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}


def plant_answers(monkeypatch, shares: list[float]) -> list[int]:
    """Evaluation i answers valid JSON ("true") on shares[i] of its rows and "nope" on the rest."""
    import fledge.evaluate.run as run
    calls: list[int] = []

    def answers(subject, prompts, decoding, *, say=None):
        share = shares[len(calls)]
        calls.append(len(prompts))
        good = round(share * len(prompts))
        return ["true"] * good + ["nope"] * (len(prompts) - good)

    monkeypatch.setattr(run, "generate_answers", answers)
    return calls


@pytest.fixture(scope="module")
def plain_and_evaluated(root, base_run):
    """The same fine-tune without and with generation evaluations (json, targets) every 4 steps."""
    plain = train(ft_recipe(root, base_run, "plain"), progress=False)
    evaluated = train(ft_recipe(root, base_run, "evaluated", eval=EVAL), progress=False)
    return plain, evaluated


def test_answers_are_scored_and_logged_and_training_is_unchanged(plain_and_evaluated):
    plain, evaluated = plain_and_evaluated
    rows = generation_rows(evaluated.run_dir)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        assert set(r["eval_metrics"]) == {"exact_match", "normalized_match", "json"}
        assert all(0 <= v <= 1 for v in r["eval_metrics"].values())
        assert r["eval_rows"] == 6 and r["eval_counts"]["exact_match"]["n"] == 6
        assert set(r["eval_targets"]) == {"json"}          # ppl is for `fledge eval`: training's loss is elsewhere
    assert not generation_rows(plain.run_dir)
    # Generation draws nothing from the global RNG: with LoRA dropout on, the same losses and adapters.
    assert losses(evaluated.run_dir) == losses(plain.run_dir)
    assert val_losses(evaluated.run_dir) == val_losses(plain.run_dir)
    a, b = (load_file(str(r.last_checkpoint / "adapter_model.safetensors")) for r in (plain, evaluated))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((evaluated.last_checkpoint / "state.json").read_text())
    assert state["select_by"] == "val_loss" and state["eval_metrics"] == rows[-1]["eval_metrics"]
    best = json.loads((evaluated.run_dir / "checkpoints" / "best.json").read_text())
    assert best["select_by"] == "val_loss" and best["value"] == best["val_loss"] == evaluated.best_val_loss


def test_the_subset_is_fixed_and_greedy_answers_repeat(root, base_run, monkeypatch):
    """The same rows at every evaluation (seeded, in file order), answered by the real generation."""
    from fledge.train import evalstage
    seen = []
    real = evalstage.EvalStage.run

    def run(self, precision):
        seen.append([r.location for r in self.records])
        return real(self, precision)

    monkeypatch.setattr(evalstage.EvalStage, "run", run)
    train(ft_recipe(root, base_run, "fixed", max_steps=8, eval={"every": 4, "rows": 5}), progress=False)
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == 5
    lines = [int(loc.rsplit(":", 1)[1]) for loc in seen[0]]
    assert lines == sorted(lines)


def test_select_by_a_validator_keeps_the_checkpoint_its_planted_answers_make_best(root, base_run, monkeypatch,
                                                                                 capsys):
    calls = plant_answers(monkeypatch, [0.25, 1.0, 0.5])       # evaluations at steps 4, 8 and 12
    result = train(ft_recipe(root, base_run, "by-json", eval={"every": 4, "rows": 4, "validate": ["json"]},
                             select_by="json", checkpoint_every=0, keep_last=1), progress=False)
    out = capsys.readouterr().out
    assert calls == [4, 4, 4]
    val = val_losses(result.run_dir)
    assert min(val, key=val.get) == 12                        # val_loss would keep step 12
    run = result.run_dir
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best == {"checkpoint": "step-000008", "select_by": "json", "value": 1.0, "val_loss": val[8]}
    assert result.best_checkpoint.name == "step-000008" and result.best_metric == 1.0 and result.select_by == "json"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000008", "step-000012"]   # 4 pruned, 8 kept
    assert resolve_checkpoint(run).name == "step-000008"       # fledge eval, sample and export take it
    state = json.loads((run / "checkpoints" / "step-000012" / "state.json").read_text())
    assert state["select_by"] == "json" and state["best_metric"] == {"value": 1.0, "step": 8, "val_loss": val[8]}
    assert state["best_step"] == 12                            # the lowest val loss is still known
    assert "generate step 8 | 4 rows in" in out and "json validity 100.0% (4/4) | best so far (json)" in out
    assert "best checkpoint by json (train.select_by): step-000008, json 100.0%" in out


def test_early_stopping_counts_evaluations_of_the_selected_metric(root, base_run, monkeypatch, capsys):
    """Val loss falls at every evaluation (every 2 steps) and never resets the count; json rises by 0.25
    at step 8, a new best but less than min_delta 0.3, and not at all at step 12: two in a row."""
    plant_answers(monkeypatch, [0.25, 0.5, 0.5, 1.0, 1.0])
    result = train(ft_recipe(root, base_run, "stop-json", eval={"every": 4, "rows": 4, "validate": ["json"]},
                             select_by="json", max_steps=24, eval_every=2, early_stop_patience=2,
                             early_stop_min_delta=0.3), progress=False)
    out = capsys.readouterr().out
    assert result.stopped_early and result.step == 12
    assert result.best_checkpoint.name == "step-000008"
    assert ("stopping early at step 12: json has not risen more than 0.3 above the best (json 50.0% at step 8) in "
            "2 generation evaluations in a row (train.early_stop_patience). The best checkpoint is step-000008.") in out
    val = val_losses(result.run_dir)
    assert list(val) == [2, 4, 6, 8, 10, 12] and val[12] < val[10] < val[8]


def test_a_killed_run_with_generation_evaluations_resumes_onto_the_uninterrupted_one(root, base_run, monkeypatch):
    keys = dict(eval={"every": 4, "rows": 4, "validate": ["json"]}, select_by="exact_match", log_every=1)
    whole = train(ft_recipe(root, base_run, "whole", **keys), progress=False)
    recipe = ft_recipe(root, base_run, "cut", **keys)
    real, count = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count.append(1)
        if len(count) == 6:
            raise Killed
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(Killed):
        train(recipe, progress=False)
    monkeypatch.undo()
    matmul_peak.cache_clear()
    resumed = train(recipe, resume=True, progress=False)
    assert losses(resumed.run_dir) == losses(whole.run_dir)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "elapsed_s", "eval_seconds")}
                          for r in rows]
    assert strip(generation_rows(resumed.run_dir)) == strip(generation_rows(whole.run_dir))
    assert (resumed.run_dir / "checkpoints/best.json").read_text() == \
        (whole.run_dir / "checkpoints/best.json").read_text()
    for step_dir in ("step-000008", "step-000012"):
        a, b = (json.loads((r.run_dir / "checkpoints" / step_dir / "state.json").read_text()) for r in (resumed, whole))
        for state in (a, b):
            state.pop("elapsed_s")
        assert a == b


def test_a_pretraining_run_answers_eval_data_as_plain_prompts(tmp_path):
    """No template: BOS + prompt, as `fledge eval` prompts a pretraining run; text rows are left out."""
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"input": "3 little", "output": " pigs"},
                                                            {"text": "no prompt here"},
                                                            {"input": "the 4", "output": " wolves"}]))
    recipe = make_recipe(tmp_path, "corpus", max_steps=8)
    recipe = load_recipe(None, base={**recipe.to_dict(), "eval": {"data": str(data), "every": 4},
                                     "train": {**recipe.to_dict()["train"], "select_by": "normalized_match"}})
    result = train(recipe, progress=False)
    rows = generation_rows(result.run_dir)
    assert [r["step"] for r in rows] == [4, 8] and all(r["eval_rows"] == 2 for r in rows)
    assert result.select_by == "normalized_match" and result.best_checkpoint.name == "step-000004"


class RankOne(Distributed):
    """Rank 1 of 2: the main process's results arrive by broadcast (planted); nothing runs here."""

    def __init__(self, planted: list[dict]):
        super().__init__(1, 2, 1, 2, torch.device("cpu"))
        self.planted = planted

    def run_on_main(self, fn, *args):
        return self.planted.pop(0) if fn is loop._generate_on_main else None


def test_other_processes_take_the_main_process_scores_and_stop_with_it(tmp_path, monkeypatch):
    """What rank 0 measures (below: json 0.5, 0.5, 0.25) reaches rank 1, which never generates, and both
    stop at the same step with the same state."""
    recipe = load_recipe(None, base={"run_dir": str(tmp_path / "run"), "data": {"rows": ["r.jsonl"]},
                                     "model": {"base": "b"}, "eval": {"every": 4, "validate": ["json"]},
                                     "train": {"select_by": "json", "max_steps": 20, "warmup_steps": 0,
                                               "early_stop_patience": 2, "eval_every": 0}})
    scores = [{"rows": 4, "seconds": 0.1, "targets": {}, "notes": [],
               "metrics": {"json": {"title": "json validity", "kind": "rate", "value": v, "k": int(4 * v), "n": 4,
                                    "unjudged": 0}}} for v in (0.5, 0.5, 0.25)]
    states = {}
    for name, dist, evals in (("rank 0", Distributed(0, 1, 0, 1, torch.device("cpu")), iter(scores)),
                              ("rank 1", RankOne(list(scores)), None)):
        state = TrainingState(select_by="json")
        s = SimpleNamespace(state=state, validates=False, finetune=None, raw_model=None, source=None,
                            evals=SimpleNamespace(run=lambda precision, it=evals: next(it)) if evals else None)
        (tmp_path / name).mkdir()
        report = Reporter(tmp_path / name, 20, 0, dist.is_main, False, False)
        saved: list[int] = []
        monkeypatch.setattr(loop, "_save", lambda s, recipe, step, dist, saved=saved: saved.append(step))
        stops = [loop._evaluate_and_checkpoint(s, recipe, step, pick_precision("fp32", dist.device), dist, report,
                                               0.0)[1] for step in (4, 8, 12)]
        states[name] = (stops, {k: v for k, v in state.to_json().items() if k != "elapsed_s"}, saved)
    assert states["rank 0"] == states["rank 1"]
    stops, state, saved = states["rank 1"]
    assert stops == [False, False, True] and state["best_metric"]["step"] == 4 and saved == [4, 12]


# --- `fledge eval RUN` takes its defaults from the run's recipe ------------------------------------

def test_fledge_eval_takes_data_validators_and_targets_from_the_recipe(plain_and_evaluated, capsys):
    _, evaluated = plain_and_evaluated
    run = evaluated.run_dir
    code = main(["eval", str(run)])
    captured = capsys.readouterr()
    assert code in (0, 3)
    where = resolve_checkpoint(run) / "recipe.yaml"
    assert (f"from {where}: the run's validation rows (data.val_fraction 0.2 of data.rows, split by "
            f"data.split_seed 1234) (eval.data is empty); --validate json (eval.validate); targets json=0.5, "
            f"ppl=100 (eval.targets). Flags override these.") in captured.err
    summary = json.loads((run / "eval" / "val" / "summary.json").read_text())
    assert summary["n_rows"] == 16                              # the 20% held out of 80 rows, as training held them
    assert set(summary["targets"]) == {"json", "ppl"} and "json" in summary["metrics"]
    assert summary["settings"]["from_recipe"][0].startswith(f"from {where}")
    # Flags win; a recipe target this evaluation does not compute is left out, and said.
    data = rows_file(run.parent.parent)
    assert main(["eval", str(run), "--data", str(data), "--validate", "python", "--label", "flags"]) in (0, 3)
    err = capsys.readouterr().err
    assert "targets ppl=100 (eval.targets); not json of eval.targets: this evaluation does not compute it" in err
    assert "eval.validate" not in err and "eval.data" not in err
    summary = json.loads((run / "eval" / "flags" / "summary.json").read_text())
    assert summary["n_rows"] == 80 and "python" in summary["metrics"] and set(summary["targets"]) == {"ppl"}


def test_fledge_eval_of_a_corpus_run_without_data_is_one_line(base_run, capsys):
    assert main(["eval", str(base_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no --data, and the run's recipe has no eval.data and no validation rows" in err
    assert "it trained on a text corpus" in err and "Give --data FILE" in err


if __name__ == "__main__":       # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
