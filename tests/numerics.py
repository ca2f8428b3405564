"""Tolerances from the numerics, shared by the tests that compare two computations of the same
mathematical quantity (reassociated sums, sharded vs single device, accumulated vs one batch).

fp32 has a unit roundoff of u = 2**-24 ~ 6e-8. A sum of n terms computed in another order differs by
at most about n * u * sum|terms| (typically sqrt(n) * u * that), so errors are relative to the size of
the terms, not to the (possibly tiny) result. Hence the comparisons here are relative to the largest
magnitude in each leaf, never element-wise rtol, which near-zero elements make fragile.
"""
from __future__ import annotations

import jax
import numpy as np

# A few thousand fp32 terms per gradient element, each order of summation: ~1e-6 of the leaf's
# largest value is typical; 1e-5 leaves an order of magnitude for machines that vectorise differently.
REASSOCIATION = 1e-5


def leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree) if x is not None]


def max_leaf_rel_diff(a, b) -> float:
  """max over leaves of max|a - b| / max|b| (0 where b is all zero and a equals it)."""
  worst = 0.0
  for x, y in zip(leaves(a), leaves(b), strict=True):
    scale = np.abs(y).max()
    d = np.abs(x - y).max()
    worst = max(worst, d / scale if scale > 0 else (0.0 if d == 0 else np.inf))
  return worst


def assert_trees_close(a, b, rel: float = REASSOCIATION) -> None:
  worst = max_leaf_rel_diff(a, b)
  assert worst <= rel, f"largest leaf-relative difference {worst:.3g} > {rel:.3g}"


def assert_sgd_steps_close(before, after_a, after_b, rel: float = REASSOCIATION) -> None:
  """Weights after one plain SGD step w - lr * g, from two computations of the same gradient g.

  The two updates lr * g agree to `rel` of each leaf's largest update; on top of that each weight
  carries its own rounding when the update is added, at most one ulp of the leaf's largest weight
  per side (no Adam: its normalisation g / sqrt(v) turns noise in a near-zero gradient into a
  whole step of size lr, so weights after an Adam step are not comparable this way)."""
  for w0, a, b in zip(leaves(before), leaves(after_a), leaves(after_b), strict=True):
    update = np.abs(w0 - b).max()
    ulp = np.spacing(np.float32(np.abs(w0).max() + update))
    tol = rel * update + 2 * ulp
    d = np.abs(a - b).max()
    assert d <= tol, f"weights differ by {d:.3g} > {tol:.3g} (largest update {update:.3g}, ulp {ulp:.3g})"
