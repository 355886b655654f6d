"""One HTML page about a run, to look at and to share: `fledge report RUN`.

    fledge report runs/NAME [-o FILE] [--eval DIR]...
    from fledge.report import write_report
    path = write_report("runs/NAME")     # runs/NAME/report.html; report-loss.png, report-lr.png and
                                         # report-throughput.png beside it

The page reads what the run folder holds, and says so where a part is missing:
    recipe.yaml                        the resolved recipe (collapsible)
    metrics.jsonl                      step rows (loss, lr, tokens_per_s, mfu, elapsed_s), evaluation
                                       rows (val_loss, val_ppl), sample rows (samples: [{prompt, text}]),
                                       and a row with "summary" (text or an object) if the run wrote one
    checkpoints/                       state.json of the latest checkpoint (the step-0 validation loss,
                                       best, elapsed time) and best.json
    env.json                           a `fledge.env.collect_env()` snapshot, if the run recorded one;
                                       otherwise the page shows this machine now, labelled as such
    <prepared folder>/manifest.json    pretraining: token counts, documents, sources
    eval/*/summary.json                results of `fledge eval ... -o runs/NAME/eval/LABEL`
                                       (EvalResult.to_dict(), with rows.jsonl beside it), and each --eval DIR

Everything is in the one file: plots are inline SVG drawn by fledge.plot, styles are inline,
and there is no script, font, image or link. A Content-Security-Policy forbids loading
anything, so the page opens with no network, and all user text (recipe values, prompts,
generations) is escaped, so a sample holding `<script>` shows as text.
"""

from __future__ import annotations

import html
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from fledge.errors import FledgeError
from fledge.files import write_atomic
from fledge.plot import Plot, Series, plot_svg, write_png

ENV_FILE = "env.json"           # a run's collect_env() snapshot, read when present
EVAL_DIR = "eval"               # runs/NAME/eval/LABEL/summary.json
EVAL_ROWS_SHOWN = 10            # per evaluation; the rest stay in its rows.jsonl
SAMPLINGS_SHOWN = 100           # most recent sampling events from metrics.jsonl


class ReportError(FledgeError):
    """The run folder cannot make a report: it is missing, or holds no metrics yet."""


@dataclass
class Evaluation:
    """One `fledge eval` result: its summary.json and the first rows of its rows.jsonl."""
    folder: Path
    summary: dict | None = None
    rows: list[dict] = field(default_factory=list)
    n_rows: int = 0                 # lines of rows.jsonl
    problem: str = ""               # why it could not be read


@dataclass
class Run:
    """What a run folder holds, read once."""
    folder: Path
    recipe_text: str | None
    recipe: dict
    steps: list[dict]               # rows with loss
    validations: list[dict]         # rows with val_loss
    samplings: list[dict]           # rows with samples
    summaries: list[Any]            # "summary" values of rows that carry one
    state: dict | None              # state.json of the latest checkpoint
    best: dict | None               # best.json
    manifest: dict | None
    manifest_path: Path | None
    env: dict | None                # env.json
    evaluations: list[Evaluation]


# --- reading --------------------------------------------------------------------------------------

def read_run(run_dir: str | Path, evals: Iterable[str | Path] = ()) -> Run:
    """Everything the report shows; ReportError when `run_dir` is no run or has no metrics yet."""
    from fledge.train import checkpoint as ckpt
    from fledge.train.report import read_metrics
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such run folder. Give the folder `fledge train` made (runs/<name>, or the "
                          f"recipe's run_dir).")
    rows = read_metrics(folder)
    if not rows and (folder / "state.json").is_file() and folder.parent.name == "checkpoints":
        raise ReportError(f"{folder} is a checkpoint; a report is of a whole run: fledge report {folder.parent.parent}")
    if not rows and not (folder / "recipe.yaml").is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise ReportError(f"{folder} is not a run folder: it has no metrics.jsonl or recipe.yaml (it holds {found}). "
                          f"Give the folder `fledge train` made (runs/<name>, or the recipe's run_dir).")
    if not rows:
        raise ReportError(f"{folder}: no metrics yet ({folder / 'metrics.jsonl'} is missing or empty). A run writes "
                          f"them as it trains, one row every train.log_every steps: start it with `fledge train "
                          f"RECIPE`, then run `fledge report {folder}` again.")
    recipe_text = _read_text(folder / "recipe.yaml")
    recipe = _parse_yaml(recipe_text)
    latest = ckpt.latest_checkpoint(folder, verify=False)
    manifest_path = _prepared_manifest(folder, recipe)
    return Run(folder, recipe_text, recipe,
               steps=_rows_with(rows, "loss"), validations=_rows_with(rows, "val_loss"),
               samplings=[r for r in rows if isinstance(r.get("samples"), list) and "step" in r],
               summaries=[r["summary"] for r in rows if "summary" in r],
               state=_read_json(latest / "state.json") if latest else None,
               best=_read_json(folder / "checkpoints" / "best.json"),
               manifest=_read_json(manifest_path) if manifest_path else None, manifest_path=manifest_path,
               env=_read_json(folder / ENV_FILE), evaluations=find_evaluations(folder, evals))


def _rows_with(rows: list[dict], key: str) -> list[dict]:
    """The rows holding a number under `key` and a step, by step."""
    kept = [r for r in rows if isinstance(r.get("step"), int) and isinstance(r.get(key), (int, float))
            and not isinstance(r[key], bool)]
    return sorted(kept, key=lambda r: r["step"])


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable or not an object."""
    text = _read_text(path)
    try:
        value = None if text is None else json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _parse_yaml(text: str | None) -> dict:
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = None
    return value if isinstance(value, dict) else {}


def _section(recipe: dict, name: str) -> dict:
    value = recipe.get(name)
    return value if isinstance(value, dict) else {}


def _prepared_manifest(folder: Path, recipe: dict) -> Path | None:
    """The manifest of the run's prepared corpus: data.prepared_dir (relative to the working directory, as
    fledge resolves it, or else to the folder above runs/), or the run's own data/ folder."""
    data = _section(recipe, "data")
    if not data.get("sources"):
        return None
    prepared = data.get("prepared_dir") or ""
    candidates = [Path(prepared), folder.parent.parent / prepared] if prepared else [folder / "data"]
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate / "manifest.json"
    return None


def find_evaluations(folder: Path, explicit: Iterable[str | Path] = ()) -> list[Evaluation]:
    """Each --eval DIR (a folder holding summary.json, or the file itself), then runs/NAME/eval/*/."""
    found: list[Path] = []
    for item in explicit:
        path = Path(item)
        path = path.parent if path.name == "summary.json" and path.is_file() else path
        if not (path / "summary.json").is_file():
            held = ", ".join(sorted(p.name for p in path.iterdir())[:8]) if path.is_dir() else "no such folder"
            raise ReportError(f"--eval {item}: no summary.json there ({held}). Give the folder `fledge eval -o DIR` "
                              f"wrote.")
        found.append(path)
    root = folder / EVAL_DIR
    if root.is_dir():
        found += sorted(p.parent for p in root.glob("*/summary.json"))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [read_evaluation(p) for p in unique]


def read_evaluation(folder: Path) -> Evaluation:
    summary = _read_json(folder / "summary.json")
    if summary is None or not isinstance(summary.get("metrics"), dict):
        return Evaluation(folder, problem=f"{folder / 'summary.json'} is not a summary `fledge eval` wrote "
                                          f"(unreadable, or without metrics)")
    rows_file = folder / "rows.jsonl"
    if not rows_file.is_file() and summary.get("rows_file"):
        rows_file = Path(summary["rows_file"])
    rows, n = [], 0
    try:
        with open(rows_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                n += 1
                if len(rows) < EVAL_ROWS_SHOWN:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict):
                        rows.append(row)
    except OSError:
        pass
    return Evaluation(folder, summary, rows, n)


# --- the page -------------------------------------------------------------------------------------

class Html(str):
    """Markup built here: inserted as it is. Every other value put into the page is escaped."""


def esc(value: Any) -> str:
    return value if isinstance(value, Html) else html.escape(str(value), quote=True)


def table(head: list[str], rows: Iterable[Iterable[Any]], cls: str = "") -> Html:
    head_html = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(f'<table class="{esc(cls)}"><thead><tr>{head_html}</tr></thead><tbody>{body}</tbody></table>')


def pairs(items: Iterable[tuple[str, Any]]) -> Html:
    """A two-column key/value table."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items)
    return Html(f'<table class="pairs"><tbody>{body}</tbody></table>')


def section(ident: str, *parts: str) -> Html:
    """A section of the page, titled from SECTIONS."""
    return Html(f'<section id="{ident}"><h2>{esc(SECTIONS[ident])}</h2>{"".join(esc(p) for p in parts)}</section>')


def para(text: str, cls: str = "") -> Html:
    return Html(f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>")


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}g}"


def _percent(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


SHARES = ("rate", "ratio")   # metric kinds that are shares (shown in %); losses and perplexities are plain numbers


def _value(value: Any, kind: str | None) -> str:
    """A metric value as its kind reads: a share in %, a loss or perplexity as a number."""
    return _percent(value) if kind in SHARES or kind is None else _number(value)


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#f6f6f4}
main{max-width:980px;margin:0 auto;padding:20px 24px 60px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:19px;margin:0 0 10px}h3{font-size:16px;margin:18px 0 6px}
section{background:#fff;border:1px solid #e2e2de;border-radius:8px;padding:16px 20px;margin:16px 0}
.lead{color:#555;margin:0}.note{color:#666;font-style:italic}.empty{color:#8a5a00}
table{border-collapse:collapse;margin:8px 0;font-size:14px;width:100%}
th,td{border-bottom:1px solid #ececec;padding:5px 8px;text-align:left;vertical-align:top}
thead th{background:#f3f3f0;font-weight:600}table.pairs{width:auto}table.pairs th{font-weight:500;color:#444}
.text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;word-break:break-word}
pre{background:#f6f6f4;padding:10px;overflow:auto;font-size:13px;white-space:pre-wrap;word-break:break-word}
svg.plot{display:block;max-width:100%;height:auto;margin:6px 0 12px}
.met{color:#17712f;font-weight:600}.missed{color:#b3261e;font-weight:600}.unjudged{color:#8a5a00}
nav.contents{margin:10px 0 0;font-size:14px}nav a{color:#1f5fa8}.good{color:#17712f}.bad{color:#b3261e}
summary{cursor:pointer;color:#1f5fa8}
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render(run: Run, environment: dict | None = None) -> tuple[str, list[Plot]]:
    """(the page, its plots); `environment` is shown when the run recorded none (this machine now)."""
    plots = run_plots(run)
    name = run.recipe.get("name") or run.folder.name
    made = time.strftime("%Y-%m-%d %H:%M")
    body = "".join([
        f"<h1>{esc(name)}</h1>",
        f'<p class="lead">{esc(str(run.folder))} · report made {esc(made)}</p>',
        _contents(),
        summary_section(run),
        section("curves", Html(plot_svg(plots[0])), Html(plot_svg(plots[1])),
                para(_loss_caption(run), "note")),
        evaluation_section(run),
        samples_section(run),
        throughput_section(run, plots[2]),
        hardware_section(run, environment),
        data_section(run),
        recipe_section(run),
    ])
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{esc(name)}: fledge report</title>'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")
    return page, plots


SECTIONS = {"summary": "Run summary", "curves": "Loss and learning rate", "evaluation": "Evaluation",
            "samples": "Samples during training", "throughput": "Throughput", "hardware": "Hardware",
            "data": "Data", "recipe": "Recipe"}


def _contents() -> Html:
    """Links to the sections, in page order (in-page anchors: nothing is fetched)."""
    return Html('<nav class="contents">' + " · ".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in SECTIONS.items())
                + "</nav>")


def run_plots(run: Run) -> list[Plot]:
    """Loss (train and validation), learning rate, and throughput, in the page's order."""
    validation = [(r["step"], r["val_loss"]) for r in run.validations]
    first_val = (run.state or {}).get("first_val_loss")
    if isinstance(first_val, (int, float)) and not any(step == 0 for step, _ in validation):
        validation.insert(0, (0, first_val))        # the step-0 evaluation is in state.json, not metrics
    loss = Plot("loss", "Loss", "step", "loss (nats per token)",
                [Series("train", [(r["step"], r["loss"]) for r in run.steps])]
                + ([Series("validation", validation, markers=True)] if validation else []))
    lr = Plot("lr", "Learning rate", "step", "learning rate",
              [Series("lr", [(r["step"], r["lr"]) for r in run.steps if "lr" in r], color="#2b9a3c")], zero=True)
    speed = Plot("throughput", "Throughput", "step", "tokens per second",
                 [Series("tokens/s", [(r["step"], r["tokens_per_s"]) for r in run.steps if "tokens_per_s" in r],
                         color="#8a55c0")], zero=True)
    return [loss, lr, speed]


def _loss_caption(run: Run) -> str:
    if not run.steps:
        return "No training step has been logged yet."
    text = f"Train loss every {_log_every(run)} steps"
    if run.validations:
        text += f"; validation loss at {len(run.validations)} evaluation(s)"
    first_val = (run.state or {}).get("first_val_loss")
    if isinstance(first_val, (int, float)):
        text += " (the point at step 0 is the evaluation before training, from state.json)"
    return text + "."


def _log_every(run: Run) -> str:
    value = _section(run.recipe, "train").get("log_every")
    return str(value) if value else "logged"


def summary_section(run: Run) -> str:
    from fledge.train.summary import learning_verdict
    st, t = run.state or {}, _section(run.recipe, "train")
    last_step = max([r["step"] for r in run.steps + run.validations] + [st.get("step") or 0])
    items = [("steps", f"{last_step:,}" + (f" of {t['max_steps']:,}" if isinstance(t.get("max_steps"), int) else ""))]
    if run.steps:
        items.append(("train loss", f"{_number(run.steps[0]['loss'])} at step {run.steps[0]['step']} -> "
                                    f"{_number(run.steps[-1]['loss'])} at step {run.steps[-1]['step']}"))
    if run.validations:
        best = min(run.validations, key=lambda r: r["val_loss"])
        last = run.validations[-1]
        items.append(("validation loss", f"{_number(last['val_loss'])} at step {last['step']} (perplexity "
                                         f"{_number(last.get('val_ppl'))}); best {_number(best['val_loss'])} at "
                                         f"step {best['step']}"))
    if run.best:
        best_val = _number(run.best.get("val_loss"))
        metric = run.best.get("select_by") or "val_loss"
        chosen = "" if metric == "val_loss" else f"chosen by {metric} {_number(run.best.get('value'))}; "
        items.append(("best checkpoint", f"{run.best.get('checkpoint')} ({chosen}val loss {best_val})"))
    elapsed = [r["elapsed_s"] for r in run.steps + run.validations if isinstance(r.get("elapsed_s"), (int, float))]
    if elapsed:
        items.append(("training time", _duration(max(elapsed))))
    parts: list[str] = [pairs(items)]
    verdict = learning_verdict(st.get("first_val_loss"), st.get("val_loss"), st.get("best_val_loss"), run.folder)
    if verdict:
        from rich.text import Text
        text = Text.from_markup(verdict)
        bad = any("red" in str(span.style) for span in text.spans)     # what the terminal shows in red
        parts.append(para(text.plain, "bad" if bad else "good"))
    for summary in run.summaries:
        parts.append(pairs(summary.items()) if isinstance(summary, dict) else para(str(summary)))
    return section("summary", *parts)


def _duration(seconds: float) -> str:
    from fledge.train.report import format_duration
    return f"{format_duration(seconds)} ({seconds:,.1f} s)"


def throughput_section(run: Run, plot: Plot) -> str:
    speeds = [r["tokens_per_s"] for r in run.steps if isinstance(r.get("tokens_per_s"), (int, float))]
    mfus = [r["mfu"] for r in run.steps if isinstance(r.get("mfu"), (int, float))]
    items = []
    if speeds:
        items += [("tokens per second, median", f"{statistics.median(speeds):,.0f}"),
                  ("tokens per second, last", f"{speeds[-1]:,.0f}")]
    if mfus:
        items.append(("model FLOPs utilisation, median", _percent(statistics.median(mfus))))
    parts = [Html(plot_svg(plot))]
    parts.append(pairs(items) if items else para("No throughput logged yet.", "empty"))
    return section("throughput", *parts)


HARDWARE_KEYS = ("device (auto)", "gpu", "cuda", "precision (auto)", "processor", "cpu cores available",
                 "torch threads", "torch")     # shown first; the rest of the snapshot is one click away


def hardware_section(run: Run, environment: dict | None) -> str:
    if run.env:
        lead, env = para(f"The machine that ran it ({ENV_FILE} in the run folder):"), run.env
    elif environment is not None:
        lead, env = para(f"This machine now: the run recorded no environment ({ENV_FILE}), so these are the values "
                         f"of the machine that made this report (fledge env), which may not be the one that "
                         f"trained.", "note"), environment
    else:
        return section("hardware", para("The run recorded no environment.", "empty"))
    first = [(k, env[k]) for k in HARDWARE_KEYS if k in env]
    rest = [(k, v) for k, v in env.items() if k not in HARDWARE_KEYS]
    more = Html(f"<details><summary>everything else ({len(rest)} entries)</summary>{pairs(rest)}</details>"
                if rest else "")
    return section("hardware", lead, pairs(first), more)


def data_section(run: Run) -> str:
    data = _section(run.recipe, "data")
    parts: list[str] = []
    m = run.manifest
    if m:
        splits = m.get("splits", {})
        tok = m.get("tokenizer", {})
        stats = m.get("stats", {})
        parts.append(para(f"Prepared corpus: {run.manifest_path}"))
        parts.append(table(["split", "tokens", "documents"], [[name, _number(s.get("tokens")),
                                                               _number(s.get("documents"))]
                                                              for name, s in splits.items()]))
        parts.append(pairs([("tokenizer", f"{tok.get('kind')} · vocabulary {_number(tok.get('vocab_size'))}"),
                            ("split", ", ".join(f"{k} {v}" for k, v in (m.get("split") or {}).items())),
                            ("tokens per byte", str(stats.get("tokens_per_byte", "n/a"))),
                            ("bad rows dropped", _number(stats.get("rows", {}).get("bad", 0)))]))
        parts.append(table(["source", "bytes"], [[s.get("path"), _number(s.get("bytes"))]
                                                  for s in m.get("sources", [])]))
    elif data.get("sources"):
        parts.append(para(f"Corpus sources {', '.join(map(str, data['sources']))}: the prepared folder's "
                          f"manifest.json was not found, so token counts are unknown. `fledge prepare RECIPE` "
                          f"writes it.", "empty"))
    rows = [(r, "train") for r in data.get("rows") or []] + [(r, "validation") for r in data.get("val_rows") or []]
    if rows:
        parts.append(table(["rows file", "used for", "format", "weight"],
                           [[_field(r, "path"), use, _field(r, "format"), _field(r, "weight")] for r, use in rows]))
        parts.append(para("Rows and tokens per source are not recorded by the run (fledge train prints them as "
                          "it starts).", "note"))
    finetune, model = _section(run.recipe, "finetune"), _section(run.recipe, "model")
    if model.get("base"):
        parts.insert(0, pairs([("base model", model["base"]), ("method", finetune.get("method", "")),
                               ("template", _section(run.recipe, "template").get("name", ""))]))
    if not parts:
        parts.append(para("The recipe names no data.", "empty"))
    return section("data", *parts)


def _field(row: Any, key: str) -> str:
    if isinstance(row, dict):
        return str(row.get(key, ""))
    return str(row) if key == "path" else ""


def recipe_section(run: Run) -> str:
    if run.recipe_text is None:
        return section("recipe", para(f"No recipe.yaml in {run.folder}.", "empty"))
    model, t = _section(run.recipe, "model"), _section(run.recipe, "train")
    keys = [("model", " · ".join(f"{k} {model[k]}" for k in ("arch", "n_layers", "n_heads", "dim") if k in model)),
            ("train", " · ".join(f"{k} {t[k]}" for k in ("max_steps", "batch_size", "block_size", "lr",
                                                            "grad_accum_steps", "precision") if k in t))]
    return section("recipe", pairs(keys),
                   Html(f"<details><summary>recipe.yaml (resolved, as the run saved it)</summary>"
                        f"<pre>{esc(run.recipe_text)}</pre></details>"))


def samples_section(run: Run) -> str:
    if not run.samplings:
        return section("samples",
                       para("No samples were logged (sample.prompts is empty, or no evaluation has run yet).",
                            "empty"))
    recent = run.samplings[-SAMPLINGS_SHOWN:]
    last = recent[-1]
    parts: list[str] = [para(f"At step {last['step']}:"), _sample_table(last)]
    if len(recent) > 1:
        earlier = "".join(f"<h3>step {esc(r['step'])}</h3>{_sample_table(r)}" for r in reversed(recent[:-1]))
        dropped = len(run.samplings) - len(recent)
        more = f" ({dropped} older ones are in metrics.jsonl)" if dropped else ""
        parts.append(Html(f"<details><summary>earlier samples, {len(recent) - 1} evaluation(s){esc(more)}</summary>"
                          f"{earlier}</details>"))
    return section("samples", *parts)


def _sample_table(row: dict) -> Html:
    items = [s for s in row["samples"] if isinstance(s, dict)]
    return table(["prompt", "generation"], [[Html(f'<span class="text">{esc(s.get("prompt", ""))}</span>'),
                                             Html(f'<span class="text">{esc(s.get("text", ""))}</span>')]
                                            for s in items])


# --- evaluations ----------------------------------------------------------------------------------

def evaluation_section(run: Run) -> str:
    if not run.evaluations:
        return section("evaluation", para(
            f"no evaluation yet: run fledge eval {run.folder} --data VAL.jsonl (add --baseline BASE_RUN and "
            f"--target NAME=VALUE to compare and judge; it writes {run.folder / EVAL_DIR}/LABEL/), then fledge "
            f"report {run.folder} again. Outputs made elsewhere: fledge eval --data VAL.jsonl --outputs "
            f"OUTPUTS.jsonl -o {run.folder / EVAL_DIR / 'LABEL'}.", "empty"))
    return section("evaluation", *(_evaluation_html(e) for e in run.evaluations))


def _evaluation_html(ev: Evaluation) -> Html:
    head = Html(f'<h3>{esc(ev.folder.name)}</h3>')
    if ev.summary is None:
        return Html(head + para(ev.problem, "bad"))
    s = ev.summary
    names = s.get("names") or ["tuned", "baseline"]
    level = f"{100 * (s.get('level') or 0.95):.0f}%"
    who = f"{names[0]} = {s.get('outputs')}" + (f", {names[1]} = {s.get('baseline')}" if s.get("baseline") else "")
    parts = [head, para(f"{_number(s.get('n_rows'))} rows of {s.get('data')}: {who}")]
    base = s.get("baseline_metrics") or {}
    head_row = ["metric", f"{names[0]} [{level} interval]"] + ([f"{names[1]} [{level} interval]"] if base else [])
    parts.append(table(head_row, [[m.get("title") or name, _metric_cell(m)]
                                  + ([_metric_cell(base.get(name))] if base else [])
                                  for name, m in s["metrics"].items()], "metrics"))
    targets = s.get("targets") or {}
    if targets:
        met = sum(t.get("met") is True for t in targets.values())
        parts.append(Html(f"<h3>Targets: {met} of {len(targets)} met</h3>"))
        kinds = {name: m.get("kind") for name, m in s["metrics"].items()}
        parts.append(table(["metric", "target", "value", "verdict"],
                           [_target_row(n, t, t.get("kind") or kinds.get(n)) for n, t in targets.items()], "targets"))
    comparisons = s.get("comparisons") or []
    if comparisons:
        parts.append(Html(f"<h3>{esc(names[0])} against {esc(names[1])}</h3>"))
        parts.append(table(["metric", f"difference (shares in points) [{level}]", "p"],
                           [[c.get("metric"), _difference(c), _p(c.get("p_value"))] for c in comparisons],
                           "comparisons"))
        parts.append(Html('<ul class="sentences">' + "".join(f"<li>{esc(c.get('sentence', ''))}</li>"
                                                             for c in comparisons) + "</ul>"))
    for note in s.get("notes") or []:
        parts.append(para(note, "note"))
    if ev.rows:
        parts.append(_eval_rows(ev, names))
    return Html("".join(esc(p) for p in parts))


def _metric_cell(m: dict | None) -> str:
    if not m:
        return "n/a"
    if m.get("value") is None:
        return f"n/a ({m.get('unjudged', 0)} unjudged)"
    counts = f"{m['k']}/{m['n']} " if "k" in m else f"n={m.get('n')} "
    unjudged = f" +{m['unjudged']} unjudged" if m.get("unjudged") else ""
    kind = m.get("kind")
    return f"{counts}{_value(m['value'], kind)} [{_value(m.get('lo'), kind)}, {_value(m.get('hi'), kind)}]{unjudged}"


def _target_row(name: str, t: dict, kind: str | None = None) -> list:
    sign = ">=" if t.get("direction", "higher") == "higher" else "<="
    met = t.get("met")
    verdict = {True: ("met", "met"), False: ("MISSED", "missed")}.get(met, ("not judged (no row judged)",
                                                                             "unjudged"))
    return [name, f"{sign} {_value(t.get('target'), kind)}", _value(t.get("value"), kind),
            Html(f'<span class="{verdict[1]}">{esc(verdict[0])}</span>')]


def _difference(c: dict) -> str:
    if c.get("diff") is None:
        return "n/a"
    if c.get("kind") in SHARES or c.get("kind") is None:
        return f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"
    return f"{c['diff']:+.4g} [{c['lo']:+.4g}, {c['hi']:+.4g}]"


def _p(p: Any) -> str:
    if not isinstance(p, (int, float)):
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _eval_rows(ev: Evaluation, names: list[str]) -> Html:
    baseline = any("baseline" in r for r in ev.rows)
    head = ["row", "prompt", "reference", names[0], "verdicts"] + ([names[1], "verdicts"] if baseline else [])
    rows = []
    for r in ev.rows:
        cells = [r.get("row", ""), _text(r.get("prompt")), _text(r.get("reference")), _text(r.get("generation")),
                 _verdicts(r)]
        if baseline:
            b = r.get("baseline") or {}
            cells += [_text(b.get("generation")), _verdicts(b)]
        rows.append(cells)
    shown = f"the first {len(ev.rows)} of {ev.n_rows} rows" if ev.n_rows > len(ev.rows) else f"all {ev.n_rows} rows"
    return Html(f"<details open><summary>generations: {esc(shown)} (every row: "
                f"{esc(ev.folder / 'rows.jsonl')})</summary>{table(head, rows, 'rows')}</details>")


def _text(value: Any) -> Html:
    if value is None:
        return Html("")
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return Html(f'<span class="text">{esc(text)}</span>')


def _verdicts(row: dict) -> Html:
    marks = []
    for key in ("exact_match", "normalized_match"):
        if key in row:
            marks.append((key.replace("_", " "), row[key], ""))
    for name, v in (row.get("validators") or {}).items():
        if isinstance(v, dict):
            marks.append((name, v.get("ok"), v.get("message") or ""))
    out = []
    for name, ok, message in marks:
        cls, sign = {True: ("met", "✓"), False: ("missed", "✗")}.get(ok, ("unjudged", "?"))
        detail = f": {esc(message)}" if message and ok is not True else ""
        out.append(f'<div><span class="{cls}">{sign}</span> {esc(name)}{detail}</div>')
    return Html("".join(out))


# --- writing --------------------------------------------------------------------------------------

def write_report(run_dir: str | Path, out: str | Path | None = None, evals: Iterable[str | Path] = ()) -> Path:
    """Write the run's report (default runs/NAME/report.html) and a PNG of each plot beside it
    (<stem>-loss.png, <stem>-lr.png, <stem>-throughput.png); returns the HTML's path."""
    run = read_run(run_dir, evals)
    environment = None
    if run.env is None:
        from fledge.env import collect_env
        environment = collect_env(measure=False)
    page, plots = render(run, environment)
    path = Path(out) if out is not None else run.folder / "report.html"
    if path.is_dir():
        raise ReportError(f"-o {path} is a folder; -o names the HTML file to write (e.g. {path / 'report.html'}).")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, page)
    for plot in plots:
        write_png(plot, png_path(path, plot))
    return path


def png_path(html_path: Path, plot: Plot) -> Path:
    return html_path.with_name(f"{html_path.stem}-{plot.name}.png")


# --- the verb -------------------------------------------------------------------------------------
# Registered from cli.py with one call (as `fledge eval` and `fledge data` are), so that adding this verb
# touches one line of cli.py; only parsing and printing live here.

def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="one HTML page about a run: recipe, data, loss curves, throughput, "
                                             "hardware, evaluations, samples (opens offline)",
                              description="Write one self-contained HTML page about a run (default "
                                          "RUN/report.html) and a PNG of each plot beside it.")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("-o", "--out", default=None, metavar="FILE", help="the HTML file (default: RUN/report.html)")
    p.add_argument("--eval", dest="evals", action="append", default=[], metavar="DIR",
                   help=f"a `fledge eval -o DIR` folder to include (repeat); RUN/{EVAL_DIR}/*/ are always read")
    p.set_defaults(func=_run_report)


def _run_report(args: Any) -> int:
    path = write_report(args.run, args.out, args.evals)
    pngs = ", ".join(png_path(path, Plot(n, "", "", "")).name for n in ("loss", "lr", "throughput"))
    print(f"wrote {path} (plots also as {pngs} beside it); open it in a browser: {path.resolve().as_uri()}")
    return 0
