"""The GRPO family as named parts, and each published algorithm as a configuration of them (issue 30).

A policy-gradient step on G completions per prompt is five choices, each a registry here:

  ADVANTAGES    rewards [B, G] -> advantages [B, G]
    group        (r - mean_g) / (std_g + eps), std with Bessel's correction, eps 1e-4: GRPO (the
                 paper's Eq. 5; TRL scale_rewards="group", ms-swift's default)
    group_mean   r - mean_g: Dr. GRPO (TRL scale_rewards="none")
    batch        (r - mean_g) / (std over the whole batch + eps): TRL scale_rewards="batch"
    rloo         r_i - mean of the other G - 1 rewards: RLOO's leave-one-out baseline
  RATIOS        the importance ratio of the policy to the rollout policy
    token        rho_t = exp(logp_t - old_t): GRPO, DAPO
    sequence     s = exp(mean_t (logp_t - old_t)), one per completion, length-normalised: GSPO
                 (TRL importance_sampling_level="sequence")
  clip          -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A): eps_high > eps_low is DAPO's
                 clip-higher (TRL epsilon / epsilon_high)
  KL            beta * k3(pi, pi_ref) = exp(ref - logp) - (ref - logp) - 1 per token, or off (beta 0)
  AGGREGATIONS  how token terms become the loss: (the step's sum, the count it is divided by)
    sequence_mean  each completion's token mean, averaged over completions: GRPO (TRL "grpo")
    token_mean     every token of the batch weighs the same, sum / the batch's tokens: DAPO, BNPO
    constant       sum / (completions x the longest allowed completion): Dr. GRPO (TRL "dr_grpo")

and two rollout filters, applied on the host before the step:
  dynamic sampling  DAPO's: a group whose rewards are all equal has A = 0 and teaches nothing; it is
                    dropped and the batch filled from further prompts (`informative`)
  overlong          'filter': a completion cut at the token budget leaves the loss (TRL
                    mask_truncated_completions); 'soft': DAPO's length penalty added to its reward
                    (`overlong_penalty`)

`ALGORITHMS` names the published ones. `grpo` is the paper's and the default, and gives exactly the
losses and gradients of `dcsft_jax.train.grpo` (tested).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-4          # TRL's and ms-swift's epsilon in the advantage's denominator


# ----------------------------------------------------------------------------- advantages
def _group(r, eps: float = EPS):
  G = r.shape[-1]
  mean = r.mean(axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.sum((r - mean) ** 2, axis=-1, keepdims=True) / max(G - 1, 1))
  return (r - mean) / (std + eps)


def _group_mean(r, eps: float = EPS):
  return r - r.mean(axis=-1, keepdims=True)


def _batch(r, eps: float = EPS):
  n = r.size
  std = jnp.sqrt(jnp.sum((r - r.mean()) ** 2) / max(n - 1, 1))
  return (r - r.mean(axis=-1, keepdims=True)) / (std + eps)


def _rloo(r, eps: float = EPS):
  G = r.shape[-1]
  others = (r.sum(axis=-1, keepdims=True) - r) / max(G - 1, 1)
  return r - others


ADVANTAGES: dict[str, Callable] = {"group": _group, "group_mean": _group_mean, "batch": _batch, "rloo": _rloo}


def advantages(name: str, rewards):
  """rewards [B, G] -> advantages [B, G] by the estimator `name` (float32)."""
  return ADVANTAGES[name](jnp.asarray(rewards, jnp.float32))


# ----------------------------------------------------------------------------- ratios
def _token_log_ratio(logp, old, mask):
  return logp - old


def _sequence_log_ratio(logp, old, mask):
  n = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
  return ((logp - old) * mask).sum(axis=1, keepdims=True) / n          # [R, 1], broadcast over tokens


RATIOS: dict[str, Callable] = {"token": _token_log_ratio, "sequence": _sequence_log_ratio}


# ----------------------------------------------------------------------------- aggregations
def _sequence_mean(terms, mask, rows, width):
  per_seq = (terms * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
  return jnp.sum(per_seq * rows), jnp.sum(rows)


def _token_mean(terms, mask, rows, width):
  return jnp.sum((terms * mask).sum(axis=1) * rows), jnp.sum(mask.sum(axis=1) * rows)


def _constant(terms, mask, rows, width):
  return jnp.sum((terms * mask).sum(axis=1) * rows), jnp.sum(rows) * width


AGGREGATIONS: dict[str, Callable] = {"sequence_mean": _sequence_mean, "token_mean": _token_mean,
                                     "constant": _constant}
OVERLONG = ("none", "filter", "soft")


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One policy-gradient algorithm: a choice from each registry and its constants."""
  advantage: str = "group"
  ratio: str = "token"
  aggregation: str = "sequence_mean"
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.04                 # the k3 KL's weight; 0 = no reference model term
  dynamic_sampling: bool = False
  overlong: str = "none"             # none | filter | soft
  overlong_buffer: float = 0.2       # soft: the budget's last share penalised linearly (DAPO: 4096 of 20480)

  def __post_init__(self):
    for value, table, what in ((self.advantage, ADVANTAGES, "advantage"), (self.ratio, RATIOS, "ratio"),
                               (self.aggregation, AGGREGATIONS, "aggregation"), (self.overlong, OVERLONG, "overlong")):
      if value not in table:
        raise ValueError(f"unknown {what} {value!r}; the {what}s are {', '.join(table)}")
    if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
      raise ValueError(f"clip bounds must satisfy 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                       f"{self.epsilon_low}, {self.epsilon_high}")
    if self.beta < 0:
      raise ValueError(f"beta must be >= 0, got {self.beta}")
    if not 0 < self.overlong_buffer <= 1:
      raise ValueError(f"overlong_buffer is a share of the token budget in (0, 1] (DAPO: 0.2), got {self.overlong_buffer}")

  def buffer_tokens(self, max_new_tokens: int) -> int:
    """The soft overlong penalty's span in tokens for a budget of `max_new_tokens` (at least 1)."""
    return max(1, round(self.overlong_buffer * max_new_tokens))


ALGORITHMS: dict[str, Algorithm] = {
    # The paper's (ms-swift 3.6 defaults, NOTES §1.7): group advantages, clip 0.2, beta 0.04.
    "grpo": Algorithm(),
    # Dr. GRPO (Liu et al. 2025): no std in the advantage, no length normalisation, no KL.
    "dr_grpo": Algorithm(advantage="group_mean", aggregation="constant", beta=0.0),
    # DAPO (Yu et al. 2025): clip-higher 0.2 / 0.28, token-level loss, no KL, dynamic sampling,
    # overlong reward shaping.
    "dapo": Algorithm(aggregation="token_mean", epsilon_high=0.28, beta=0.0, dynamic_sampling=True,
                      overlong="soft"),
    # GSPO (Zheng et al. 2025): the length-normalised sequence ratio with its narrow clip, no KL.
    "gspo": Algorithm(ratio="sequence", epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0),
    # RLOO (Ahmadian et al. 2024): the leave-one-out baseline; otherwise GRPO's parts.
    "rloo": Algorithm(advantage="rloo"),
}


def configured(name: str, *, beta: float, clip_eps: float, **overrides) -> Algorithm:
  """The algorithm a run named `name` trains with: 'grpo' is the paper's with the config's KL weight
  and clip (grpo.beta, grpo.clip_eps); every other name is as published (ALGORITHMS). `overrides`
  replace any part after that (config.grpo.overrides.NAME)."""
  if name == "grpo":
    overrides = {"beta": float(beta), "epsilon_low": float(clip_eps), "epsilon_high": float(clip_eps), **overrides}
  return algorithm(name, **overrides)


def algorithm(name: str, **overrides) -> Algorithm:
  """The named algorithm, with any part replaced (e.g. algorithm("dapo", overlong_buffer=0.5))."""
  if name not in ALGORITHMS:
    raise ValueError(f"unknown RL algorithm {name!r}; the algorithms are {', '.join(ALGORITHMS)}")
  fields = {f.name for f in dataclasses.fields(Algorithm)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{', '.join(unknown)} is not a part of an algorithm; the parts are {', '.join(sorted(fields))}")
  return dataclasses.replace(ALGORITHMS[name], **overrides)


# ----------------------------------------------------------------------------- the objective
def kl_k3(logp, ref_logp):
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def objective(algo: Algorithm, logp, old_logp, ref_logp, adv, mask, rows=None, *, width: int | None = None):
  """The loss of `algo` on R completions: logp, old_logp, ref_logp, mask [R, T]; adv [R]; rows [R]
  (1 for a real completion, 0 for padding). Returns (summed loss, count, sums of the step's figures):
  the step divides the loss by its count, summed over micro-batches, so 'token_mean' and 'constant'
  normalise over the whole batch as TRL's do. `width`: the longest allowed completion ('constant'),
  T by default."""
  mask = mask.astype(jnp.float32)
  rows = jnp.ones(mask.shape[0], jnp.float32) if rows is None else rows.astype(jnp.float32)
  log_ratio = RATIOS[algo.ratio](logp, old_logp, mask)
  ratio = jnp.exp(log_ratio)
  a = adv.astype(jnp.float32)[:, None]
  lo, hi = 1.0 - algo.epsilon_low, 1.0 + algo.epsilon_high
  policy = -jnp.minimum(ratio * a, jnp.clip(ratio, lo, hi) * a)
  kl = kl_k3(logp, ref_logp)
  terms = policy + algo.beta * kl if algo.beta else policy
  total, count = AGGREGATIONS[algo.aggregation](terms, mask, rows, mask.shape[1] if width is None else width)
  ratio_t = jnp.broadcast_to(ratio, mask.shape)
  tokens = mask.sum(axis=1)
  per_tok = lambda x: (x * mask).sum(axis=1) / jnp.maximum(tokens, 1.0)      # a completion's token mean
  figures = {
      "kl": jnp.sum(per_tok(kl) * rows),
      "clip_low": jnp.sum(per_tok(((ratio_t < lo) & (a < 0)).astype(jnp.float32)) * rows),
      "clip_high": jnp.sum(per_tok(((ratio_t > hi) & (a > 0)).astype(jnp.float32)) * rows),
      # Either side, whatever the advantage's sign (what the GRPO step has always logged).
      "clip_fraction": jnp.sum((((ratio_t < lo) | (ratio_t > hi)) * mask).sum(axis=1) / jnp.maximum(tokens, 1.0) * rows),
  }
  return total, count, figures


# ----------------------------------------------------------------------------- rollout filters
def informative(rewards) -> np.ndarray:
  """[B] whether each group's rewards differ (DAPO's dynamic sampling keeps these, and only these)."""
  r = np.asarray(rewards, np.float64)
  return ~np.all(r == r[:, :1], axis=1)


def overlong_penalty(lengths, max_new_tokens: int, buffer: int) -> np.ndarray:
  """DAPO's soft overlong punishment (its Eq. 13), added to each reward: 0 up to max - buffer tokens,
  then falling linearly to -1 at the budget; a completion cut at the budget gets -1."""
  n = np.asarray(lengths, np.float64)
  start = max_new_tokens - buffer
  return np.where(n <= start, 0.0, np.where(n < max_new_tokens, (start - n) / buffer, -1.0))


def truncated_mask(mask, truncated):
  """mask [R, T] with every truncated completion's row zeroed (overlong 'filter')."""
  return mask * (1 - jnp.asarray(truncated, mask.dtype))[:, None]


def loss_and_grad(algo: Algorithm, logp, old_logp, ref_logp, adv, mask, rows=None, width=None):
  """(loss = sum / count, d loss / d logp): the objective as the step sees it, for tests and tools."""
  def f(lp):
    s, n, _ = objective(algo, lp, old_logp, ref_logp, adv, mask, rows, width=width)
    return s / jnp.maximum(n, 1.0)
  return jax.value_and_grad(f)(logp)
