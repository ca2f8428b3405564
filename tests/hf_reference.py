"""The transformers/PyTorch side of the parity tests: fully random tiny models and mixed batches.

Every parameter is re-randomised, biases and norm scales included: transformers' default init
has zero biases and unit norms, which would hide a missing bias or a misplaced norm.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

from dcsft_jax.models.qwen2_5_vl import rope
from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig, tiny_config

# A second tiny config: tied embeddings, deeper ViT with a larger window, MHA-free GQA (KV=1).
def tiny_config_b() -> Qwen25VLConfig:
  return tiny_config(tie_word_embeddings=True, text_layers=2, vision_depth=6, fullatt_block_indexes=(2, 5),
                     window_size=112, hidden_size=64, num_heads=4, num_kv_heads=1, intermediate_size=128,
                     mrope_section=(2, 3, 3), vision_hidden=32, vision_heads=2, vision_intermediate=72)


def hf_config(cfg: Qwen25VLConfig) -> transformers.Qwen2_5_VLConfig:
  return transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())


def random_hf_model(cfg: Qwen25VLConfig, seed: int = 0, dtype=torch.float32):
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
      hf_config(cfg), attn_implementation="eager", torch_dtype=dtype)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name or \
          "layernorm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn_like(p) * (1.5 / np.sqrt(fan_in)))
  return model.eval()


@dataclasses.dataclass
class Batch:
  input_ids: np.ndarray          # [B, L] right-padded
  attention_mask: np.ndarray     # [B, L]
  pixel_values: np.ndarray       # [sum(thw), patch_dim] (transformers' packed layout)
  image_grid_thw: np.ndarray     # [n_images, 3]

  def hf_kwargs(self, cfg: Qwen25VLConfig):
    kw = dict(input_ids=torch.tensor(self.input_ids), attention_mask=torch.tensor(self.attention_mask),
              mm_token_type_ids=torch.tensor(rope.mm_token_types(self.input_ids, cfg)))
    if len(self.image_grid_thw):
      kw.update(pixel_values=torch.tensor(self.pixel_values), image_grid_thw=torch.tensor(self.image_grid_thw))
    return kw

  def ours(self, cfg: Qwen25VLConfig, num_patches: int | None = None, num_images: int | None = None):
    """(input_ids, positions, images, attention_mask) for dcsft_jax, images padded to a bucket."""
    positions, _ = rope.get_rope_index(self.input_ids, cfg, image_grid_thw=self.image_grid_thw,
                                        attention_mask=self.attention_mask)
    images = None
    if len(self.image_grid_thw):
      grids = [tuple(g) for g in self.image_grid_thw.tolist()]
      P = num_patches or max(t * h * w for t, h, w in grids)
      n = num_images or len(grids)
      pv = rope.split_packed_pixels(self.pixel_values, grids, P)
      pv = np.concatenate([pv, np.zeros((n - len(grids),) + pv.shape[1:], pv.dtype)])
      images = {"pixel_values": pv, **rope.vision_layout(grids + [(0, 0, 0)] * (n - len(grids)), cfg.vision, P)}
    return self.input_ids.astype(np.int32), positions, images, self.attention_mask.astype(np.int32)


def make_batch(cfg: Qwen25VLConfig, rows, seed: int = 0) -> Batch:
  """rows: lists of items, each an int (that many random text tokens) or a (t, h, w) image grid."""
  rng = np.random.default_rng(seed)
  n_text = cfg.vision_start_token_id - 1  # ordinary tokens sit below the special ids
  seqs, grids = [], []
  for row in rows:
    ids = []
    for item in row:
      if isinstance(item, int):
        ids += rng.integers(0, n_text, item).tolist()
      else:
        t, h, w = item
        grids.append(item)
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // cfg.vision.merge_unit) + \
               [cfg.vision_end_token_id]
    seqs.append(ids)
  L = max(map(len, seqs))
  pad = cfg.pad_token_id or 0
  input_ids = np.full((len(seqs), L), pad, np.int64)
  mask = np.zeros((len(seqs), L), np.int64)
  for b, s in enumerate(seqs):
    input_ids[b, :len(s)] = s
    mask[b, :len(s)] = 1
  n_patches = sum(t * h * w for t, h, w in grids)
  pixel_values = rng.standard_normal((n_patches, cfg.vision.patch_dim)).astype(np.float32)
  return Batch(input_ids, mask, pixel_values, np.asarray(grids, np.int64).reshape(-1, 3))


# Two non-square images in one row, one in another, and a text-only row (right-padded).
MIXED_ROWS = [
    [5, (1, 6, 10), 7],
    [3, (1, 14, 4), 4, (1, 8, 8), 2],
    [9],
]
