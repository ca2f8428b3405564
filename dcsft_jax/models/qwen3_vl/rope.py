"""Qwen3-VL's position ids and vision layout (host side, NumPy, before jit).

The 3-axis M-RoPE position ids exactly as transformers' `Qwen3VLModel.get_rope_index` computes them
(QWEN3VL.md §4.4), and the per-patch layout of the vision tower: 2-D rotary positions, frame
segments, and the taps of the learned position embedding's bilinear resampling (§3.2), so that the
device only gathers.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from dcsft_jax.models.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from dcsft_jax.models.rope import (apply_rope, merge_block_order, mrope_cos_sin, rotate_half,  # noqa: F401
                                   split_packed_pixels, vision_cos_sin)

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_types(input_ids: np.ndarray, cfg: Qwen3VLConfig) -> np.ndarray:
  """0 = text, 1 = <|image_pad|>, 2 = <|video_pad|>; vision start/end (and timestamps) count as text."""
  ids = np.asarray(input_ids)
  return np.where(ids == cfg.image_token_id, IMAGE, np.where(ids == cfg.video_token_id, VIDEO, TEXT)).astype(np.int32)


def get_rope_index(input_ids: np.ndarray, cfg: Qwen3VLConfig, *, image_grid_thw=None, attention_mask=None,
                   video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None):
  """Returns (positions int32 [3, B, L], rope_deltas int32 [B]) as transformers 5.25 does.

  Video grids are split into t single-frame grids (each frame is its own <|vision_start|> group, with a
  timestamp as text), so a vision run's T row is its start `cur` (plus t_idx for a multi-frame run).
  Text resumes after a run at cur + max(h', w'). Padded positions stay 0; the rope delta is
  max(position) + 1 - (number of unmasked tokens). `second_per_grid_ts` is accepted and unused (time is
  text in Qwen3-VL).
  """
  del second_per_grid_ts
  input_ids = np.asarray(input_ids)
  B, L = input_ids.shape
  types = mm_token_types(input_ids, cfg) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
  mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  m = cfg.vision.spatial_merge_size
  videos = [] if video_grid_thw is None else [(1, h, w) for t, h, w in np.asarray(video_grid_thw).tolist()
                                               for _ in range(t)]
  grids = {IMAGE: iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist()), VIDEO: iter(videos)}
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
        t, h, w = (int(x) for x in next(grids[kind]))
      except StopIteration:
        raise ValueError(f"row {b} has more {'image' if kind == IMAGE else 'video frame'} placeholder runs "
                         f"than grids") from None
      gh, gw = h // m, w // m
      if t * gh * gw != n:
        raise ValueError(f"row {b}: a run of {n} placeholder tokens does not match grid {(t, h, w)} "
                         f"({t * gh * gw} merged tokens)")
      T, H, W = np.meshgrid(np.arange(t) + cur, np.arange(gh) + cur, np.arange(gw) + cur, indexing="ij")
      pieces.append(np.stack([T, H, W]).reshape(3, -1))
      cur += max(gh, gw)
    if not pieces:
      continue
    row = np.concatenate(pieces, axis=1)
    positions[:, b, mask[b]] = row
    deltas[b] = row.max() + 1 - row.shape[1]
  return positions.astype(np.int32), deltas.astype(np.int32)


def _axis_taps(index: np.ndarray, size: int, side: int):
  """Bilinear taps (2 per target) into a `side`-long table for targets 0..size-1, align_corners=True,
  in float32 exactly as transformers' `_interpolation_axis_taps_weights` (vision_utils.py)."""
  idx = index.astype(np.float32)
  src = (idx * np.float32(side - 1)) / np.float32(max(size - 1, 1))
  floor = np.floor(src)
  offsets = np.arange(2)
  taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
  distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
  return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)


def pos_embed_taps(rows: np.ndarray, cols: np.ndarray, h: int, w: int, side: int):
  """(index int32 [n, 4], weight float32 [n, 4]) of the learned S x S position grid resampled to an h x w
  patch grid at the given patches (transformers' get_vision_interpolation_indices_and_weights)."""
  ht, hw = _axis_taps(rows, h, side)
  wt, ww = _axis_taps(cols, w, side)
  index = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
  weight = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
  return index.astype(np.int32), weight.astype(np.float32)


def vision_layout(grid_thw: Sequence[Sequence[int] | None], vcfg: VisionConfig, num_patches: int | None = None):
  """Per-patch layout of a set of images, each padded to `num_patches` patches (None: no image, all padding).

  Returns a dict of arrays shaped [num_images, num_patches, ...]:
    pos_hw:     int32 [.., 2] the patch's (row, col) in its frame, in the processor's merge-block-major
                order (the 2-D rotary's positions); 0 on padding;
    frame_seg:  int32 frame index (attention stays inside a frame); -1 on padding;
    pe_index:   int32 [.., 4] rows of the learned position table, bilinear taps (align_corners=True);
                0 on padding;
    pe_weight:  float32 [.., 4] their weights; 0 on padding.
  Every frame of a video repeats its frame's layout.
  """
  m, side = vcfg.spatial_merge_size, vcfg.num_grid_per_side
  sizes = [0 if g is None else int(g[0]) * int(g[1]) * int(g[2]) for g in grid_thw]
  P = max(sizes, default=0) if num_patches is None else num_patches
  if sizes and max(sizes) > P:
    raise ValueError(f"an image has {max(sizes)} patches, more than the padded size {P}")
  n = len(sizes)
  pos_hw = np.zeros((n, P, 2), np.int32)
  frame_seg = np.full((n, P), -1, np.int32)
  pe_index = np.zeros((n, P, 4), np.int32)
  pe_weight = np.zeros((n, P, 4), np.float32)
  for i, g in enumerate(grid_thw):
    if g is None or sizes[i] == 0:
      continue
    t, h, w = (int(x) for x in g)
    hp, wp = merge_block_order(h, w, m)
    index, weight = pos_embed_taps(hp, wp, h, w, side)
    k = t * h * w
    pos_hw[i, :k, 0] = np.tile(hp, t)
    pos_hw[i, :k, 1] = np.tile(wp, t)
    frame_seg[i, :k] = np.repeat(np.arange(t), h * w)
    pe_index[i, :k] = np.tile(index, (t, 1))
    pe_weight[i, :k] = np.tile(weight, (t, 1))
  return {"pos_hw": pos_hw, "frame_seg": frame_seg, "pe_index": pe_index, "pe_weight": pe_weight}
