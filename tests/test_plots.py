"""PIL-only charts: valid PNGs, bars and lines actually drawn where the layout says, degenerate inputs."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dcsft_jax import plots


def _pixels(path) -> np.ndarray:
  with Image.open(path) as img:
    # A line chart is wider than SIZE by its legend (right of the axes area); the height is fixed.
    assert img.format == "PNG" and img.size[1] == plots.SIZE[1] and img.size[0] >= plots.SIZE[0]
    return np.asarray(img.convert("RGB"))


def _bar_x(i: int, n: int) -> int:
  left, _, right, _ = plots.PLOT_BOX
  return int(left + (i + 0.5) * (right - left) / n)


def _bar_top(px: np.ndarray, x: int, color) -> int:
  """First row (from the axis upwards) where the bar colour stops."""
  _, top, _, bottom = plots.PLOT_BOX
  y = bottom - 3
  while y > top and tuple(px[y, x]) == tuple(color):
    y -= 1
  return y


def test_histogram_draws_proportional_bars(tmp_path):
  counts = [40, 0, 10, 20]
  p = plots.histogram_png(tmp_path / "sub" / "h.png", counts, ["a", "b", "c", "d"], title="T", xlabel="x")
  assert p == str(tmp_path / "sub" / "h.png")
  px = _pixels(p)
  _, top, _, bottom = plots.PLOT_BOX
  n = len(counts)
  tallest = int(np.argmax(counts))
  assert tuple(px[(bottom + _bar_top(px, _bar_x(tallest, n), plots.BAR)) // 2, _bar_x(tallest, n)]) == plots.BAR
  # Zero bar: no bar colour anywhere in its column of the plot area.
  column = {tuple(c) for c in px[top:bottom - 1, _bar_x(1, n)]}
  assert plots.BAR not in column and plots.BACKGROUND in column
  # Heights proportional to counts (the axis starts at 0).
  heights = [bottom - _bar_top(px, _bar_x(i, n), plots.BAR) for i in range(n)]
  assert heights[1] <= 3
  assert heights[0] / heights[3] == pytest.approx(2, rel=0.05)
  assert heights[3] / heights[2] == pytest.approx(2, rel=0.1)
  assert os.listdir(tmp_path / "sub") == ["h.png"]  # the tmp file was renamed, not left behind


def test_histogram_colors_and_degenerate(tmp_path):
  red, green = (200, 30, 30), (30, 160, 60)
  p = plots.histogram_png(tmp_path / "c.png", [3, 5], ["x", "y"], title="t", xlabel="x", colors=[red, "#1ea03c"])
  px = _pixels(p)
  _, _, _, bottom = plots.PLOT_BOX
  assert tuple(px[bottom - 4, _bar_x(0, 2)]) == red and tuple(px[bottom - 4, _bar_x(1, 2)]) == green
  plots.histogram_png(tmp_path / "one.png", [7], ["only"], title="t", xlabel="x", colors="green")
  px = _pixels(plots.histogram_png(tmp_path / "zeros.png", [0, 0, 0], ["a", "b", "c"], title="t", xlabel="x"))
  assert not (px == np.array(plots.BAR)).all(-1).any()  # all-zero counts: an empty but valid chart

  with pytest.raises(ValueError, match="2 counts but 3 labels"):
    plots.histogram_png(tmp_path / "bad.png", [1, 2], ["a", "b", "c"], title="t", xlabel="x")
  with pytest.raises(ValueError, match="1 colors for 2 bars"):
    plots.histogram_png(tmp_path / "bad.png", [1, 2], ["a", "b"], title="t", xlabel="x", colors=[red])
  with pytest.raises(ValueError, match="non-negative"):
    plots.histogram_png(tmp_path / "bad.png", [1, -2], ["a", "b"], title="t", xlabel="x")
  with pytest.raises(ValueError, match="no bars"):
    plots.histogram_png(tmp_path / "bad.png", [], [], title="t", xlabel="x")
  assert not (tmp_path / "bad.png").exists()


def test_line_plot_draws_each_series(tmp_path):
  series = {"train loss": ([0, 100, 200, 300], [2.3, 1.1, 0.7, 0.65]),
            "eval acc": ([0, 150, 300], [0.1, 0.5, 0.8]),
            "constant": ([0, 300], [1.0, 1.0])}
  px = _pixels(plots.line_png(tmp_path / "l.png", series, title="curves", xlabel="step", ylabel="value"))
  for i in range(len(series)):
    assert (px == np.array(plots.PALETTE[i])).all(-1).sum() > 50, f"series {i} not drawn"
  assert not (px == np.array(plots.PALETTE[len(series)])).all(-1).any()


def test_line_plot_degenerate_inputs(tmp_path):
  px = _pixels(plots.line_png(tmp_path / "pt.png", {"one point": ([5], [3])}, title="t", xlabel="x", ylabel="y"))
  assert (px == np.array(plots.PALETTE[0])).all(-1).sum() > 20  # the marker (and the legend swatch)
  plots.line_png(tmp_path / "flat.png", {"flat": ([1, 1, 1], [0, 0, 0])}, title="t", xlabel="x", ylabel="y")
  plots.line_png(tmp_path / "neg.png", {"n": ([-3, -1], [-1e-6, 2e-6])}, title="t", xlabel="x", ylabel="y")
  with pytest.raises(ValueError, match="2 x values but 3 y values"):
    plots.line_png(tmp_path / "bad.png", {"s": ([1, 2], [1, 2, 3])}, title="t", xlabel="x", ylabel="y")
  with pytest.raises(ValueError, match="empty"):
    plots.line_png(tmp_path / "bad.png", {"s": ([], [])}, title="t", xlabel="x", ylabel="y")
  with pytest.raises(ValueError, match="NaN"):
    plots.line_png(tmp_path / "bad.png", {"s": ([1, 2], [1, float("nan")])}, title="t", xlabel="x", ylabel="y")
  with pytest.raises(ValueError, match="no series"):
    plots.line_png(tmp_path / "bad.png", {}, title="t", xlabel="x", ylabel="y")


@pytest.mark.parametrize("lo,hi", [(0, 1), (0, 11), (0, 4163), (3, 3), (0, 0), (-2, 7), (0.1, 0.93), (1e-6, 3e-6)])
def test_nice_ticks_cover_range_with_round_steps(lo, hi):
  t = plots.nice_ticks(lo, hi)
  assert len(t) >= 2 and t[0] <= lo and t[-1] >= hi
  steps = np.diff(t)
  assert np.allclose(steps, steps[0])
  mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
  assert any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
  assert len(t) <= 8


def test_the_legend_lies_outside_the_data_and_covers_no_point(tmp_path):
  """Issue 27: the legend box covered the OOD curves' last steps. Series that reach every corner of the
  data area, the top right included: every marker keeps its colour, and the legend's swatches lie right of
  the axes area, clear of the largest marker."""
  series = {"SFT": ([0, 10, 20, 30, 40], [0, 50, 60, 70, 100]), "SFT-EM": ([0, 40], [100, 0]),
            "a very long run name indeed": ([0, 20, 40], [5, 85, 95])}
  path = plots.line_png(tmp_path / "l.png", series, title="t", xlabel="step", ylabel="accuracy (%)")
  px = _pixels(path)
  left, top, right, bottom = plots.PLOT_BOX
  assert px.shape[1] > right + plots.LEGEND_GAP          # the canvas grew to hold it
  for i, (xs, ys) in enumerate(series.values()):
    color = np.array(plots.PALETTE[i])
    hit = np.argwhere((px == color).all(-1))
    swatch = hit[hit[:, 1] > right + 4]                   # what lies right of the markers' reach
    assert len(swatch) > 0 and swatch[:, 1].min() >= right + plots.LEGEND_GAP, (i, swatch[:, 1].min())
    x_of = lambda v: left + v / 40 * (right - left)
    y_of = lambda v: bottom - v / 100 * (bottom - top)
    for x, y in zip(xs, ys):                              # each marker's centre still has its colour
      assert (px[int(round(y_of(y))), int(round(x_of(x)))] == color).all(), (i, x, y)


def test_step_axes_get_whole_number_ticks():
  assert plots.nice_ticks(0, 2, integer=True) == [0, 1, 2]
  assert all(t == int(t) for t in plots.nice_ticks(1, 3, integer=True))
  assert plots.nice_ticks(0, 2) == [0, 0.5, 1, 1.5, 2]   # values keep their fractional ticks
