"""The optimizer every trainer shares: AdamW with warmup then decay, clipping by global norm, and
a mask that keeps frozen parameters out of the optimizer state (LoRA, freeze_vit, freeze_aligner).

Trainable and frozen parameters are split into two trees before differentiation, so frozen weights
get no gradient buffers and no Adam moments: with LoRA the optimizer state is the adapters' only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")
MOMENTS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-5
  warmup_ratio: float = 0.1
  schedule: str = "cosine"         # ms-swift's default; 'linear' is transformers' Trainer default
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95                 # ms-swift's default adam_beta2 (transformers' own is 0.999)
  eps: float = 1e-8
  max_grad_norm: float = 1.0
  total_steps: int = 100
  min_lr_ratio: float = 0.0
  moments: str = "float32"         # Adam's moments as stored between steps (scale_by_adam_low_precision)

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
    if self.total_steps < 1:
      raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
    if not 0 <= self.warmup_ratio < 1:
      raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
    if self.moments not in MOMENTS:
      raise ValueError(f"moments {self.moments!r} is not one of {MOMENTS}")


def warmup_steps(c: OptimConfig) -> int:
  """transformers' TrainingArguments.get_warmup_steps: ceil(ratio * steps) (3 of 25, not round's 2)."""
  return math.ceil(c.warmup_ratio * c.total_steps)


def schedule(c: OptimConfig) -> optax.Schedule:
  warm = warmup_steps(c)
  decay = max(c.total_steps - warm, 1)
  end = c.learning_rate * c.min_lr_ratio
  if c.schedule == "cosine":
    after = optax.cosine_decay_schedule(c.learning_rate, decay, alpha=c.min_lr_ratio)
  elif c.schedule == "linear":
    after = optax.linear_schedule(c.learning_rate, end, decay)
  else:
    after = optax.constant_schedule(c.learning_rate)
  if not warm:
    return after
  # transformers' warmup: lr * step / warmup for step < warmup (step 0 trains at lr 0).
  return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warm), after], [warm])


def decayed(path) -> bool:
  """Whether a parameter gets weight decay, by transformers' Trainer rule in the versions ms-swift
  3.6 runs on (<4.53, get_decay_parameter_names): every parameter except biases and those whose
  name contains 'layernorm' or 'rmsnorm'. So the LLM's input/post-attention norms are exempt, while
  the final `norm`, the ViT's norm1/norm2 and the merger's ln_q are decayed. Layers are stacked, so
  a bias is 2-D here: the rule goes by name, not by rank."""
  names = [str(getattr(p, "key", p)).lower() for p in path]
  return names[-1] != "bias" and not any("layernorm" in n or "rmsnorm" in n for n in names)


def decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, x: None if x is None else decayed(path), params,
                                          is_leaf=lambda x: x is None)


def optimizer(c: OptimConfig) -> optax.GradientTransformation:
  clip = optax.clip_by_global_norm(c.max_grad_norm) if c.max_grad_norm > 0 else optax.identity()
  if c.moments == "float32":
    return optax.chain(clip, optax.adamw(schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                                         mask=decay_mask))
  # optax.adamw's own chain, with the moments stored in bfloat16.
  return optax.chain(clip, scale_by_adam_low_precision(c.b1, c.b2, c.eps, jnp.bfloat16),
                     optax.add_decayed_weights(c.weight_decay, decay_mask),
                     optax.scale_by_learning_rate(schedule(c)))


def stochastic_round(x, key, dtype=jnp.bfloat16):
  """float32 x -> bfloat16, rounded up or down with the probabilities that make it unbiased: random
  bits added to the 16 low mantissa bits bfloat16 lacks, then those bits dropped. An increment smaller
  than the stored value's last bit (nu's (1 - b2) g^2 against nu at b2 = 0.999) survives on average
  instead of being rounded away every step."""
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    raise ValueError(f"stochastic rounding is to bfloat16, not {jnp.dtype(dtype).name}")
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
  kept = (bits + noise) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(kept, jnp.float32).astype(dtype)


class LowPrecisionAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam_low_precision(b1: float, b2: float, eps: float, dtype) -> optax.GradientTransformation:
  """Adam's scaling (optax.scale_by_adam's numbers) with both moments stored in `dtype` between steps:
  each step reads them into float32, updates them there (the bias-corrected update is computed in
  float32 from the float32 values), and stores the first moment rounded to nearest (optax's mu_dtype)
  and the second stochastically rounded (`stochastic_round`, its key from the step count and the leaf),
  so no update is lost to bfloat16's 8-bit mantissa. Half the bytes of float32 moments; the loss of
  a short run against float32 moments is in BENCHMARKS.md and tests/test_optim_moments.py."""
  def init(params):
    zeros = lambda p: None if p is None else jnp.zeros(p.shape, dtype)
    is_none = lambda x: x is None
    return LowPrecisionAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params, is_leaf=is_none),
                                 jax.tree.map(zeros, params, is_leaf=is_none))

  def update(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    leaves, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
    mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    key = jax.random.fold_in(jax.random.key(0x5EED), count)
    c1 = 1 - jnp.asarray(b1, jnp.float32) ** count
    c2 = 1 - jnp.asarray(b2, jnp.float32) ** count
    out, new_mu, new_nu = [], [], []
    for i, (g, m, v) in enumerate(zip(leaves, mus, nus)):
      if g is None:
        out.append(None), new_mu.append(None), new_nu.append(None)
        continue
      g32 = g.astype(jnp.float32)
      m32 = b1 * m.astype(jnp.float32) + (1 - b1) * g32
      v32 = b2 * v.astype(jnp.float32) + (1 - b2) * g32 * g32
      out.append(((m32 / c1) / (jnp.sqrt(v32 / c2) + eps)).astype(g.dtype))
      new_mu.append(m32.astype(dtype))
      new_nu.append(stochastic_round(v32, jax.random.fold_in(key, i), dtype))
    return (treedef.unflatten(out),
            LowPrecisionAdamState(count, treedef.unflatten(new_mu), treedef.unflatten(new_nu)))

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------ trainable split
def trainable_mask(params, *, lora: bool, freeze_vit: bool = False, freeze_aligner: bool = False,
                   freeze_llm: bool = False):
  """True for the leaves that train. With LoRA only adapters train (and only where they exist)."""
  def decide(path, _):
    names = [getattr(p, "key", str(p)) for p in path]
    if lora:
      return names[-1] in ("lora_a", "lora_b")
    if names[0] == "visual":
      aligner = names[1] in ("ln_q", "mlp_0", "mlp_2")
      return not (freeze_aligner if aligner else freeze_vit)
    return not freeze_llm
  return jax.tree_util.tree_map_with_path(decide, params)


def split(params, mask):
  """-> (trainable, frozen): two trees of the same structure with None where a leaf is elsewhere."""
  train = jax.tree.map(lambda x, m: x if m else None, params, mask)
  frozen = jax.tree.map(lambda x, m: None if m else x, params, mask)
  return train, frozen


def merge(train, frozen):
  return jax.tree.map(lambda a, b: a if b is None else b, train, frozen, is_leaf=lambda x: x is None)


def global_norm(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if x is not None]
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
