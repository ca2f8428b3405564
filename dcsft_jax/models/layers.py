"""The family-free pieces of every model: options, the LoRA-capable linear layer, norms.

A family's Flax module (models/<family>/model.py) is built from these; nothing here knows a family.
Kernels are [in, out] (a transformers weight transposed); every parameter carries logical axis names
(dcsft_jax.mesh holds the rules).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Low-rank adapters on the linear layers (ms-swift's all-linear with r32/alpha64 by default)."""
  rank: int = 32
  alpha: float = 64.0
  dropout: float = 0.05
  language: bool = True   # the decoder's attention and MLP projections
  vision: bool = False    # the ViT blocks' linear layers
  merger: bool = False    # the aligner (patch merger MLPs)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  dtype: Dtype = jnp.float32          # compute dtype
  param_dtype: Dtype = jnp.float32    # master weights
  attention: str = "auto"             # auto | xla | cudnn (models/attention.py)
  remat: bool = False                 # recompute each layer in the backward pass
  lora: LoraSpec | None = None
  deterministic: bool = True          # False enables LoRA dropout (needs a 'dropout' rng)
  platform: str = ""                  # the devices' platform the program is compiled for ('' = default backend)

  def lora_for(self, part: str) -> LoraSpec | None:
    """The adapters of one part ('language', 'vision' or 'merger'), or None."""
    return self.lora if (self.lora is not None and getattr(self.lora, part)) else None


def normal_init(scale=0.02):
  return nn.initializers.normal(stddev=scale)


# PEFT initialises LoRA's A as torch's nn.Linear does, kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3),
# bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in). variance_scaling(1/3, fan_in, uniform) has the
# same bound, sqrt(3 * (1/3) / fan_in).
LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class RMSNorm(nn.Module):
  """w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(in_dtype): the cast comes before the scale."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(x.dtype)


class LayerNorm(nn.Module):
  """torch's nn.LayerNorm (weight and bias), statistics in fp32, the result in the compute dtype."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    D = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (D,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (D,), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class Linear(nn.Module):
  """y = x @ W (+ b) (+ dropout(x) @ A @ B * alpha/r). Kernels are [in, out] (HF weight transposed)."""
  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraSpec | None = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(normal_init(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora is not None:
      r = self.lora.rank
      # PEFT's init of A: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B = 0.
      a = self.param("lora_a", nn.with_logical_partitioning(LORA_A_INIT, (self.axes[0], "lora_rank")),
          (x.shape[-1], r), self.param_dtype)
      b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                     (r, self.features), self.param_dtype)
      h = nn.Dropout(self.lora.dropout, deterministic=self.deterministic)(x)
      y = y + jnp.dot(jnp.dot(h, a.astype(self.dtype)), b.astype(self.dtype)) * jnp.asarray(self.lora.scale, self.dtype)
    return y


def linear_factory(opts: ModelOptions, part: str, *, use_bias: bool):
  """lin(name, features, axes) -> a Linear with the options' dtypes and the part's adapters."""
  lora = opts.lora_for(part)
  return lambda name, features, axes: Linear(features, axes, use_bias=use_bias, dtype=opts.dtype,
                                             param_dtype=opts.param_dtype, lora=lora,
                                             deterministic=opts.deterministic, name=name)


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
