"""dcsft_jax.stats: the paired bootstrap against cases whose answer is known by hand."""
import numpy as np
import pytest

from dcsft_jax import stats


def test_bootstrap_interval_of_a_hand_made_case():
  """One seed, four images, A right where B is wrong on one of them: a resampled mean difference is
  X/4 with X ~ Binomial(4, 1/4), whose 2.5% and 97.5% quantiles are 0 and 3/4 (CDF(2) = 243/256 <
  0.975 <= CDF(3) = 255/256)."""
  a, b = [1, 1, 0, 0], [0, 1, 0, 0]
  got = stats.paired_bootstrap(a, b, n_boot=20_000)
  assert (got.diff, got.lo, got.hi) == (0.25, 0.0, 0.75)
  assert got.verdict == "within noise"


def test_pairing_and_seeds():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 2, (3, 400))
  better = base.copy()
  flip = np.flatnonzero(base[0] == 0)[:40]
  better[:, flip] = 1                                  # +10 points, on the same images in every seed
  got = stats.paired_bootstrap(better, base)
  # Pairing: every paired difference is 0 or +1, so no resample can be negative.
  assert got.verdict == "better" and got.diff > 0.05 and 0.02 < got.lo < got.diff < got.hi <= 0.11
  assert stats.paired_bootstrap(base, base).diff == 0.0
  assert stats.paired_bootstrap(base, better).verdict == "worse"
  # Seeds are resampled too: a difference that only one of three seeds shows is not significant.
  one_seed = base.copy()
  one_seed[0, :] = 1
  assert stats.paired_bootstrap(one_seed, base, n_boot=4000).verdict == "within noise"
  with pytest.raises(ValueError, match="one shape"):
    stats.paired_bootstrap([1, 0], [1, 0, 1])
  assert stats.mean_std([60.0, 62.0, 64.0]) == (62.0, 2.0) and stats.mean_std([5.0]) == (5.0, 0.0)
