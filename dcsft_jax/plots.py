"""Small PNG charts (bar histogram, line chart) drawn with Pillow alone.

matplotlib is not a dependency of this project, and the reports only need two chart types: the
pass-rate histogram of the difficulty curation and training/eval curves. Both writers save
atomically (tmp file in the same directory + os.replace), so a reader never sees half a PNG.

The plot area of every chart is `PLOT_BOX` (left, top, right, bottom) of a `SIZE` image; bar i of n
spans the i-th of n equal slots of it. Tests rely on that layout to find bars.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageColor, ImageDraw, ImageFont

from dcsft_jax import atomic

SIZE = (800, 500)
PLOT_BOX = (90, 60, 770, 420)  # left, top, right, bottom of the axes area
LEGEND_GAP = 24                # a line chart's legend starts this far right of the axes area
BACKGROUND = (255, 255, 255)
AXIS = (40, 40, 40)
GRID = (225, 225, 225)
BAR = (70, 120, 190)
# tab10: distinct and colour-blind friendly enough for a handful of series.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
Color = str | tuple[int, int, int]


# ----------------------------------------------------------------------------- helpers
def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
    return ImageFont.load_default()


def _rgb(color: Color) -> tuple[int, int, int]:
  return ImageColor.getrgb(color)[:3] if isinstance(color, str) else tuple(int(c) for c in color[:3])


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
  x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
  return x1 - x0, y1 - y0


def _centered(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill=AXIS):
  w, h = _text_size(draw, text, font)
  draw.text((xy[0] - w / 2, xy[1] - h / 2), text, font=font, fill=fill)


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
  """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi].

  A zero-width range is widened first, so a constant series still gets an axis. `integer` (steps,
  counts): whole-number ticks only, so a 2-step run does not get a tick at step 0.25.
  """
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
  if hi < lo:
    lo, hi = hi, lo
  if hi == lo:
    pad = abs(lo) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
  raw = (hi - lo) / max(n - 1, 1)
  if integer:
    raw = max(raw, 1.0)
  mag = 10 ** math.floor(math.log10(raw))
  step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw and not (integer and m * mag % 1))
  first = math.floor(lo / step + 1e-9) * step
  last = math.ceil(hi / step - 1e-9) * step
  n_steps = max(round((last - first) / step), 1)
  ticks = [round(first + i * step, 12) for i in range(n_steps + 1)]
  return ticks


def _fmt(v: float) -> str:
  if v == int(v) and abs(v) < 1e15:
    return str(int(v))
  return f"{v:.6g}"


def _frame(title: str, xlabel: str, ylabel: str, width: int = SIZE[0]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
  """White canvas (SIZE, or wider to hold a legend right of the plot area) with the title and both axis
  labels (the y label rotated)."""
  img = Image.new("RGB", (width, SIZE[1]), BACKGROUND)
  draw = ImageDraw.Draw(img)
  left, top, right, bottom = PLOT_BOX
  _centered(draw, (width / 2, top / 2), title, _font(20))
  _centered(draw, ((left + right) / 2, SIZE[1] - 22), xlabel, _font(15))
  font = _font(15)
  w, h = _text_size(draw, ylabel, font)
  label = Image.new("RGB", (w + 4, h + 6), BACKGROUND)
  ImageDraw.Draw(label).text((2, 0), ylabel, font=font, fill=AXIS)
  label = label.rotate(90, expand=True)
  img.paste(label, (8, int((top + bottom) / 2 - label.height / 2)))
  return img, draw


def _y_axis(draw: ImageDraw.ImageDraw, ticks: Sequence[float]):
  """Horizontal grid lines + tick labels; returns value -> pixel row."""
  left, top, right, bottom = PLOT_BOX
  lo, hi = ticks[0], ticks[-1]

  def to_y(v: float) -> float:
    return bottom - (v - lo) / (hi - lo) * (bottom - top)

  font = _font(13)
  for t in ticks:
    y = to_y(t)
    draw.line([(left, y), (right, y)], fill=GRID)
    w, h = _text_size(draw, _fmt(t), font)
    draw.text((left - 8 - w, y - h / 2 - 2), _fmt(t), font=font, fill=AXIS)
  return to_y


def _axes(draw: ImageDraw.ImageDraw):
  left, top, right, bottom = PLOT_BOX
  draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS, width=2)


def _save_png(img: Image.Image, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  with atomic.writer(path, "wb") as f:
    img.save(f, format="PNG")
  return path


# ----------------------------------------------------------------------------- charts
def histogram_png(path: str | os.PathLike, counts: Sequence[int], labels: Sequence[str], *, title: str,
                  xlabel: str, ylabel: str = "records", colors: Sequence[Color] | Color | None = None) -> str:
  """A bar chart of `counts` (one bar per label, the count written above it); returns the path.

  colors: None (one default colour), one colour for all bars, or one colour per bar.
  """
  counts = list(counts)
  labels = [str(s) for s in labels]
  if len(counts) != len(labels):
    raise ValueError(f"{len(counts)} counts but {len(labels)} labels")
  if not counts:
    raise ValueError("nothing to plot: no bars")
  for c in counts:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
      raise ValueError(f"counts must be finite non-negative numbers, got {c!r}")
  if colors is None:
    fills = [BAR] * len(counts)
  elif isinstance(colors, str) or (isinstance(colors, tuple) and len(colors) in (3, 4)
                                   and all(isinstance(c, int) for c in colors)):
    fills = [_rgb(colors)] * len(counts)
  else:
    fills = [_rgb(c) for c in colors]
    if len(fills) != len(counts):
      raise ValueError(f"{len(fills)} colors for {len(counts)} bars")

  img, draw = _frame(title, xlabel, ylabel)
  left, _, right, bottom = PLOT_BOX
  ticks = nice_ticks(0, max(max(counts), 1))
  to_y = _y_axis(draw, ticks)
  slot = (right - left) / len(counts)
  pad = min(slot * 0.15, 12)
  tick_font, count_font = _font(13), _font(13)
  for i, (c, label, fill) in enumerate(zip(counts, labels, fills)):
    x0, x1 = left + i * slot + pad, left + (i + 1) * slot - pad
    y = to_y(c)
    if c > 0:  # a zero bar must leave the background untouched
      draw.rectangle([x0, y, x1, bottom], fill=fill)
    _centered(draw, ((x0 + x1) / 2, y - 13), _fmt(c), count_font)
    _centered(draw, ((x0 + x1) / 2, bottom + 14), label, tick_font)
  _axes(draw)
  return _save_png(img, path)


def line_png(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
             xlabel: str, ylabel: str,
             bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> str:
  """A line chart of named (xs, ys) series, each in its own `PALETTE` colour with point markers and a legend.

  bands: {name: (lows, highs)} at the series' xs, shaded in the series' colour (translucent, so
  overlapping bands stay visible): the spread over seeds around a mean."""
  if not series:
    raise ValueError("nothing to plot: no series")
  bands = dict(bands or {})
  for name, band in bands.items():
    if name not in series:
      raise ValueError(f"band {name!r} has no series")
    if len(band) != 2 or not (len(band[0]) == len(band[1]) == len(series[name][0])):
      raise ValueError(f"band {name!r} must be (lows, highs) with one value per x of its series")
  clean: dict[str, tuple[list[float], list[float]]] = {}
  for name, xy in series.items():
    if len(xy) != 2:
      raise ValueError(f"series {name!r} must be (xs, ys)")
    xs, ys = [float(v) for v in xy[0]], [float(v) for v in xy[1]]
    if len(xs) != len(ys):
      raise ValueError(f"series {name!r} has {len(xs)} x values but {len(ys)} y values")
    if not xs:
      raise ValueError(f"series {name!r} is empty")
    if not all(math.isfinite(v) for v in xs + ys):
      raise ValueError(f"series {name!r} holds a NaN or infinite value")
    clean[str(name)] = (xs, ys)

  all_x = [v for xs, _ in clean.values() for v in xs]
  all_y = [v for _, ys in clean.values() for v in ys]
  for lows, highs in bands.values():
    if not all(math.isfinite(float(v)) for v in [*lows, *highs]):
      raise ValueError("a band holds a NaN or infinite value")
    all_y += [float(v) for v in [*lows, *highs]]
  integer_x = all(v == int(v) for v in all_x)
  xticks, yticks = nice_ticks(min(all_x), max(all_x), integer=integer_x), nice_ticks(min(all_y), max(all_y))
  # The legend goes right of the plot area, outside the data: it never covers a point.
  lfont = _font(13)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  box_w = max(_text_size(probe, n, lfont)[0] for n in clean) + 44
  img, draw = _frame(title, xlabel, ylabel, width=max(SIZE[0], PLOT_BOX[2] + 24 + box_w + 12))
  left, top, right, bottom = PLOT_BOX
  to_y = _y_axis(draw, yticks)

  def to_x(v: float) -> float:
    return left + (v - xticks[0]) / (xticks[-1] - xticks[0]) * (right - left)

  font = _font(13)
  for t in xticks:
    x = to_x(t)
    draw.line([(x, bottom), (x, bottom + 5)], fill=AXIS)
    _centered(draw, (x, bottom + 16), _fmt(t), font)
  _axes(draw)

  colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(clean)}
  if bands:
    # Bands first, under every line, composited at 20% opacity onto the frame.
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(layer)
    for name, (lows, highs) in bands.items():
      xs = clean[str(name)][0]
      upper = [(to_x(x), to_y(float(h))) for x, h in zip(xs, highs)]
      lower = [(to_x(x), to_y(float(lo))) for x, lo in zip(xs, lows)]
      shade.polygon(upper + lower[::-1], fill=(*colors[str(name)], 51))
    img.paste(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"))
  for name, (xs, ys) in clean.items():
    pts = [(to_x(x), to_y(y)) for x, y in zip(xs, ys)]
    if len(pts) > 1:
      draw.line(pts, fill=colors[name], width=2, joint="curve")
    for x, y in pts:
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colors[name])

  # Legend right of the plot area (LEGEND_GAP px), top-aligned with it.
  row_h = 20
  x0, y0 = right + LEGEND_GAP, top
  draw.rectangle([x0, y0, x0 + box_w, y0 + row_h * len(clean) + 8], fill=BACKGROUND, outline=GRID)
  for i, name in enumerate(clean):
    y = y0 + 4 + i * row_h + row_h / 2
    draw.line([(x0 + 8, y), (x0 + 30, y)], fill=colors[name], width=3)
    draw.text((x0 + 36, y - 8), name, font=lfont, fill=AXIS)
  return _save_png(img, path)
