"""GRPO, the paper's RL baseline: the objective's pieces as pure functions.

For a group of G completions of one prompt with rewards r_1..r_G (binary, from the verifiers):
  logp_t     log-softmax(logits / T_rollout): the log-probs at the rollout temperature, for the
             policy, the reference and the stored rollout policy alike (ms-swift and TRL divide the
             logits by the sampling temperature)
  advantage  A_i = (r_i - mean(r)) / (std(r) + eps)      (the paper's Eq. 5; std with Bessel's
             correction and eps = 1e-4, as TRL/ms-swift compute it)
  ratio      rho_t = exp(logp_t - logp_old_t)             (per completion token)
  policy     -min(rho_t A_i, clip(rho_t, 1 - c, 1 + c) A_i)   (Eq. 4, c = 0.2)
  KL         exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (the k3 estimator of KL(pi || pi_ref))
  loss       mean over completions of (sum_t mask * (policy + beta * KL) / sum_t mask)
A group whose rewards are all equal has A = 0: it contributes no policy gradient, only the KL
term's (the paper's reason RL ignores easy and hard prompts).

logp_old: with one optimizer step per batch of rollouts (num_iterations mu = 1, the paper's) it is
the current policy, detached, so the ratio is 1 and the clip never acts; with mu > 1 the rollout
policy's log-probs are stored with the rollouts and reused for mu steps, and the clip is real.

The loss tokens (`loss_tokens`) are what ms-swift re-encodes a completion into: the answer and one
<|im_end|>, which replaces the sampled end token or, for a completion cut at max_new_tokens, is
appended to it.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


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


def sequence_terms(logp, old_logp, ref_logp, advantages, mask, *, beta: float = 0.04, clip_eps: float = 0.2):
  """Per completion [R]: (token-mean of policy + beta * KL, token-mean KL, clipped tokens, tokens)."""
  mask = mask.astype(jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  a = advantages[:, None]
  policy = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a)
  kl = kl_k3(logp, ref_logp)
  tokens = mask.sum(axis=1)
  denom = jnp.maximum(tokens, 1.0)
  per_seq = ((policy + beta * kl) * mask).sum(axis=1) / denom
  kl_seq = (kl * mask).sum(axis=1) / denom
  clipped = (((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)) * mask).sum(axis=1)
  return per_seq, kl_seq, clipped, tokens


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta: float = 0.04, clip_eps: float = 0.2):
  """logp, old_logp, ref_logp, mask [R, T]; advantages [R] -> (loss, metrics).

  R = B*G completions. old_logp is the sampling policy's (with one update per batch of rollouts it
  is the current policy, detached: the ratio is 1 but its gradient is not 0).
  """
  per_seq, kl_seq, clipped, tokens = sequence_terms(logp, old_logp, ref_logp, advantages, mask, beta=beta,
                                                    clip_eps=clip_eps)
  metrics = {"kl": kl_seq.mean(), "clip_fraction": clipped.sum() / jnp.maximum(tokens.sum(), 1.0)}
  return per_seq.mean(), metrics


ROLLOUT_KEYS = ("completions", "completion_mask", "rewards", "old_logprobs", "keep", "truncated")


def loss_tokens(tokens, lengths, eos_ids, im_end_id: int, pad_id: int = 0):
  """Sampled tokens [b, G, T] and lengths [b, G] (up to and including an end token) -> the loss's
  completions and mask, [b, G, T + 1]: the answer followed by <|im_end|>, which replaces the end
  token a completion stopped on (Qwen2.5-VL also stops on <|endoftext|>) and is appended to one
  that reached T tokens without stopping, as ms-swift's re-encoding of a completion does."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  b, G, T = tokens.shape
  out = np.full((b, G, T + 1), pad_id, np.int32)
  out[..., :T] = tokens
  last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], axis=-1)[..., 0]
  ended = (lengths > 0) & np.isin(last, np.asarray(list(eos_ids) or [-1]))
  n = np.where(ended, lengths, lengths + 1)          # tokens in the loss, <|im_end|> included
  np.put_along_axis(out, (n - 1)[..., None], np.int32(im_end_id), axis=-1)
  mask = (np.arange(T + 1)[None, None, :] < n[..., None]).astype(np.int32)
  return out, mask


def paper_algorithm(beta: float = 0.04, clip_eps: float = 0.2):
  """The paper's GRPO as the registry's parts (train/rl.py), with its two knobs."""
  from dcsft_jax.train import rl
  return rl.configured("grpo", beta=beta, clip_eps=clip_eps)


def truncated(tokens, lengths, eos_ids) -> np.ndarray:
  """[b, G] whether each completion was cut at the token budget (T tokens, the last no end token)."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], axis=-1)[..., 0]
  return (lengths >= tokens.shape[-1]) & ~np.isin(last, np.asarray(list(eos_ids) or [-1]))


@functools.lru_cache(maxsize=None)
def make_loss(algo=None, *, beta: float = 0.04, clip_eps: float = 0.2, temperature: float = 1.0):
  """The policy-gradient loss of `algo` (a train/rl.py Algorithm; None = the paper's GRPO with `beta` and
  `clip_eps`) in the train step's form: loss(model, params, micro_batch, rng[, ref_params]).

  micro_batch: a generation batch of b prompts (input_ids, positions, attention_mask, lengths,
  rope_deltas, valid, image arrays) plus completions [b, G, T], completion_mask [b, G, T] (the loss
  tokens, `loss_tokens`), rewards [b, G] and, when the rollouts serve several steps, old_logprobs
  [b, G, T] (the rollout policy's). Log-probs are taken at `temperature`, the rollouts'. Returns the
  summed loss over the valid prompts' completions, {"count": what the algorithm's aggregation divides
  it by, "completions"} and per-completion sums ("kl", "clip_low", "clip_high", "clip_fraction",
  "reward", "reward_std" (its group's), "zero_advantage", "entropy" (the token mean of the policy's
  next-token entropy), "completion_tokens", "truncated").

  The reference policy: `ref_params` when given (full fine-tuning keeps a frozen copy of the
  starting weights); otherwise the same params with the adapters switched off (LoRA: the base
  model is the cold-start model, so no second copy is kept). Both are outside the gradient.
  """
  import dataclasses

  import jax

  from dcsft_jax.models import registry
  from dcsft_jax.train import rl
  algo = paper_algorithm(beta, clip_eps) if algo is None else algo

  def loss(model, params, mb, rng, ref_params=None):
    prompt = {k: v for k, v in mb.items() if k not in ROLLOUT_KEYS}
    comp, mask, rewards = mb["completions"], mb["completion_mask"], mb["rewards"]
    b, G, T = comp.shape
    logp, entropy = completion_logprobs(model, params, prompt, comp, rngs={"dropout": rng}, temperature=temperature,
                                        with_entropy=True)
    if ref_params is None:
      if model.opts.lora is None:
        raise ValueError("GRPO with full fine-tuning needs the reference params (a frozen copy)")
      ref_params = params           # read without the adapters below
    ref_model = registry.of(model.cfg).model(model.cfg, dataclasses.replace(model.opts, lora=None, deterministic=True))
    ref_logp = jax.lax.stop_gradient(completion_logprobs(ref_model, jax.lax.stop_gradient(ref_params), prompt,
                                                         comp, temperature=temperature))
    adv = rl.advantages(algo.advantage, rewards).reshape(b * G)
    if "old_logprobs" in mb:       # rollouts reused for num_iterations > 1 steps: their policy's
      old = mb["old_logprobs"].reshape(b * G, T).astype(jnp.float32)
    else:                          # one update per batch of rollouts: the current policy, detached
      old = jax.lax.stop_gradient(logp)
    row = jnp.repeat(prompt["valid"].astype(jnp.float32), G)
    # DAPO's dynamic sampling: groups whose rewards are all equal leave the loss ("keep" 0).
    trained = row * jnp.repeat(mb["keep"].astype(jnp.float32), G) if "keep" in mb else row
    m = mask.reshape(b * G, T)
    # 'constant' (Dr. GRPO) divides by the sampling budget, max_new_tokens (ms-swift's
    # max_completion_length), not by the loss tokens' width, which has room for the appended <|im_end|>.
    total, count, figures = rl.objective(algo, logp, old, ref_logp, adv, m, trained, width=T - 1)
    if "keep" in mb:               # the figures stay per completion of the valid prompts
      figures = {k: v * jnp.sum(row) / jnp.maximum(jnp.sum(trained), 1.0) for k, v in figures.items()}
    r = rewards.astype(jnp.float32)
    zero = jnp.repeat(jnp.all(r == r[:, :1], axis=1).astype(jnp.float32), G)   # groups with A = 0
    # Each completion carries its group's reward std (Bessel's, as the advantage's): summed over the
    # completions and divided by their number, the mean std over groups (TRL's reward_std).
    std = jnp.repeat(jnp.sqrt(jnp.sum((r - r.mean(axis=1, keepdims=True)) ** 2, axis=1) / max(G - 1, 1)), G)
    mf = m.astype(jnp.float32)
    token_entropy = (entropy * mf).sum(axis=1) / jnp.maximum(mf.sum(axis=1), 1.0)   # a completion's token mean
    # The loss is divided by its aggregation's count; the figures are per completion.
    return total, {
        "count": count, "completions": jnp.sum(row), **figures,
        "reward": jnp.sum(r.reshape(-1) * row), "reward_std": jnp.sum(std * row),
        "zero_advantage": jnp.sum(zero * row), "entropy": jnp.sum(token_entropy * row),
        "completion_tokens": jnp.sum(m.astype(jnp.float32).sum(axis=1) * row),
        **({"truncated": jnp.sum(mb["truncated"].astype(jnp.float32).reshape(-1) * row)} if "truncated" in mb else {})}

  return loss


def completion_logprobs(model, params, prompt: dict, completions, *, rngs=None, temperature: float = 1.0,
                        with_entropy: bool = False):
  """log p(completion token | prompt, earlier tokens) [B*G, T] under `model` with its logits divided
  by `temperature` (the rollouts'), differentiable. with_entropy: also the entropy of each position's
  next-token distribution [B*G, T] (a figure, outside the gradient), -sum_v p log p.

  prompt: a generation batch (input_ids, positions, attention_mask, lengths, rope_deltas and the
  image arrays) of B prompts; completions [B, G, T]. As in the sampler, the prompt (and its image)
  runs once per group and the G completions attend to its KV cache in place, so a GRPO step costs
  one prompt forward + G completion forwards, not G prompt forwards.
  """
  import jax

  from dcsft_jax.models import attention as attn_lib
  from dcsft_jax.models import registry
  family = registry.of(model.cfg)
  B, L = prompt["input_ids"].shape
  _, G, T = completions.shape
  dtype = model.opts.dtype
  valid = prompt["attention_mask"].astype(bool)
  lengths = prompt["lengths"]
  images = family.images(prompt)
  comp = completions.reshape(B * G, T)

  def run(m):
    h, visual = m.embed_inputs(prompt["input_ids"], images)
    zeros = lambda rows, n: family.init_cache(model.cfg, rows, n, dtype)
    mask = attn_lib.RightPadding(lengths.astype(jnp.int32))        # causal over each row's real tokens
    hp, prefix = m.decode(h, prompt["positions"], mask=mask, cache=zeros(B, L), cache_index=0, visual=visual)
    last = jnp.take_along_axis(hp, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)     # [B, 1, D]
    temp = jnp.float32(temperature)
    first_all = jax.nn.log_softmax(m.logits(last)[:, 0].astype(jnp.float32) / temp, axis=-1)    # [B, V]
    first = jnp.take_along_axis(jnp.repeat(first_all, G, axis=0), comp[:, :1], axis=1)           # [B*G, 1]
    start = jnp.repeat(lengths + prompt["rope_deltas"], G)
    pos = family.decode_positions(start, jnp.arange(T))
    own = jnp.tril(jnp.ones((T, T), bool))[None]
    hc, _ = m.decode(m.embed_inputs(comp)[0], pos, mask=(valid, own), cache=zeros(B * G, T), cache_index=0,
                     prefix=prefix)
    rest_all = jax.nn.log_softmax(m.logits(hc[:, :-1]).astype(jnp.float32) / temp, axis=-1)
    rest = jnp.take_along_axis(rest_all, comp[:, 1:, None], axis=-1)[..., 0]
    logp = jnp.concatenate([first, rest], axis=1)
    if not with_entropy:
      return logp
    ent = lambda lp: -jnp.sum(jnp.exp(lp) * lp, axis=-1)
    lp = jax.lax.stop_gradient
    entropy = jnp.concatenate([jnp.repeat(ent(lp(first_all)), G)[:, None], ent(lp(rest_all))], axis=1)
    return logp, entropy

  return model.apply({"params": params}, method=run, rngs=rngs)
