"""GRPO, the paper's RL baseline: the objective's pieces as pure functions.

For a group of G completions of one prompt with rewards r_1..r_G (binary, from the verifiers):
  advantage  A_i = (r_i - mean(r)) / (std(r) + eps)      (the paper's Eq. 5; std with Bessel's
             correction and eps = 1e-4, as TRL/ms-swift compute it)
  ratio      rho_t = exp(logp_t - logp_old_t)             (per completion token)
  policy     -min(rho_t A_i, clip(rho_t, 1 - c, 1 + c) A_i)   (Eq. 4, c = 0.2)
  KL         exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (the k3 estimator of KL(pi || pi_ref))
  loss       mean over completions of (sum_t mask * (policy + beta * KL) / sum_t mask)
A group whose rewards are all equal has A = 0: it contributes no policy gradient, only the KL
term's (the paper's reason RL ignores easy and hard prompts).
"""
from __future__ import annotations

import jax.numpy as jnp


def group_advantages(rewards, eps: float = 1e-4):
  """rewards [B, G] -> advantages [B, G], normalised within each prompt's group."""
  r = rewards.astype(jnp.float32)
  G = r.shape[-1]
  mean = r.mean(axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.sum((r - mean) ** 2, axis=-1, keepdims=True) / max(G - 1, 1))
  return (r - mean) / (std + eps)


def kl_k3(logp, ref_logp):
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta: float = 0.04, clip_eps: float = 0.2):
  """logp, old_logp, ref_logp, mask [R, T]; advantages [R] -> (loss, metrics).

  R = B*G completions. old_logp is the sampling policy's (with one update per batch of rollouts it
  is the current policy, detached: the ratio is 1 but its gradient is not 0).
  """
  mask = mask.astype(jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  a = advantages[:, None]
  policy = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a)
  kl = kl_k3(logp, ref_logp)
  per_token = policy + beta * kl
  tokens = jnp.maximum(mask.sum(axis=1), 1.0)
  per_seq = (per_token * mask).sum(axis=1) / tokens
  loss = per_seq.mean()
  clipped = ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).astype(jnp.float32)
  metrics = {"kl": ((kl * mask).sum(axis=1) / tokens).mean(),
             "clip_fraction": (clipped * mask).sum() / jnp.maximum(mask.sum(), 1.0)}
  return loss, metrics
