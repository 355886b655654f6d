"""fledge report: the page holds every section, each plot's lines map back to the metrics they
draw, user text is escaped, the PNGs are real pictures, and evaluation results (metrics,
intervals, targets, sentences, generations with verdicts) are shown as `fledge eval` wrote them."""

from __future__ import annotations

import json
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "train"))
from tiny_runs import changed, make_recipe  # noqa: E402

from fledge.cli import main  # noqa: E402
from fledge.evaluate.score import score_outputs  # noqa: E402
from fledge.plot import Plot, Series, nice_ticks, thin, tick_text  # noqa: E402
from fledge.report import ReportError, write_report  # noqa: E402
from fledge.train import train  # noqa: E402
from fledge.train.report import read_metrics  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
SECTIONS = ("summary", "curves", "evaluation", "samples", "throughput", "hardware", "data", "recipe")
EVIL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real 24-step run whose samples include a prompt holding a script tag."""
    tmp = tmp_path_factory.mktemp("report")
    recipe = make_recipe(tmp, "rep", max_steps=24, log_every=2, eval_every=8, checkpoint_every=8)
    recipe = changed(recipe, sample={"prompts": ["1 ", EVIL], "max_new_tokens": 6})
    train(recipe, progress=False)
    return recipe.run_path


def svg_of(page: str, name: str) -> ET.Element:
    """The plot's <svg> element, parsed as XML (so it is also well-formed)."""
    match = re.search(rf'<svg [^>]*id="plot-{name}".*?</svg>', page, re.S)
    assert match, f"no svg for {name}"
    return ET.fromstring(match.group(0))


def series_values(svg: ET.Element, label: str) -> tuple[list[tuple[float, float]], float, float]:
    """The polyline of series `label` mapped back to data through the axes' tick lines, and the
    spans of the x and y axes."""
    def axis(cls: str, attr: str) -> tuple[float, float, float, float]:
        ticks = [t for t in svg.iter(f"{SVG}line") if t.get("class") == cls]
        a, b = ticks[0], ticks[-1]
        return float(a.get(attr)), float(a.get("data-value")), float(b.get(attr)), float(b.get("data-value"))

    px0, x0, px1, x1 = axis("tick-x", "x1")
    py0, y0, py1, y1 = axis("tick-y", "y1")
    line = next(p for p in svg.iter(f"{SVG}polyline") if p.get("data-label") == label)
    out = []
    for pair in line.get("points").split():
        px, py = map(float, pair.split(","))
        out.append((x0 + (px - px0) * (x1 - x0) / (px1 - px0), y0 + (py - py0) * (y1 - y0) / (py1 - py0)))
    return out, (x1 - x0), (y1 - y0)


def assert_maps_back(svg: ET.Element, label: str, expected: list[tuple[float, float]]) -> None:
    points, x_span, y_span = series_values(svg, label)
    assert len(points) == len(expected)
    for (x, y), (ex, ey) in zip(points, expected):
        # coordinates are written to 0.1 px on a plot about 640 x 210 px wide
        assert abs(x - ex) <= x_span * 0.1 / 600 + 1e-9, (x, ex)
        assert abs(y - ey) <= y_span * 0.1 / 200 + 1e-9, (y, ey)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1440, 560) and len(data) > 8_000, (path, width, height, len(data))
    from PIL import Image
    with Image.open(path) as image:
        assert len(image.convert("RGB").getcolors(1 << 20)) > 20      # lines, text and grid, not a blank


# --- a real run -----------------------------------------------------------------------------------

def test_page_has_every_section_and_plots_that_map_back_to_the_metrics(trained):
    path = write_report(trained)
    assert path == trained / "report.html"
    page = path.read_text(encoding="utf-8")
    for ident in SECTIONS:
        assert f'<section id="{ident}">' in page
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="plot"') == 3
    rows = read_metrics(trained)
    steps = [r for r in rows if "loss" in r]
    state = json.loads((trained / "checkpoints" / "step-000024" / "state.json").read_text())
    val = [(0, state["first_val_loss"])] + [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert_maps_back(svg_of(page, "loss"), "train", [(r["step"], r["loss"]) for r in steps])
    assert_maps_back(svg_of(page, "loss"), "validation", val)
    assert_maps_back(svg_of(page, "lr"), "lr", [(r["step"], r["lr"]) for r in steps])
    assert_maps_back(svg_of(page, "throughput"), "tokens/s", [(r["step"], r["tokens_per_s"]) for r in steps])
    for name in ("loss", "lr", "throughput"):
        assert_png(trained / f"report-{name}.png")


def test_the_page_loads_nothing_and_runs_nothing(trained):
    page = write_report(trained).read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "default-src 'none'" in page             # the CSP: nothing may load, even by mistake
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page      # the sample prompt, as text


def test_summary_and_data_come_from_what_the_run_recorded(trained):
    page = write_report(trained).read_text(encoding="utf-8")
    summary = re.search(r'<section id="summary">.*?</section>', page, re.S).group(0)
    assert "24 of 24" in summary and "step-000" in summary
    data = re.search(r'<section id="data">.*?</section>', page, re.S).group(0)
    manifest = json.loads((trained.parent.parent / "prepared" / "manifest.json").read_text())
    assert f"{manifest['splits']['train']['tokens']:,}" in data and "corpus.txt" in data
    assert "no evaluation yet: run fledge eval" in page
    assert "The machine that ran it (env.json" in page and "This machine now" not in page   # fledge train records it
    (trained / "env.json").unlink()
    page = write_report(trained).read_text(encoding="utf-8")
    assert "This machine now" in page                # no env.json: the machine that made the report, labelled


def test_out_file_puts_the_pngs_beside_it(trained, tmp_path):
    path = write_report(trained, out=tmp_path / "share" / "tiny.html")
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-loss.png", "tiny-lr.png", "tiny-throughput.png",
                                                             "tiny.html"]


# --- hand-written runs ------------------------------------------------------------------------------

def fake_run(tmp_path: Path, rows: list[dict], recipe: str = "name: demo\n", broken_tail: bool = False) -> Path:
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + ('{"step": 9, "lo' if broken_tail else ""))
    return run


ROWS = [{"step": s, "loss": 3.0 - 0.2 * s, "lr": 1e-3 * min(1, s / 2), "tokens_per_s": 1000.0 + s, "mfu": 0.1,
         "elapsed_s": 0.1 * s} for s in range(1, 9)]


def test_user_text_is_escaped_everywhere(tmp_path):
    recipe = 'name: "<b>bold</b>"\ntrain:\n  lr: "<i>x</i>"\n'
    rows = ROWS + [{"step": 8, "samples": [{"prompt": EVIL, "text": '"><img src=x onerror=alert(1)>'}]},
                   {"step": 8, "summary": {"note": "<u>under</u>"}}]
    run = fake_run(tmp_path, rows, recipe)
    page = write_report(run).read_text(encoding="utf-8")
    for raw in ("<b>bold", "<i>x", "<script", "<img", "<u>"):
        assert raw not in page
    for shown in ("&lt;b&gt;bold&lt;/b&gt;", "&lt;i&gt;x&lt;/i&gt;", "&lt;script&gt;", "&lt;img src=x",
                  "&lt;u&gt;under&lt;/u&gt;"):
        assert shown in page


def test_a_half_written_last_line_is_skipped(tmp_path, capsys):
    run = fake_run(tmp_path, ROWS, broken_tail=True)
    page = write_report(run).read_text(encoding="utf-8")
    assert_maps_back(svg_of(page, "loss"), "train", [(r["step"], r["loss"]) for r in ROWS])
    assert "unreadable line" in capsys.readouterr().err


def test_recorded_environment_is_shown_as_the_machine_that_ran_it(tmp_path):
    run = fake_run(tmp_path, ROWS)
    (run / "env.json").write_text(json.dumps({"device (auto)": "cuda:0", "gpu": "Some GPU <X>"}))
    page = write_report(run).read_text(encoding="utf-8")
    assert "The machine that ran it" in page and "Some GPU &lt;X&gt;" in page and "This machine now" not in page


def test_a_run_that_did_not_learn_says_so_in_red(tmp_path):
    run = fake_run(tmp_path, ROWS)
    checkpoint = run / "checkpoints" / "step-000008"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 8, "first_val_loss": 3.0, "val_loss": 3.0,
                                                       "best_val_loss": 3.0, "best_step": 8}))
    page = write_report(run).read_text(encoding="utf-8")
    assert re.search(r'<p class="bad">the model did not learn: val loss 3.0000 at step 0', page)
    assert_maps_back(svg_of(page, "loss"), "validation", [(0, 3.0)])     # step 0 comes from state.json


def test_fine_tune_data_lists_its_rows_files(tmp_path):
    recipe = ("name: ft\nmodel:\n  base: runs/base\ndata:\n  rows:\n  - path: train.jsonl\n    format: auto\n"
              "    weight: 1.0\n  val_rows: []\nfinetune:\n  method: lora\n")
    page = write_report(fake_run(tmp_path, ROWS, recipe)).read_text(encoding="utf-8")
    data = re.search(r'<section id="data">.*?</section>', page, re.S).group(0)
    assert "train.jsonl" in data and "lora" in data and "runs/base" in data and "not recorded" in data


def test_no_metrics_is_one_clear_line(tmp_path, capsys):
    run = tmp_path / "runs" / "new"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: new\n")
    with pytest.raises(ReportError, match="no metrics yet"):
        write_report(run)
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no metrics yet" in err and "fledge train" in err and "\n" not in err
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "is not a run folder" in capsys.readouterr().err


def test_cli_writes_and_says_where(tmp_path, capsys):
    run = fake_run(tmp_path, ROWS)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'report.html'}" in out and "report-loss.png" in out


# --- evaluations ----------------------------------------------------------------------------------

def planted_eval(tmp_path: Path, out: Path) -> dict:
    """`fledge eval` on 12 tiny rows: JSON validity, with a baseline and two targets (one met, one missed)."""
    data, tuned, base = tmp_path / "val.jsonl", tmp_path / "tuned.jsonl", tmp_path / "base.jsonl"
    refs = [json.dumps({f"k{i}": i}) for i in range(12)]
    data.write_text("".join(json.dumps({"input": f"key k{i}", "output": r}) + "\n" for i, r in enumerate(refs)))
    tuned_texts = [r if i % 4 else "{broken" for i, r in enumerate(refs)]
    tuned_texts[1] = EVIL
    tuned.write_text("".join(json.dumps({"generation": t}) + "\n" for t in tuned_texts))
    base.write_text("".join(json.dumps({"generation": r if i % 2 else "nope"}) + "\n" for i, r in enumerate(refs)))
    result = score_outputs(data, tuned, validators=["json"], baseline_file=base,
                           targets={"json": 0.9, "exact_match": 0.5}, resamples=200)
    result.write(out)
    return result.to_dict()


def test_planted_evaluation_shows_metrics_intervals_targets_and_sentences(tmp_path):
    run = fake_run(tmp_path, ROWS)
    summary = planted_eval(tmp_path, run / "eval" / "json-val")
    page = write_report(run).read_text(encoding="utf-8")
    section = re.search(r'<section id="evaluation">.*?</section>', page, re.S).group(0)
    assert "json-val" in section and "no evaluation yet" not in section
    for name, m in summary["metrics"].items():
        cell = f"{m['k']}/{m['n']} {100 * m['value']:.1f}% [{100 * m['lo']:.1f}%, {100 * m['hi']:.1f}%]"
        assert cell in section, (name, cell)
    assert summary["targets"]["json"]["met"] is False and summary["targets"]["exact_match"]["met"] is True
    assert re.search(r"<td>json</td><td>&gt;= 90.0%</td><td>[0-9.]+%</td><td><span class=\"missed\">MISSED", section)
    assert re.search(r"<td>exact_match</td><td>&gt;= 50.0%</td><td>[0-9.]+%</td><td><span class=\"met\">met", section)
    assert "Targets: 1 of 2 met" in section
    for c in summary["comparisons"]:
        assert c["sentence"] and c["sentence"].replace("&", "&amp;") in section
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in section and "<script" not in page
    assert "✗" in section and "✓" in section and "the first 10 of 12 rows" in section


def test_eval_dirs_given_explicitly_are_read_and_a_missing_one_is_an_error(tmp_path):
    run = fake_run(tmp_path, ROWS)
    planted_eval(tmp_path, tmp_path / "elsewhere")
    page = write_report(run, evals=[tmp_path / "elsewhere"]).read_text(encoding="utf-8")
    assert "<h3>elsewhere</h3>" in page
    page = write_report(run, evals=[tmp_path / "elsewhere" / "summary.json"]).read_text(encoding="utf-8")
    assert page.count("<h3>elsewhere</h3>") == 1
    with pytest.raises(ReportError, match="no summary.json"):
        write_report(run, evals=[tmp_path / "nowhere"])


def test_an_unreadable_summary_is_named_on_the_page(tmp_path):
    run = fake_run(tmp_path, ROWS)
    (run / "eval" / "bad").mkdir(parents=True)
    (run / "eval" / "bad" / "summary.json").write_text("{not json")
    page = write_report(run).read_text(encoding="utf-8")
    assert "is not a summary `fledge eval` wrote" in page


# --- plotting pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi", [(0, 200), (0.2818, 3.601), (3e-4, 3e-3), (0, 64_561), (5.0, 5.0), (-1, 1)])
def test_ticks_cover_the_data_with_readable_labels(lo, hi):
    ticks, step = nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 12
    labels = [tick_text(t, step) for t in ticks]
    assert len(set(labels)) == len(labels) and all(len(label) <= 7 for label in labels), labels


def test_thinning_keeps_the_extremes():
    points = [(i, float(i % 97)) for i in range(100_000)] + [(100_000, 1e6)]
    thinned = thin(points, 2000)
    assert len(thinned) <= 2100 and (100_000, 1e6) in thinned and min(p[1] for p in thinned) == 0


def test_a_plot_without_points_says_so(tmp_path):
    from fledge.plot import plot_svg, write_png
    plot = Plot("empty", "Nothing", "step", "loss", [Series("train", [(1, float("nan"))])])
    assert "nothing logged yet" in plot_svg(plot)
    assert write_png(plot, tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_best_checkpoint_says_which_metric_chose_it(tmp_path):
    """train.select_by: the summary names the metric and its value beside the val loss."""
    run = fake_run(tmp_path, ROWS)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.json").write_text(json.dumps(
        {"checkpoint": "step-000008", "select_by": "json", "value": 0.75, "val_loss": 1.25}))
    page = write_report(run).read_text(encoding="utf-8")
    assert "step-000008 (chosen by json 0.75; val loss 1.25)" in page
    (run / "checkpoints" / "best.json").write_text(json.dumps(
        {"checkpoint": "step-000012", "select_by": "val_loss", "value": 1.0, "val_loss": 1.0}))
    assert "step-000012 (val loss 1)" in write_report(run).read_text(encoding="utf-8")
