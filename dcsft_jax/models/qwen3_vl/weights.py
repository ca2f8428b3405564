"""Qwen3-VL's HF name table: every parameter of the Flax model with its on-disk HF name.

transformers 5.25 writes the in-memory names (`model.visual.*`, `model.language_model.*`,
`lm_head.weight`; QWEN3VL.md §6); a tied checkpoint has no `lm_head.weight`.
"""
from __future__ import annotations

from dcsft_jax.models.family import Entry
from dcsft_jax.models.qwen3_vl.config import Qwen3VLConfig


def _linear(E, path, hf, layers=0, bias=True):
  E.append(Entry(path + ("kernel",), f"{hf}.weight", "linear", layers))
  if bias:
    E.append(Entry(path + ("bias",), f"{hf}.bias", "copy", layers))


def _layernorm(E, path, hf, layers=0):
  E.append(Entry(path + ("scale",), f"{hf}.weight", "copy", layers))
  E.append(Entry(path + ("bias",), f"{hf}.bias", "copy", layers))


def name_table(cfg: Qwen3VLConfig) -> list[Entry]:
  """Every parameter of the model, with its HF name."""
  v, t = cfg.vision.depth, cfg.text.num_hidden_layers
  n_ds = len(cfg.vision.deepstack_visual_indexes)
  V, L = "model.visual", "model.language_model"
  E: list[Entry] = []
  E.append(Entry(("visual", "patch_embed", "kernel"), f"{V}.patch_embed.proj.weight", "conv"))
  E.append(Entry(("visual", "patch_embed", "bias"), f"{V}.patch_embed.proj.bias", "copy"))
  E.append(Entry(("visual", "pos_embed", "embedding"), f"{V}.pos_embed.weight", "copy"))
  blk = f"{V}.blocks.{{i}}"
  _layernorm(E, ("visual", "blocks", "norm1"), f"{blk}.norm1", v)
  _layernorm(E, ("visual", "blocks", "norm2"), f"{blk}.norm2", v)
  _linear(E, ("visual", "blocks", "qkv"), f"{blk}.attn.qkv", v)
  _linear(E, ("visual", "blocks", "proj"), f"{blk}.attn.proj", v)
  _linear(E, ("visual", "blocks", "linear_fc1"), f"{blk}.mlp.linear_fc1", v)
  _linear(E, ("visual", "blocks", "linear_fc2"), f"{blk}.mlp.linear_fc2", v)
  _layernorm(E, ("visual", "merger", "norm"), f"{V}.merger.norm")
  _linear(E, ("visual", "merger", "linear_fc1"), f"{V}.merger.linear_fc1")
  _linear(E, ("visual", "merger", "linear_fc2"), f"{V}.merger.linear_fc2")
  if n_ds:
    ds = f"{V}.deepstack_merger_list.{{i}}"
    _layernorm(E, ("visual", "deepstack_merger", "norm"), f"{ds}.norm", n_ds)
    _linear(E, ("visual", "deepstack_merger", "linear_fc1"), f"{ds}.linear_fc1", n_ds)
    _linear(E, ("visual", "deepstack_merger", "linear_fc2"), f"{ds}.linear_fc2", n_ds)
  E.append(Entry(("embed_tokens", "embedding"), f"{L}.embed_tokens.weight", "copy"))
  lay = f"{L}.layers.{{i}}"
  for ours in ("input_layernorm", "post_attention_layernorm"):
    E.append(Entry(("layers", ours, "scale"), f"{lay}.{ours}.weight", "copy", t))
  for ours in ("q_proj", "k_proj", "v_proj", "o_proj"):
    _linear(E, ("layers", ours), f"{lay}.self_attn.{ours}", t, bias=False)
  for ours in ("q_norm", "k_norm"):
    E.append(Entry(("layers", ours, "scale"), f"{lay}.self_attn.{ours}.weight", "copy", t))
  for ours in ("gate_proj", "up_proj", "down_proj"):
    _linear(E, ("layers", ours), f"{lay}.mlp.{ours}", t, bias=False)
  E.append(Entry(("norm", "scale"), f"{L}.norm.weight", "copy"))
  if not cfg.tie_word_embeddings:
    E.append(Entry(("lm_head", "kernel"), "lm_head.weight", "linear"))
  return E
