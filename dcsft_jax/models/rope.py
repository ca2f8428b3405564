"""Rotary position embeddings and the image-patch layout, whatever the family.

Host side (NumPy, before jit): the merge-block order of an image's patches, the unpacking of
transformers' packed `pixel_values`. Device side (jnp, inside jit): cos/sin tables (M-RoPE with
contiguous or interleaved sections, the 2-D vision rotary) and their application. A family's own
position ids (`get_rope_index`) live in its package.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- host side
def merge_block_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows, cols) of an h x w patch grid in the processor's merge-block-major order: m x m blocks
  row-major, then the patches of a block row-major (the order of the pixel_values rows)."""
  if h % m or w % m:
    raise ValueError(f"grid {(h, w)} is not divisible by spatial_merge_size {m}")
  hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
  return order(hh), order(ww)


def split_packed_pixels(pixel_values: np.ndarray, grid_thw, num_patches: int | None = None) -> np.ndarray:
  """transformers' packed `pixel_values` [sum(t*h*w), D] -> ours [num_images, num_patches, D]."""
  sizes = [int(t) * int(h) * int(w) for t, h, w in grid_thw]
  P = max(sizes) if num_patches is None else num_patches
  out = np.zeros((len(sizes), P, pixel_values.shape[-1]), pixel_values.dtype)
  off = 0
  for i, s in enumerate(sizes):
    out[i, :s] = pixel_values[off:off + s]
    off += s
  if off != pixel_values.shape[0]:
    raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw accounts for {off}")
  return out


# ----------------------------------------------------------------------------- device side
def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _inv_freq(dim: int, theta: float) -> np.ndarray:
  # Computed the way torch does (float32 exponent, float32 power) to keep angles bit-close.
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


def mrope_axes(head_dim: int, mrope_section: Sequence[int], interleaved: bool) -> np.ndarray:
  """Which position axis (0 T, 1 H, 2 W) drives each of the head_dim/2 frequencies.

  Contiguous (Qwen2.5-VL): [T]*s_T + [H]*s_H + [W]*s_W. Interleaved (Qwen3-VL): T,H,W,T,H,W,... with
  H at i % 3 == 1 for i < 3 s_H, W at i % 3 == 2 for i < 3 s_W, T everywhere else (s_T is not read)."""
  n = head_dim // 2
  if not interleaved:
    return np.repeat(np.arange(3), np.asarray(mrope_section))
  axes = np.zeros(n, np.int64)
  axes[1:3 * mrope_section[1]:3] = 1
  axes[2:3 * mrope_section[2]:3] = 2
  return axes


def mrope_cos_sin(positions, head_dim: int, theta: float, mrope_section: Sequence[int], dtype,
                  interleaved: bool = False):
  """positions [3, B, L] -> cos, sin [B, L, head_dim], cast to the activation dtype as HF does."""
  inv = jnp.asarray(_inv_freq(head_dim, theta))                        # [hd/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv                # [3, B, L, hd/2]
  axes = mrope_axes(head_dim, mrope_section, interleaved)
  if not interleaved:                                                  # contiguous [T | H | W] chunks
    bounds = np.cumsum([0, *mrope_section])
    freqs = jnp.concatenate([freqs[a, ..., bounds[a]:bounds[a + 1]] for a in range(3)], axis=-1)
  else:
    freqs = jnp.where(axes == 1, freqs[1], jnp.where(axes == 2, freqs[2], freqs[0]))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(pos_hw, head_dim: int, theta: float):
  """pos_hw [..., 2] -> cos, sin [..., head_dim] in float32: [h-freqs | w-freqs] twice."""
  inv = jnp.asarray(_inv_freq(head_dim // 2, theta))                  # [hd/4]
  f = pos_hw.astype(jnp.float32)[..., None] * inv                       # [..., 2, hd/4]
  f = jnp.concatenate([f[..., 0, :], f[..., 1, :]], axis=-1)            # [..., hd/2]
  emb = jnp.concatenate([f, f], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [..., L, heads, hd]; cos/sin broadcast over heads."""
  return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]
