"""What a run tells the user and writes down: progress lines, metrics.jsonl, TensorBoard.

Only the main process reports. `metrics.jsonl` gets one JSON object per logged step
(`loss`, `lr`, `tokens_per_s`, `mfu`), per evaluation (`val_loss`, `val_ppl`), per generation
evaluation (`eval_metrics` {metric: share or null}, `eval_counts` {metric: {k, n, unjudged}},
`eval_rows`, `eval_seconds`, `eval_targets` {metric: met}) and per sampling (`samples`). On resume, rows after the resumed step are dropped first, so the
file always describes one continuous run; a line a kill or a full disk left half-written
is dropped too, with a note.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from fledge.errors import RecipeError
from fledge.files import atomic_open, storage_error


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Reporter:
    def __init__(self, run_dir: Path, max_steps: int, start_step: int, enabled: bool, show_progress: bool,
                 tensorboard: bool):
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.max_steps = max_steps
        self.progress = None
        self.writer = None
        self.noted: set[str] = set()        # notes of generation evaluations already said
        if not enabled:
            return
        dropped = truncate_metrics(self.metrics_path, start_step)
        if dropped:
            self.say(f"note: {self.metrics_path}: dropped {dropped} unreadable line(s), left half-written by "
                     f"an interrupted run")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RecipeError("train.tensorboard is true but the tensorboard package is missing. "
                                  "Install it with: pip install 'fledge[tensorboard]'") from None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if show_progress and self.console.is_terminal:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                                     transient=True)
            self.task = self.progress.add_task("train", total=max_steps, completed=start_step, info="")
            self.progress.start()

    def say(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)
            self.console.file.flush()

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None, elapsed: float,
             eta: float) -> None:
        if not self.enabled:
            return
        mfu_text = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
        line = (f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s / 1000:.1f}k tok/s"
                f"{mfu_text} | {format_duration(elapsed)} elapsed | ETA {format_duration(eta)}")
        self.console.print(line)
        self.console.file.flush()
        if self.progress:
            self.progress.update(self.task, completed=step, info=f"loss {loss:.3f}")
        self.write({"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu,
                    "elapsed_s": round(elapsed, 3)})
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)

    def evaluation(self, step: int, val_loss: float, best: bool, elapsed: float) -> None:
        if not self.enabled:
            return
        import math
        ppl = math.exp(min(val_loss, 50))
        self.console.print(f"[bold]eval[/] step {step} | val loss {val_loss:.4f} | ppl {ppl:.2f}"
                           + (" | best so far" if best else ""))
        self.write({"step": step, "val_loss": val_loss, "val_ppl": ppl, "elapsed_s": round(elapsed, 3)})
        if self.writer:
            self.writer.add_scalar("val/loss", val_loss, step)

    def generation(self, step: int, scores: dict, select_by: str, best: bool, elapsed: float) -> None:
        """One generation evaluation (fledge.train.evalstage): its line, new notes once, a metrics row."""
        if not self.enabled:
            return
        from fledge.train.evalstage import format_scores, scores_row
        self.console.print(format_scores(step, scores, select_by, best))
        for note in scores["notes"]:
            if note not in self.noted:
                self.noted.add(note)
                self.console.print(f"note: {note}")
        self.console.file.flush()
        self.write({"step": step, **scores_row(scores), "elapsed_s": round(elapsed, 3)})
        if self.writer:
            for name, m in scores["metrics"].items():
                if m["value"] is not None:
                    self.writer.add_scalar(f"eval/{name}", m["value"], step)

    def samples(self, step: int, prompts: list[str], texts: list[str]) -> None:
        if not self.enabled:
            return
        for prompt, text in zip(prompts, texts):
            self.console.print(f"[dim]sample[/] {prompt!r} -> {text!r}", soft_wrap=True)
        self.write({"step": step, "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]})

    def write(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **row}
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise storage_error(e, self.metrics_path) from None

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
        if self.writer:
            self.writer.close()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the rows up to `last_step` (none when it is 0: the run starts over); work lost in a
    crash is redone and logged again. Returns how many unreadable lines were dropped."""
    if not path.is_file():
        return 0
    rows, bad = _parse_metrics(path)
    keep = [line for line, row in rows if last_step and row.get("step", 0) <= last_step]
    with atomic_open(path) as f:
        f.write("".join(line + "\n" for line in keep))
    return len(bad)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; unreadable lines are skipped with one note on stderr."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows, bad = _parse_metrics(path)
    if bad:
        print(f"note: {path}:{bad[0]}: skipped {len(bad)} unreadable line(s) (a run stopped while writing)",
              file=sys.stderr)
    return [row for _, row in rows]


def _parse_metrics(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """([(line, row)], [line numbers of lines that are not a JSON object with an integer step])."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise storage_error(e, path, "read") from None
    rows, bad = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step", 0), int):
            rows.append((line, row))
        else:
            bad.append(number)
    return rows, bad
