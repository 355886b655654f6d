"""Line plots drawn by hand: one layout, written as inline SVG (for the HTML report) and as PNG.

    plot = Plot("loss", "Loss", "step", "loss", [Series("train", [(1, 3.6), (2, 3.1)]),
                                                  Series("val", [(0, 3.6), (2, 3.0)], markers=True)])
    svg_text = plot_svg(plot)                   # <svg ...>...</svg>, every label escaped
    write_png(plot, "report-loss.png")          # the same picture, drawn with Pillow at 2x

Both renderings come from one `Frame` (axis ranges, ticks, data -> pixel maps), so the PNG
shows what the page shows. The SVG has no script, font or link: it renders with no network.
Each tick's grid line carries its exact value in `data-value`, so a test (or a reader of the
file) can map any polyline point back to data.

Why Pillow and not matplotlib: matplotlib adds about 173 MB to an install for three line
plots; Pillow is a few MB and draws the lines we have already laid out. Series longer than
MAX_POINTS are thinned to the minimum and maximum of each bucket, so spikes stay visible.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from fledge.errors import DependencyError
from fledge.files import write_atomic

WIDTH, HEIGHT = 720, 280                    # CSS pixels of one plot
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 40   # margins around the plotting area
PNG_SCALE = 2                               # PNG pixels per CSS pixel: sharp on high-density screens
MAX_POINTS = 2000                           # per series; longer ones are thinned (min and max per bucket)
COLORS = ("#1f6fb4", "#d6452a", "#2b9a3c", "#8a55c0", "#b8860b")
GRID, AXIS, INK = "#e3e3e3", "#555555", "#222222"


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]       # (x, y); non-finite points are dropped
    color: str = ""                         # empty: the next of COLORS
    markers: bool = False                   # a dot at every point (sparse series such as evaluations)


@dataclass
class Plot:
    name: str                               # file-name part: report-<name>.png, and the svg's id
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    zero: bool = False                      # the y axis starts at 0 (rates, throughput)


@dataclass
class Frame:
    """Where data lands in the picture: axis ranges and ticks, in data units and in pixels."""
    x_ticks: list[float]
    y_ticks: list[float]
    x_step: float
    y_step: float

    @property
    def x_range(self) -> tuple[float, float]:
        return self.x_ticks[0], self.x_ticks[-1]

    @property
    def y_range(self) -> tuple[float, float]:
        return self.y_ticks[0], self.y_ticks[-1]

    def px(self, x: float) -> float:
        lo, hi = self.x_range
        return LEFT + (x - lo) / (hi - lo) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        lo, hi = self.y_range
        return HEIGHT - BOTTOM - (y - lo) / (hi - lo) * (HEIGHT - TOP - BOTTOM)


def nice_ticks(lo: float, hi: float, count: int = 5) -> tuple[list[float], float]:
    """Ticks at multiples of 1, 2, 2.5 or 5 x 10^k that cover [lo, hi] with about `count` intervals."""
    if not hi > lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [_clean(i * step) for i in range(first, last + 1)], step


def _clean(value: float) -> float:
    """A tick value without float noise (0.30000000000000004 -> 0.3)."""
    return float(f"{value:.12g}")


def tick_text(value: float, step: float) -> str:
    """A tick label with as many digits as the tick spacing needs: 0.25, 3e-04, 60k, 1.5M."""
    if value == 0:
        return "0"
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= 10 * divisor or (abs(value) >= divisor and step >= divisor):
            return f"{value / divisor:.{_decimals(step / divisor)}f}{suffix}"
    if step < 1e-3:
        return f"{value:.{min(_decimals(step / 10 ** math.floor(math.log10(abs(value)))), 3)}e}"
    return f"{value:.{_decimals(step)}f}"


def _decimals(step: float) -> int:
    """The fewest decimals that write `step` (and so every multiple of it) exactly."""
    for d in range(0, 10):
        if abs(round(step, d) - step) <= abs(step) * 1e-6:
            return d
    return 10


def layout(plot: Plot) -> Frame | None:
    """The frame that holds every finite point of every series, or None when there is none."""
    points = [p for s in plot.series for p in finite(s.points)]
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks, x_step = nice_ticks(min(0.0, min(xs)), max(xs), 6)
    y_lo = min(0.0, min(ys)) if plot.zero else min(ys)
    y_ticks, y_step = nice_ticks(y_lo, max(ys), 5)
    return Frame(x_ticks, y_ticks, x_step, y_step)


def finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points if _is_finite(x) and _is_finite(y)]


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def thin(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most about `limit` points: the lowest and highest of each bucket, in x order."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / (limit // 2))
    out = []
    for start in range(0, len(points), size):
        bucket = points[start:start + size]
        low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out += sorted({low, high}, key=lambda p: p[0])
    return out


def _colored(plot: Plot) -> list[tuple[Series, str, list[tuple[float, float]]]]:
    """(series, color, its finite points, thinned) for each series."""
    return [(s, s.color or COLORS[i % len(COLORS)], thin(finite(s.points))) for i, s in enumerate(plot.series)]


# --- SVG ------------------------------------------------------------------------------------------

def plot_svg(plot: Plot) -> str:
    """The plot as one <svg> element; a plot without points says so in its place."""
    e = _escape
    frame = layout(plot)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="plot-{e(plot.name)}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
            f'aria-label="{e(plot.title)}">')
    parts = [head, f'<text class="title" x="{LEFT}" y="18" font-weight="600" font-size="14">{e(plot.title)}</text>']
    if frame is None:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="{AXIS}">nothing logged '
                     f'yet</text></svg>')
        return "".join(parts)
    bottom, top, right = HEIGHT - BOTTOM, TOP, WIDTH - RIGHT
    for x in frame.x_ticks:
        px = frame.px(x)
        parts.append(f'<line class="tick-x" data-value="{x!r}" x1="{px:.1f}" y1="{top}" x2="{px:.1f}" '
                     f'y2="{bottom}" stroke="{GRID}"/><text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle" '
                     f'font-size="11" fill="{AXIS}">{e(tick_text(x, frame.x_step))}</text>')
    for y in frame.y_ticks:
        py = frame.py(y)
        parts.append(f'<line class="tick-y" data-value="{y!r}" x1="{LEFT}" y1="{py:.1f}" x2="{right}" '
                     f'y2="{py:.1f}" stroke="{GRID}"/><text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end" '
                     f'font-size="11" fill="{AXIS}">{e(tick_text(y, frame.y_step))}</text>')
    parts.append(f'<polyline points="{LEFT},{top} {LEFT},{bottom} {right},{bottom}" fill="none" stroke="{AXIS}"/>')
    parts.append(f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 6}" text-anchor="middle" font-size="12" '
                 f'fill="{INK}">{e(plot.x_label)}</text>')
    parts.append(f'<text transform="translate(14 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle" '
                 f'font-size="12" fill="{INK}">{e(plot.y_label)}</text>')
    for s, color, points in _colored(plot):
        coords = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in points)
        parts.append(f'<polyline class="series" data-label="{e(s.label)}" points="{coords}" fill="none" '
                     f'stroke="{color}" stroke-width="1.8" stroke-linejoin="round"/>')
        if s.markers or len(points) == 1:
            parts += [f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3" fill="{color}"/>'
                      for x, y in points]
    parts.append(_svg_legend(plot))
    parts.append("</svg>")
    return "".join(parts)


def _svg_legend(plot: Plot) -> str:
    if len(plot.series) < 2:
        return ""
    out, x = [], WIDTH - RIGHT - 8
    for s, color, _ in reversed(_colored(plot)):
        width = 7 * len(s.label) + 30
        x -= width
        out.append(f'<line x1="{x:.0f}" y1="17" x2="{x + 20:.0f}" y2="17" stroke="{color}" stroke-width="2.5"/>'
                   f'<text x="{x + 25:.0f}" y="21" font-size="12" fill="{INK}">{_escape(s.label)}</text>')
    return f'<g class="legend">{"".join(out)}</g>'


def _escape(text: object) -> str:
    return html.escape(str(text), quote=True)


# --- PNG ------------------------------------------------------------------------------------------

def write_png(plot: Plot, path: str | Path) -> Path:
    """The plot as a PNG at PNG_SCALE times its CSS size, drawn with Pillow from the same frame."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise DependencyError("writing the report's PNG plots needs Pillow, which fledge depends on; reinstall "
                              "fledge or run: pip install pillow") from None
    import io
    k = PNG_SCALE
    image = Image.new("RGB", (WIDTH * k, HEIGHT * k), "white")
    draw = ImageDraw.Draw(image)
    font, small, bold = (ImageFont.load_default(size=n * k) for n in (12, 11, 14))
    draw.text((LEFT * k, 18 * k), plot.title, fill=INK, font=bold, anchor="ls")
    frame = layout(plot)
    if frame is None:
        draw.text((WIDTH * k / 2, HEIGHT * k / 2), "nothing logged yet", fill=AXIS, font=font, anchor="mm")
    else:
        _draw_frame(image, draw, plot, frame, font, small)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return write_atomic(path, buffer.getvalue())


def _draw_frame(image, draw, plot: Plot, frame: Frame, font, small) -> None:
    k = PNG_SCALE
    bottom, top, right = (HEIGHT - BOTTOM) * k, TOP * k, (WIDTH - RIGHT) * k
    for x in frame.x_ticks:
        px = frame.px(x) * k
        draw.line([(px, top), (px, bottom)], fill=GRID, width=k)
        draw.text((px, bottom + 6 * k), tick_text(x, frame.x_step), fill=AXIS, font=small, anchor="mt")
    for y in frame.y_ticks:
        py = frame.py(y) * k
        draw.line([(LEFT * k, py), (right, py)], fill=GRID, width=k)
        draw.text(((LEFT - 6) * k, py), tick_text(y, frame.y_step), fill=AXIS, font=small, anchor="rm")
    draw.line([(LEFT * k, top), (LEFT * k, bottom), (right, bottom)], fill=AXIS, width=k)
    draw.text(((LEFT + WIDTH - RIGHT) / 2 * k, (HEIGHT - 6) * k), plot.x_label, fill=INK, font=font, anchor="ms")
    _draw_vertical_label(image, plot.y_label, (14 * k, (TOP + HEIGHT - BOTTOM) / 2 * k), font)
    for s, color, points in _colored(plot):
        pixels = [(frame.px(x) * k, frame.py(y) * k) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2 * k, joint="curve")
        if s.markers or len(pixels) == 1:
            r = 3 * k
            for px, py in pixels:
                draw.ellipse([px - r, py - r, px + r, py + r], fill=color)
    if len(plot.series) > 1:
        x = (WIDTH - RIGHT - 8) * k
        for s, color, _ in reversed(_colored(plot)):
            x -= (draw.textlength(s.label, font=font) + 30 * k)
            draw.line([(x, 17 * k), (x + 20 * k, 17 * k)], fill=color, width=3 * k)
            draw.text((x + 25 * k, 17 * k), s.label, fill=INK, font=font, anchor="lm")


def _draw_vertical_label(image, text: str, center: tuple[float, float], font) -> None:
    """Text turned 90 degrees counter-clockwise, centred on `center` (Pillow draws only upright text)."""
    from PIL import Image, ImageDraw
    left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    label = Image.new("RGBA", (right - left + 4, bottom - top + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill=INK, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (int(center[0] - label.width / 2), int(center[1] - label.height / 2)), label)
