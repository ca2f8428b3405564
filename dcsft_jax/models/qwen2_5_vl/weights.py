"""Qwen2.5-VL's HF name table: every parameter of the Flax model with its on-disk HF name."""
from __future__ import annotations

from dcsft_jax.models.family import Entry
from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig


def name_table(cfg: Qwen25VLConfig) -> list[Entry]:
  """Every parameter of the model, with its HF name (the on-disk spelling of Hub checkpoints)."""
  v, t = cfg.vision.depth, cfg.text.num_hidden_layers
  E = []
  E.append(Entry(("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", "conv"))
  for ours, theirs, bias in (("norm1", "norm1", None), ("norm2", "norm2", None), ("qkv", "attn.qkv", True),
                             ("proj", "attn.proj", True), ("gate_proj", "mlp.gate_proj", True),
                             ("up_proj", "mlp.up_proj", True), ("down_proj", "mlp.down_proj", True)):
    if bias is None:
      E.append(Entry(("visual", "blocks", ours, "scale"), f"visual.blocks.{{i}}.{theirs}.weight", "copy", v))
    else:
      E.append(Entry(("visual", "blocks", ours, "kernel"), f"visual.blocks.{{i}}.{theirs}.weight", "linear", v))
      E.append(Entry(("visual", "blocks", ours, "bias"), f"visual.blocks.{{i}}.{theirs}.bias", "copy", v))
  E.append(Entry(("visual", "ln_q", "scale"), "visual.merger.ln_q.weight", "copy"))
  for ours, theirs in (("mlp_0", "mlp.0"), ("mlp_2", "mlp.2")):
    E.append(Entry(("visual", ours, "kernel"), f"visual.merger.{theirs}.weight", "linear"))
    E.append(Entry(("visual", ours, "bias"), f"visual.merger.{theirs}.bias", "copy"))
  E.append(Entry(("embed_tokens", "embedding"), "model.embed_tokens.weight", "copy"))
  for ours in ("input_layernorm", "post_attention_layernorm"):
    E.append(Entry(("layers", ours, "scale"), f"model.layers.{{i}}.{ours}.weight", "copy", t))
  for ours in ("q_proj", "k_proj", "v_proj", "o_proj"):
    E.append(Entry(("layers", ours, "kernel"), f"model.layers.{{i}}.self_attn.{ours}.weight", "linear", t))
    if ours != "o_proj":
      E.append(Entry(("layers", ours, "bias"), f"model.layers.{{i}}.self_attn.{ours}.bias", "copy", t))
  for ours in ("gate_proj", "up_proj", "down_proj"):
    E.append(Entry(("layers", ours, "kernel"), f"model.layers.{{i}}.mlp.{ours}.weight", "linear", t))
  E.append(Entry(("norm", "scale"), "model.norm.weight", "copy"))
  if not cfg.tie_word_embeddings:
    E.append(Entry(("lm_head", "kernel"), "lm_head.weight", "linear"))
  return E
