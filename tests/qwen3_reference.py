"""The transformers/PyTorch side of the Qwen3-VL parity tests: fully random tiny models and batches.

Every parameter is re-randomised (QWEN3VL.md §1.3): matrices N(0, 0.08), norm weights 1 + N(0, 0.1),
biases N(0, 0.05), the learned position grid N(0, 0.5). transformers' default init has zero biases
and unit norms, which would hide a dropped bias (the patch embed's) or a misplaced norm.
The HF <-> ours weight conversion is local to this module (name_table driven), so the tests do not
depend on dcsft_jax.hf.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

from dcsft_jax.models.qwen3_vl import rope, weights
from dcsft_jax.models.qwen3_vl.config import Qwen3VLConfig, tiny_config


def tiny_config_a() -> Qwen3VLConfig:
  """Untied; DeepStack at vision blocks 0 and 2 of 3; M-RoPE [4, 2, 2] (head_dim 16 = hidden/heads)."""
  return tiny_config(deepstack_visual_indexes=(0, 2), vision_depth=3, mrope_section=(4, 2, 2),
                     num_position_embeddings=16)


def tiny_config_b() -> Qwen3VLConfig:
  """Tied; head_dim 24 != hidden/heads (64/4); DeepStack at vision block 1 of 4; M-RoPE [4, 4, 4];
  a 6 x 6 position grid; MQA (one KV head)."""
  return tiny_config(tie_word_embeddings=True, head_dim=24, deepstack_visual_indexes=(1,), vision_depth=4,
                     num_kv_heads=1, mrope_section=(4, 4, 4), num_position_embeddings=36, vision_hidden=48,
                     vision_heads=3, vision_intermediate=80, intermediate_size=96)


CONFIGS = {"a": tiny_config_a, "b": tiny_config_b}


def hf_config(cfg: Qwen3VLConfig) -> transformers.Qwen3VLConfig:
  return transformers.Qwen3VLConfig(**cfg.to_hf_dict())


def random_hf_model(cfg: Qwen3VLConfig, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.Qwen3VLForConditionalGeneration._from_config(hf_config(cfg), attn_implementation="eager",
                                                                    dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.copy_(0.05 * torch.randn_like(p))
      elif "norm" in name:                       # LayerNorm / RMSNorm weights (norm1, q_norm, ...)
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "pos_embed" in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  return model.eval()


# ----------------------------------------------------------------------------- weights
def hf_to_ours(cfg: Qwen3VLConfig, state: dict[str, np.ndarray]) -> dict:
  """HF state dict (name -> array) -> our param tree, by the name table (stacked leaves for {i})."""
  def conv(kind, w):
    return w.T if kind == "linear" else w.reshape(w.shape[0], -1).T if kind == "conv" else w
  tree: dict = {}
  for e in weights.name_table(cfg):
    if e.layers:
      x = np.stack([conv(e.kind, state[e.hf.format(i=i)]) for i in range(e.layers)])
    else:
      x = conv(e.kind, state[e.hf])
    node = tree
    for k in e.path[:-1]:
      node = node.setdefault(k, {})
    node[e.path[-1]] = np.ascontiguousarray(x)
  return tree


def ours_to_hf(cfg: Qwen3VLConfig, params: dict) -> dict[str, np.ndarray]:
  v = cfg.vision
  def back(kind, x):
    if kind == "linear":
      return x.T
    if kind == "conv":
      return x.T.reshape(x.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return x
  out = {}
  for e in weights.name_table(cfg):
    x = params
    for k in e.path:
      x = x[k]
    x = np.asarray(x)
    if e.layers:
      for i in range(e.layers):
        out[e.hf.format(i=i)] = np.ascontiguousarray(back(e.kind, x[i]))
    else:
      out[e.hf] = np.ascontiguousarray(back(e.kind, x))
  return out


def hf_state(model) -> dict[str, np.ndarray]:
  """The tensors a 5.25 checkpoint holds (tied lm_head dropped, as save_pretrained does)."""
  sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    sd.pop("lm_head.weight", None)
  return sd


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Batch:
  input_ids: np.ndarray          # [B, L] right-padded
  attention_mask: np.ndarray     # [B, L]
  pixel_values: np.ndarray       # [sum(thw), patch_dim] (transformers' packed layout)
  image_grid_thw: np.ndarray     # [n_images, 3]

  def hf_kwargs(self, cfg: Qwen3VLConfig):
    kw = dict(input_ids=torch.tensor(self.input_ids), attention_mask=torch.tensor(self.attention_mask),
              mm_token_type_ids=torch.tensor(rope.mm_token_types(self.input_ids, cfg)))
    if len(self.image_grid_thw):
      kw.update(pixel_values=torch.tensor(self.pixel_values), image_grid_thw=torch.tensor(self.image_grid_thw))
    return kw

  def ours(self, cfg: Qwen3VLConfig, num_patches: int | None = None, num_images: int | None = None):
    """(input_ids, positions, images, attention_mask, rope_deltas) for dcsft_jax, images padded to
    `num_patches` patches and `num_images` rows (extra rows all padding)."""
    positions, deltas = rope.get_rope_index(self.input_ids, cfg, image_grid_thw=self.image_grid_thw,
                                            attention_mask=self.attention_mask)
    images = None
    if len(self.image_grid_thw):
      grids = [tuple(g) for g in self.image_grid_thw.tolist()]
      P = num_patches or max(t * h * w for t, h, w in grids)
      n = num_images or len(grids)
      pv = rope.split_packed_pixels(self.pixel_values, grids, P)
      pv = np.concatenate([pv, np.zeros((n - len(grids),) + pv.shape[1:], pv.dtype)])
      images = {"pixel_values": pv, **rope.vision_layout(grids + [None] * (n - len(grids)), cfg.vision, P)}
    return (self.input_ids.astype(np.int32), positions, images, self.attention_mask.astype(np.int32), deltas)


def make_batch(cfg: Qwen3VLConfig, rows, seed: int = 0) -> Batch:
  """rows: lists of items, each an int (that many random text tokens) or a (t, h, w) image grid, written
  as <|vision_start|> + (h/2 * w/2) x <|image_pad|> + <|vision_end|> (the processor's expansion).
  Pixel values are random in [-1, 1] (both models see the same packed rows)."""
  rng = np.random.default_rng(seed)
  n_text = cfg.bos_token_id          # ordinary tokens sit below the special ids
  m2 = cfg.vision.merge_unit
  seqs, grids, pixels = [], [], []
  for items in rows:
    seq = []
    for it in items:
      if isinstance(it, int):
        seq += rng.integers(0, n_text, it).tolist()
      else:
        t, h, w = it
        grids.append((t, h, w))
        pixels.append(rng.uniform(-1, 1, (t * h * w, cfg.vision.patch_dim)).astype(np.float32))
        seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // m2) + [cfg.vision_end_token_id]
    seqs.append(seq)
  L = max(len(s) for s in seqs)
  ids = np.full((len(seqs), L), cfg.pad_token_id, np.int64)
  mask = np.zeros((len(seqs), L), np.int64)
  for b, s in enumerate(seqs):
    ids[b, :len(s)] = s
    mask[b, :len(s)] = 1
  pv = np.concatenate(pixels) if pixels else np.zeros((0, cfg.vision.patch_dim), np.float32)
  return Batch(ids, mask, pv, np.asarray(grids, np.int64).reshape(-1, 3))
