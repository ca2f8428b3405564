"""Rotary position embeddings of Qwen2.5-VL.

Host side (NumPy, before jit): the 3-axis M-RoPE position ids exactly as transformers'
`get_rope_index` computes them, and the per-patch layout of the vision tower (2-D positions,
frame and window segments). Device side (jnp, inside jit): cos/sin tables and their application.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dcsft_jax.models.config import Qwen25VLConfig, VisionConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


# ----------------------------------------------------------------------------- host side
def mm_token_types(input_ids: np.ndarray, cfg: Qwen25VLConfig) -> np.ndarray:
  """0 = text, 1 = <|image_pad|>, 2 = <|video_pad|>; vision start/end tokens count as text."""
  ids = np.asarray(input_ids)
  return np.where(ids == cfg.image_token_id, IMAGE, np.where(ids == cfg.video_token_id, VIDEO, TEXT)).astype(np.int32)


def get_rope_index(input_ids: np.ndarray, cfg: Qwen25VLConfig, *, image_grid_thw=None, attention_mask=None,
                   video_grid_thw=None, second_per_grid_ts=None, mm_token_type_ids=None):
  """Returns (positions int32 [3, B, L], rope_deltas int32 [B]) as transformers 5.23 does.

  Padded positions stay 0. A row's text resumes after an image at start + max(h', w'), and its
  rope delta is max(position) + 1 - (number of unmasked tokens); decoding token c then sits at
  c + delta on all three axes.
  """
  input_ids = np.asarray(input_ids)
  B, L = input_ids.shape
  types = mm_token_types(input_ids, cfg) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
  mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  m = cfg.vision.spatial_merge_size
  grids = {IMAGE: iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist()),
           VIDEO: iter([] if video_grid_thw is None else np.asarray(video_grid_thw).tolist())}
  seconds = iter([1.0] * (10 ** 6) if second_per_grid_ts is None else np.asarray(second_per_grid_ts).tolist())
  positions = np.zeros((3, B, L), np.int64)
  deltas = np.zeros((B,), np.int64)
  for b in range(B):
    row_types = types[b][mask[b]]
    pieces, cur = [], 0
    for kind, group in itertools.groupby(row_types.tolist()):
      n = len(list(group))
      if kind == TEXT:
        pieces.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
        cur += n
        continue
      try:
        t, h, w = next(grids[kind])
      except StopIteration:
        raise ValueError(f"row {b} has more {'image' if kind == IMAGE else 'video'} placeholder runs than grids") from None
      gt, gh, gw = t, h // m, w // m
      if gt * gh * gw != n:
        raise ValueError(f"row {b}: a run of {n} placeholder tokens does not match grid {(t, h, w)} "
                         f"({gt * gh * gw} merged tokens)")
      interval = cfg.vision.tokens_per_second * next(seconds) if kind == VIDEO else 1
      tt = (np.arange(gt) * interval).astype(np.int64)
      T, H, W = np.meshgrid(tt, np.arange(gh) + cur, np.arange(gw) + cur, indexing="ij")
      pos = np.stack([T, H, W]).reshape(3, -1)
      pos[0] += cur
      pieces.append(pos)
      cur += max(h, w) // m
    if not pieces:
      continue
    row = np.concatenate(pieces, axis=1)
    positions[:, b, mask[b]] = row
    deltas[b] = row.max() + 1 - row.shape[1]
  return positions.astype(np.int32), deltas.astype(np.int32)


def vision_layout(grid_thw: Sequence[Sequence[int]], vcfg: VisionConfig, num_patches: int | None = None):
  """Per-patch layout of a set of images, each padded to `num_patches` patches.

  Returns a dict of arrays shaped [num_images, num_patches(, 2)]:
    pos_hw:     the patch's (row, col) in its frame, in the processor's merge-block-major order;
    frame_seg:  frame index (full-attention blocks attend within a frame); -1 on padding;
    window_seg: frame and window index (windowed blocks attend within a window); -1 on padding.
  Masking by segment equals transformers' window permutation (QWEN25VL.md §3.4, option B) and
  keeps every shape static.
  """
  m, ws = vcfg.spatial_merge_size, vcfg.window_merged
  sizes = [int(t) * int(h) * int(w) for t, h, w in grid_thw]
  P = max(sizes, default=0) if num_patches is None else num_patches
  if sizes and max(sizes) > P:
    raise ValueError(f"an image has {max(sizes)} patches, more than the padded size {P}")
  n = len(sizes)
  pos_hw = np.zeros((n, P, 2), np.int32)
  frame_seg = np.full((n, P), -1, np.int32)
  window_seg = np.full((n, P), -1, np.int32)
  for i, (t, h, w) in enumerate(grid_thw):
    t, h, w = int(t), int(h), int(w)
    if h % m or w % m:
      raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # merge-block-major: 2x2 blocks row-major, then the 4 patches of a block row-major.
    order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    hp, wp = order(hh), order(ww)
    nw = -(-(w // m) // ws)
    win = (hp // m // ws) * nw + (wp // m // ws)
    nwin = (-(-(h // m) // ws)) * nw
    k = t * h * w
    pos_hw[i, :k, 0] = np.tile(hp, t)
    pos_hw[i, :k, 1] = np.tile(wp, t)
    frames = np.repeat(np.arange(t), h * w)
    frame_seg[i, :k] = frames
    window_seg[i, :k] = frames * nwin + np.tile(win, t)
  return {"pos_hw": pos_hw, "frame_seg": frame_seg, "window_seg": window_seg}


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


def mrope_cos_sin(positions, head_dim: int, theta: float, mrope_section: Sequence[int], dtype):
  """positions [3, B, L] -> cos, sin [B, L, head_dim], cast to the activation dtype as HF does."""
  inv = jnp.asarray(_inv_freq(head_dim, theta))                        # [hd/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv                # [3, B, L, hd/2]
  bounds = np.cumsum([0, *mrope_section])                              # contiguous [T | H | W] chunks
  freqs = jnp.concatenate([freqs[a, ..., bounds[a]:bounds[a + 1]] for a in range(3)], axis=-1)
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
