"""`fledge report` opened in a real browser (headless Chromium driven by Playwright): every plot
renders with a size, the page logs no console error, and it requests nothing but itself.

Needs Chromium (Debian: apt-get install chromium) and the playwright package (the `test`
extra); Playwright's own browser download is not used, so this runs offline. Without either the
test is skipped and says which is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
# --no-sandbox: Chromium refuses to start as root with its sandbox; the background-networking
# flags keep it from calling home, which a closed network refuses (and which would be a request).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
EVIL = "<script>window.__ran = 1</script>"


def unavailable(reason: str) -> None:
    """Skip where no browser was installed; fail in CI, whose .ci/run installs one (a skip there hides a
    broken install step)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}: .ci/run installs Chromium and the test extra installs playwright")
    pytest.skip(reason)


def chromium() -> str:
    for path in (os.environ.get("FLEDGE_CHROMIUM", ""), *CHROMIUM_PATHS, shutil.which("chromium") or ""):
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    unavailable("no Chromium found (apt-get install chromium, or set FLEDGE_CHROMIUM to its binary)")


def write_run(tmp_path: Path) -> Path:
    """A run folder as `fledge train` leaves it (metrics, recipe), with an evaluation beside it."""
    from fledge.evaluate.score import score_outputs
    run = tmp_path / "runs" / "browser"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: browser\ntrain:\n  max_steps: 40\n  log_every: 2\n")
    rows = [{"step": s, "loss": 3.5 / (1 + 0.1 * s), "lr": 3e-3 * min(1.0, s / 5), "tokens_per_s": 5e4 + 100 * s,
             "mfu": 0.12, "elapsed_s": 0.05 * s} for s in range(2, 41, 2)]
    rows += [{"step": s, "val_loss": 3.6 / (1 + 0.09 * s), "val_ppl": 2.0} for s in (10, 20, 30, 40)]
    rows += [{"step": 40, "samples": [{"prompt": EVIL, "text": "<img src=https://example.com/x.png>"}]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, outputs = tmp_path / "val.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "output": "{}"}) + "\n" for i in range(6)))
    outputs.write_text("".join(json.dumps({"generation": "{}" if i % 2 else EVIL}) + "\n" for i in range(6)))
    score_outputs(data, outputs, validators=["json"], targets={"json": 0.8}, resamples=100).write(run / "eval" / "v")
    return run


@pytest.mark.slow
def test_report_renders_offline_in_chromium(tmp_path):
    executable = chromium()
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        unavailable("playwright is not installed (pip install 'fledge[test]')")
    run = write_run(tmp_path)
    done = subprocess.run([sys.executable, "-m", "fledge", "report", str(run)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    url = (run / "report.html").resolve().as_uri()

    requests, problems = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(url, wait_until="load")
            plots = page.locator("svg.plot")
            assert plots.count() == 3
            for i in range(3):
                box = plots.nth(i).bounding_box()
                assert box and box["width"] > 100 and box["height"] > 50, (i, box)
                line = plots.nth(i).locator("polyline.series").first.bounding_box()
                assert line and line["width"] > 50 and line["height"] > 5, (i, line)  # the data drew something
            samples = page.locator("#samples").inner_text()
            assert EVIL in samples and "<img src=https://example.com/x.png>" in samples     # shown as text
            assert page.evaluate("document.querySelectorAll('script, img, link[rel=stylesheet]').length") == 0
            assert page.evaluate("window.__ran === undefined")
            assert "MISSED" in page.locator("#evaluation").inner_text()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert requests == [url]
    assert (tmp_path / "report.png").stat().st_size > 20_000
