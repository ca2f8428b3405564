"""Spread and significance of accuracy differences: is method A better than SFT out of distribution,
or is the difference within noise?

`paired_bootstrap` compares two methods evaluated on the same images (and, with several training
seeds, the same seeds): it resamples seeds, then images, with replacement, the same draw for both
methods (paired), and takes the percentile interval of the mean difference. Pairing removes the
variance that the two share (an image both get right or both get wrong says nothing about which is
better), which is what makes a 2-point difference on a few hundred images resolvable or not.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interval:
  diff: float      # mean of a - b over seeds and images
  lo: float        # the interval's ends (level given to paired_bootstrap)
  hi: float

  @property
  def verdict(self) -> str:
    if self.lo > 0:
      return "better"
    if self.hi < 0:
      return "worse"
    return "within noise"


def paired_bootstrap(a, b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
  """a, b: [seeds, images] (or [images]) per-example scores (1 right, 0 wrong) of two methods on the
  same images. The interval of mean(a - b) by a two-level paired bootstrap (seeds, then images)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired samples must have one shape, got {a.shape} and {b.shape}")
  d = a - b
  if d.ndim == 1:
    d = d[None]
  if d.ndim != 2 or d.size == 0:
    raise ValueError(f"expected [seeds, images] or [images] scores, got shape {a.shape}")
  n_seeds, n_images = d.shape
  rng = np.random.default_rng(seed)
  means = []
  for start in range(0, n_boot, 256):     # 256 resamples at a time: bounded memory
    n = min(256, n_boot - start)
    s = rng.integers(0, n_seeds, (n, n_seeds))
    j = rng.integers(0, n_images, (n, n_seeds, n_images))
    means.append(d[s[..., None], j].mean(axis=(1, 2)))
  means = np.concatenate(means)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
  return Interval(float(d.mean()), float(lo), float(hi))


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
