"""Qwen2.5-VL's position ids and vision layout (host side, NumPy, before jit).

The 3-axis M-RoPE position ids exactly as transformers' `get_rope_index` computes them, and the
per-patch layout of the vision tower (2-D positions, frame and window segments).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from dcsft_jax.models.rope import (apply_rope, merge_block_order, mrope_cos_sin, rotate_half,  # noqa: F401
                                   split_packed_pixels, vision_cos_sin)

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


# ----------------------------------------------------------------------------- window blocks
# The windowed vision blocks attend within each window (window_merged^2 merged tokens: 64 patches in the
# released models). With P patches per image they attend as [windows, 64, 64] blocks (model.py), not as
# a masked P x P, when that is less work: a window's patches gather into a block of `window_block`
# slots (a partial window's empty slots are masked), for up to `window_count(P)` windows per image.
def window_block(vcfg: VisionConfig) -> int:
  """Patches in one full window (64 for the released models)."""
  return vcfg.window_merged ** 2 * vcfg.merge_unit


def window_count(num_patches: int, vcfg: VisionConfig) -> int:
  """Window blocks per image of `num_patches` patches: those of a square image of that size plus a row
  of them, n (n + 1) for n windows a side. Images up to about 1:4 fit (a 9 x 36 merged grid at 1,296
  patches); a thinner one takes a larger bucket (`patch_room`)."""
  side = int(np.ceil(np.sqrt(num_patches / vcfg.merge_unit)))
  n = -(-side // vcfg.window_merged)
  return n * (n + 1)


def use_window_blocks(num_patches: int, vcfg: VisionConfig) -> bool:
  """Whether images of `num_patches` patches attend by window blocks (less work than the masked P x P)."""
  slots = window_count(num_patches, vcfg) * window_block(vcfg)
  return slots * window_block(vcfg) < num_patches * num_patches


def windows_of(grid: Sequence[int], vcfg: VisionConfig) -> int:
  t, h, w = (int(x) for x in grid)
  m, ws = vcfg.spatial_merge_size, vcfg.window_merged
  return t * (-(-(h // m) // ws)) * (-(-(w // m) // ws))


def patch_room(grid: Sequence[int], vcfg: VisionConfig) -> int:
  """The patches an image of `grid` needs in a batch: its own, or more when its windows outnumber
  window_count at that size (a thin image), so that every bucket it can go to holds its windows
  (window_count grows with the size, and a larger bucket may attend by window blocks where the
  image's own size would not)."""
  t, h, w = (int(x) for x in grid)
  need, room = windows_of(grid, vcfg), t * h * w
  while window_count(room, vcfg) < need:
    room += vcfg.merge_unit
  return room


def vision_layout(grid_thw: Sequence[Sequence[int] | None], vcfg: VisionConfig, num_patches: int | None = None):
  """Per-patch layout of a set of images, each padded to `num_patches` patches (None: no image, all padding).

  Returns a dict of arrays shaped [num_images, num_patches(, 2)]:
    pos_hw:     the patch's (row, col) in its frame, in the processor's merge-block-major order;
    frame_seg:  frame index (full-attention blocks attend within a frame); -1 on padding;
    window_seg: frame and window index (windowed blocks attend within a window); -1 on padding.
  Masking by segment equals transformers' window permutation (QWEN25VL.md §3.4, option B) and
  keeps every shape static.
  """
  m, ws = vcfg.spatial_merge_size, vcfg.window_merged
  sizes = [0 if g is None else int(g[0]) * int(g[1]) * int(g[2]) for g in grid_thw]
  P = max(sizes, default=0) if num_patches is None else num_patches
  if sizes and max(sizes) > P:
    raise ValueError(f"an image has {max(sizes)} patches, more than the padded size {P}")
  if use_window_blocks(P, vcfg):
    for g in grid_thw:
      if g is not None and windows_of(g, vcfg) > window_count(P, vcfg):
        raise ValueError(f"an image of grid {tuple(g)} has {windows_of(g, vcfg)} attention windows, more than the "
                         f"{window_count(P, vcfg)} a batch of {P} patches holds; give it a bucket of at least "
                         f"{patch_room(g, vcfg)} patches (batching.auto_buckets does)")
  n = len(sizes)
  pos_hw = np.zeros((n, P, 2), np.int32)
  frame_seg = np.full((n, P), -1, np.int32)
  window_seg = np.full((n, P), -1, np.int32)
  for i, g in enumerate(grid_thw):
    if g is None:
      continue
    t, h, w = (int(x) for x in g)
    hp, wp = merge_block_order(h, w, m)
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


