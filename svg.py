"""svg.py: the pictures of a run, as plain SVG written by hand (no plotting library). Plumbing.

    from svg import line_panel, bar_panel, page
    text = page([line_panel("L_ce", {"ce": [(step, value), ...]}, "step")], columns=1)

A page is a grid of panels, each a titled pair of axes: line_panel draws series of (x, y) points
(a training log), bar_panel draws groups of bars (a results table beside the paper's). Every mark
carries a <title> with its numbers (a browser shows it on hover; tests read it back) and
data-series / data-x / data-y attributes, so what is drawn can be checked against what it was
drawn from. The pictures of tinydistil: train_log.svg (tinydistil.py pretrain) and
`report --svg` (tasks/report.py).
"""
import math
from xml.sax.saxutils import escape, quoteattr

PANEL_W, PANEL_H = 330, 220            # one panel, pixels
MARGIN = dict(left=58, right=22, top=26, bottom=34)  # the plot area inside a panel
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
PAPER_COLORS = ("#555555", "#999999", "#c7c7c7", "#777777")  # the paper's rows: greys
FONT = 'font-family="sans-serif"'


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [first + i * step for i in range(count + 1)]


def _number(x: float) -> str:
    """A tick label: whole numbers as they are (step 3000, not 3e+03), others to 3 digits."""
    if x == int(x) and abs(x) < 1e7:
        return str(int(x))
    return f"{x:.3g}"


def _text(x, y, text, anchor="middle", extra="", size=11):
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {FONT} '
            f'font-size="{size}"{extra}>'
            f'{escape(str(text))}</text>')


class Axes:
    """The plot area of a panel at (x0, y0) and the maps from data to pixels."""

    def __init__(self, x0, y0, x_ticks, y_ticks):
        self.left, self.top = x0 + MARGIN["left"], y0 + MARGIN["top"]
        self.width = PANEL_W - MARGIN["left"] - MARGIN["right"]
        self.height = PANEL_H - MARGIN["top"] - MARGIN["bottom"]
        self.x_ticks, self.y_ticks = x_ticks, y_ticks

    def px(self, x):
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (x - lo) / ((hi - lo) or 1) * self.width

    def py(self, y):
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.top + self.height - (y - lo) / ((hi - lo) or 1) * self.height

    def frame(self, title, x_label, y_label, x_numbers=True, y_numbers=True):
        """The box, the grid lines with their numbers, the title and the axis labels."""
        out = [f'<rect x="{self.left}" y="{self.top}" width="{self.width}" '
               f'height="{self.height}" fill="white" stroke="#444"/>']
        for y in self.y_ticks:
            out.append(f'<line x1="{self.left}" x2="{self.left + self.width}" y1="{self.py(y):.1f}"'
                       f' y2="{self.py(y):.1f}" stroke="#ddd"/>')
            if y_numbers:
                out.append(_text(self.left - 4, self.py(y) + 4, _number(y), "end"))
        for x in self.x_ticks if x_numbers else ():
            out.append(_text(self.px(x), self.top + self.height + 14, _number(x)))
        out.append(_text(self.left + self.width / 2, self.top - 9, title,
                         extra=' font-weight="bold"', size=12))
        if x_label:
            out.append(_text(self.left + self.width / 2, self.top + self.height + 28, x_label))
        cx, cy = self.left - 44, self.top + self.height / 2
        out.append(_text(cx, cy, y_label, extra=f' transform="rotate(-90 {cx} {cy})"'))
        return out


def line_panel(title: str, series: dict, x_label: str, y_label: str = "", empty: str = "no data",
               from_zero: bool = False):
    """A panel of lines: series is {name: [(x, y), ...]}; points whose y is None are skipped.
    Returns a function of the panel's corner that gives its SVG elements."""
    points = {name: [(x, y) for x, y in pts if y is not None] for name, pts in series.items()}
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]

    def draw(x0, y0):
        if not ys:  # nothing to draw: the frame and a word why
            axes = Axes(x0, y0, [0, 1], [0, 1])
            return axes.frame(title, x_label, y_label, x_numbers=False, y_numbers=False) + [
                _text(axes.left + axes.width / 2, axes.top + axes.height / 2, empty)]
        lo = min(0.0, min(ys)) if from_zero else min(ys)
        axes = Axes(x0, y0, nice_ticks(min(xs), max(xs)), nice_ticks(lo, max(ys)))
        out = axes.frame(title, x_label, y_label)
        radius = 2 if len(xs) <= 60 else 0.8  # dots for hovering; many would hide the line
        for i, (name, pts) in enumerate(points.items()):
            color = COLORS[i % len(COLORS)]
            path = " ".join(f"{axes.px(x):.2f},{axes.py(y):.2f}" for x, y in pts)
            out.append(f'<polyline data-series={quoteattr(name)} points="{path}" fill="none" '
                       f'stroke="{color}" stroke-width="1.5"/>')
            for x, y in pts:
                out.append(f'<circle data-series={quoteattr(name)} data-x="{x!r}" data-y="{y!r}" '
                           f'cx="{axes.px(x):.2f}" cy="{axes.py(y):.2f}" r="{radius}" '
                           f'fill="{color}">'
                           f'<title>{escape(name)} at {x_label} {x}: {y:.6g}</title></circle>')
        if len(points) > 1:
            out += _legend(list(points), axes.left + 6, axes.top + 6, COLORS)
        return out
    return draw


def bar_panel(title: str, groups: list, series: dict, y_label: str = "", paper=(),
              width: int = 700, legend_width: int = 260):
    """A panel of grouped bars: series is {name: [value per group, or None]}; names in `paper`
    are drawn in greys (the published rows), the others in colours (ours). Percent, from 0."""
    values = [v for vs in series.values() for v in vs if v is not None]

    def draw(x0, y0):
        axes = Axes(x0, y0, [0, 1], nice_ticks(0, max(values + [100.0])))
        axes.width = width - MARGIN["left"] - MARGIN["right"]
        out = axes.frame(title, "", y_label, x_numbers=False)
        group_w = axes.width / len(groups)
        bar_w = 0.8 * group_w / max(1, len(series))
        colors = _series_colors(series, paper)
        for g, group in enumerate(groups):
            left = axes.left + g * group_w + 0.1 * group_w
            out.append(_text(axes.left + (g + 0.5) * group_w, axes.top + axes.height + 14, group))
            for s, (name, vs) in enumerate(series.items()):
                if vs[g] is None:
                    continue
                top = axes.py(vs[g])
                out.append(f'<rect data-series={quoteattr(name)} data-x={quoteattr(group)} '
                           f'data-y="{vs[g]!r}" x="{left + s * bar_w:.2f}" y="{top:.2f}" '
                           f'width="{bar_w:.2f}" height="{axes.top + axes.height - top:.2f}" '
                           f'fill="{colors[name]}"><title>{escape(name)}, {escape(group)}: '
                           f'{vs[g]:.1f}</title></rect>')
        out += _legend(list(series), axes.left + axes.width + 10, axes.top,
                       [colors[n] for n in series])
        return out
    draw.width = width + legend_width  # the legend sits right of the bars
    return draw


def _series_colors(series, paper):
    greys, colors = iter(PAPER_COLORS * 4), iter(COLORS * 4)
    return {name: next(greys) if name in paper else next(colors) for name in series}


def _legend(names, x, y, colors):
    out = []
    for i, name in enumerate(names):
        out.append(f'<rect x="{x}" y="{y + 15 * i}" width="10" height="10" '
                   f'fill="{colors[i % len(colors)]}"/>')
        out.append(_text(x + 14, y + 15 * i + 9, name, "start"))
    return out


def page(panels: list, columns: int, title: str = "") -> str:
    """The SVG document: panels in a grid of `columns`, row by row, under an optional title."""
    head = 24 if title else 0
    widths = [getattr(p, "width", PANEL_W) for p in panels]
    col_w = [max(widths[i::columns]) for i in range(columns)]
    rows = math.ceil(len(panels) / columns)
    width, height = sum(col_w), head + rows * PANEL_H
    body = [_text(width / 2, 17, title, extra=' font-weight="bold"', size=14)] if title \
        else []
    for i, panel in enumerate(panels):
        x0, y0 = sum(col_w[:i % columns]), head + (i // columns) * PANEL_H
        body += panel(x0, y0)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
