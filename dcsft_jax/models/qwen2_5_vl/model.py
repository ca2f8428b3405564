"""Qwen2.5-VL in Flax (Linen): vision tower, patch merger, Qwen2 decoder, M-RoPE.

Numerics follow transformers' `modeling_qwen2_5_vl.py` (the reference for every number); the
layout follows what jit and a mesh want:
- the vision tower runs images as a batch [images, patches, dim], each padded to a bucket size,
  and replaces transformers' window permutation by segment masks (frame / window id), so every
  shape is static and nothing is permuted back;
- layers are stacked with `nn.scan` (one compiled layer, leading 'layers' axis on every weight);
- every parameter carries logical axis names (dcsft_jax.mesh holds the rules);
- position ids (3-axis M-RoPE) and the vision layout are computed on the host (models/rope.py).

Inputs of `Qwen25VL.__call__`:
  input_ids [B, L] int32; positions [3, B, L] int32;
  images: None or {'pixel_values' [I, P, C*T*p*p], 'pos_hw' [I, P, 2], 'frame_seg' [I, P],
          'window_seg' [I, P]} (rope.vision_layout); the valid merged tokens of all images, in
          order, fill the <|image_pad|> positions in row-major order, as transformers' masked_scatter;
  attention_mask [B, L] (optional): rows are right-padded, each row's real tokens first (the causal
          mask alone keeps real tokens off the padding; the lengths let cuDNN skip it).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dcsft_jax.models import attention as attn_lib
from dcsft_jax.models import rope
from dcsft_jax.models.layers import Linear, ModelOptions, RMSNorm, constrain as _constrain, normal_init as _init
from dcsft_jax.models.qwen2_5_vl import rope as windows
from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig

TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj")
MERGER_LORA_TARGETS = ("mlp_0", "mlp_2")


# ------------------------------------------------------------------------------------- vision
class VisionBlock(nn.Module):
  cfg: VisionConfig
  opts: ModelOptions

  @nn.compact
  def __call__(self, x, is_full, cos, sin, mask_full, window):
    """mask_full: the full blocks' Segments (each patch's frame). window: the windowed blocks' layout,
    the Segments of the windows (the masked form) or the (slot of each patch [I, P], patch of each
    slot [I, S]) pair of window blocks (`window_slots`)."""
    c, o = self.cfg, self.opts
    lora = o.lora if (o.lora is not None and o.lora.vision) else None
    lin = lambda n, f, axes: Linear(f, axes, use_bias=True, dtype=o.dtype, param_dtype=o.param_dtype,
                                    lora=lora, deterministic=o.deterministic, name=n)
    I, P, D = x.shape
    H, hd = c.num_heads, c.head_dim
    h = RMSNorm(1e-6, o.dtype, o.param_dtype, name="norm1")(x)
    qkv = lin("qkv", 3 * D, ("embed", "heads"))(h).reshape(I, P, 3, H, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Vision RoPE is applied in fp32 and cast back (transformers' apply_rotary_pos_emb_vision).
    q = rope.apply_rope(q.astype(jnp.float32), cos, sin).astype(o.dtype)
    k = rope.apply_rope(k.astype(jnp.float32), cos, sin).astype(o.dtype)
    attend = lambda mask: attn_lib.dot_product_attention(q, k, v, mask=mask, impl=o.attention, platform=o.platform)
    if isinstance(window, tuple):      # window blocks: the windowed layers do only their windows' work
      blocks = lambda: window_attention(q, k, v, *window, windows.window_block(c), o)
      if isinstance(is_full, (bool, np.bool_)):       # one block on its own (benchmarks/prefill_flops.py)
        a = attend(mask_full) if is_full else blocks()
      else:                                           # the scanned stack: a layer's flag is traced
        a = jax.lax.cond(is_full, lambda: attend(mask_full), blocks)
    else:
      a = attend(attn_lib.Segments(jnp.where(is_full, mask_full.ids, window.ids)))
    x = x + lin("proj", D, ("heads", "embed"))(a.reshape(I, P, D))
    h = RMSNorm(1e-6, o.dtype, o.param_dtype, name="norm2")(x)
    g = lin("gate_proj", c.intermediate_size, ("embed", "mlp"))(h)
    u = lin("up_proj", c.intermediate_size, ("embed", "mlp"))(h)
    x = x + lin("down_proj", D, ("mlp", "embed"))(nn.silu(g) * u)
    return _constrain(x, ("activation_batch", "activation_length", "activation_embed")), None


class VisionTower(nn.Module):
  cfg: VisionConfig
  opts: ModelOptions

  @nn.compact
  def __call__(self, pixel_values, pos_hw, frame_seg, window_seg):
    """-> merged tokens [I, P/4, out_hidden_size] and their validity [I, P/4]."""
    c, o = self.cfg, self.opts
    I, P, _ = pixel_values.shape
    # Conv3d with kernel == stride is a matmul over the flattened (C, T, p, p) patch.
    x = Linear(c.hidden_size, ("patch", "embed"), dtype=o.dtype, param_dtype=o.param_dtype,
               name="patch_embed")(pixel_values)
    cos, sin = rope.vision_cos_sin(pos_hw, c.head_dim, c.rope_theta)
    mask_full = attn_lib.Segments(frame_seg)         # a patch sees its frame (its image's, on padding -1)
    if windows.use_window_blocks(P, c):
      window = window_slots(window_seg, windows.window_count(P, c), windows.window_block(c))
    else:
      window = attn_lib.Segments(window_seg)
    is_full = jnp.asarray(np.isin(np.arange(c.depth), np.asarray(c.fullatt_block_indexes)))
    block = nn.remat(VisionBlock, prevent_cse=False) if o.remat else VisionBlock
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                     length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(c, o, name="blocks")(x, is_full, cos, sin, mask_full, window)
    x = RMSNorm(1e-6, o.dtype, o.param_dtype, name="ln_q")(x)
    x = x.reshape(I, P // c.merge_unit, c.merge_unit * c.hidden_size)
    lora = o.lora if (o.lora is not None and o.lora.merger) else None
    kw = dict(use_bias=True, dtype=o.dtype, param_dtype=o.param_dtype, lora=lora, deterministic=o.deterministic)
    x = Linear(c.merge_unit * c.hidden_size, ("mlp", "embed"), name="mlp_0", **kw)(x)
    x = nn.gelu(x, approximate=False)
    x = Linear(c.out_hidden_size, ("embed", "mlp"), name="mlp_2", **kw)(x)
    valid = frame_seg[:, ::c.merge_unit] >= 0
    return x, valid


def window_slots(window_seg, num_windows: int, block: int):
  """Window ids [I, P] (-1 on padding) -> (slot of each patch [I, P], patch of each slot [I, S]), S =
  num_windows x block: window w's patches fill slots w*block.. in their order; a padding patch's slot
  is S (none), an empty slot's patch is P (none). The host checked every image has at most
  num_windows windows (rope.vision_layout)."""
  P = window_seg.shape[1]
  S = num_windows * block

  def one(seg):
    real = seg >= 0
    key = jnp.where(real, seg, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(key, stable=True)                  # patches grouped by window, in their order
    sk = key[order]
    rank = jnp.arange(P) - jnp.searchsorted(sk, sk, side="left")
    slot_sorted = jnp.where(real[order], jnp.where(real[order], sk, 0) * block + rank, S).astype(jnp.int32)
    slot = jnp.zeros(P, jnp.int32).at[order].set(slot_sorted)
    patch = jnp.full(S, P, jnp.int32).at[slot_sorted].set(order.astype(jnp.int32), mode="drop")
    return slot, patch
  return jax.vmap(one)(window_seg)


def window_attention(q, k, v, slot, patch, block: int, o: ModelOptions):
  """Attention within each window as [I * windows, block, block] blocks: q, k, v [I, P, H, hd] gather
  into their window's slots, attend there (a partial window's empty slots masked), and gather back.
  The same keys and weights as the masked P x P form, with the sums over 64 slots instead of P."""
  I, P, H, hd = q.shape
  S = patch.shape[1]
  W = S // block
  pad = lambda x: jnp.concatenate([x, jnp.zeros((I, 1, H, hd), x.dtype)], axis=1)
  gather = lambda x: jnp.take_along_axis(pad(x), patch[:, :, None, None], axis=1).reshape(I * W, block, H, hd)
  real = (patch < P).reshape(I * W, 1, 1, block)
  # An empty slot's query sees itself too, so no row is fully masked (its output is never read).
  mask = real | jnp.eye(block, dtype=bool)[None, None]
  a = attn_lib.dot_product_attention(gather(q), gather(k), gather(v), mask=mask, impl=o.attention,
                                     platform=o.platform).reshape(I, S, H, hd)
  return jnp.take_along_axis(a, jnp.minimum(slot, S - 1)[:, :, None, None], axis=1)


# ------------------------------------------------------------------------------------- text
class DecoderLayer(nn.Module):
  cfg: TextConfig
  opts: ModelOptions

  @nn.compact
  def __call__(self, h, cache, cos, sin, mask, cache_index, prefix=None):
    """h [B, L, D]; cache None or {'k','v'} [B, S, KV, hd] for this layer, written at cache_index.

    prefix: None, or a read-only {'k','v'} [P, S0, KV, hd] shared by groups of B/P consecutive
    rows (the K samples of a prompt); then `mask` is (prefix_mask [P, S0], cache_mask [B, L, S]).
    """
    c, o = self.cfg, self.opts
    lora = o.lora if (o.lora is not None and o.lora.language) else None
    lin = lambda n, f, axes, bias: Linear(f, axes, use_bias=bias, dtype=o.dtype, param_dtype=o.param_dtype,
                                          lora=lora, deterministic=o.deterministic, name=n)
    B, L, D = h.shape
    N, K, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    x = RMSNorm(c.rms_norm_eps, o.dtype, o.param_dtype, name="input_layernorm")(h)
    q = lin("q_proj", N * hd, ("embed", "heads"), True)(x).reshape(B, L, N, hd)
    k = lin("k_proj", K * hd, ("embed", "kv_heads"), True)(x).reshape(B, L, K, hd)
    v = lin("v_proj", K * hd, ("embed", "kv_heads"), True)(x).reshape(B, L, K, hd)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    a, new_cache = attn_lib.decoder_attention(q, k, v, mask=mask, cache=cache, cache_index=cache_index, prefix=prefix,
                                              dtype=o.dtype, impl=o.attention, platform=o.platform)
    h = h + lin("o_proj", D, ("heads", "embed"), False)(a.reshape(B, L, N * hd))
    x = RMSNorm(c.rms_norm_eps, o.dtype, o.param_dtype, name="post_attention_layernorm")(h)
    g = lin("gate_proj", c.intermediate_size, ("embed", "mlp"), False)(x)
    u = lin("up_proj", c.intermediate_size, ("embed", "mlp"), False)(x)
    g = _constrain(g, ("activation_batch", "activation_length", "activation_mlp"))
    h = h + lin("down_proj", D, ("mlp", "embed"), False)(nn.silu(g) * u)
    return _constrain(h, ("activation_batch", "activation_length", "activation_embed")), new_cache


class Qwen25VL(nn.Module):
  cfg: Qwen25VLConfig
  opts: ModelOptions = ModelOptions()

  def setup(self):
    c, o, t = self.cfg, self.opts, self.cfg.text
    self.visual = VisionTower(c.vision, o)
    self.embed_tokens = nn.Embed(t.vocab_size, t.hidden_size, dtype=o.dtype, param_dtype=o.param_dtype,
                                 embedding_init=nn.with_logical_partitioning(_init(), ("vocab", "embed")))
    layer = nn.remat(DecoderLayer, prevent_cse=False) if o.remat else DecoderLayer
    self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                          length=t.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(t, o)
    self.norm = RMSNorm(t.rms_norm_eps, o.dtype, o.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(t.vocab_size, ("embed", "vocab"), dtype=o.dtype, param_dtype=o.param_dtype)

  def encode_images(self, images):
    return self.visual(images["pixel_values"], images["pos_hw"], images["frame_seg"], images["window_seg"])

  def embed(self, input_ids, images=None):
    """Token embeddings with the image features scattered into the <|image_pad|> positions."""
    h = self.embed_tokens(input_ids)
    if images is None:
      return h
    feats, valid = self.encode_images(images)
    B, L, D = h.shape
    feats = feats.reshape(-1, D).astype(h.dtype)
    order = jnp.argsort(jnp.logical_not(valid.reshape(-1)), stable=True)   # valid rows first, in order
    is_img = (input_ids == self.cfg.image_token_id).reshape(-1)
    k = jnp.clip(jnp.cumsum(is_img) - 1, 0, feats.shape[0] - 1)
    h = jnp.where(is_img[:, None], feats[order[k]], h.reshape(-1, D)).reshape(B, L, D)
    return h

  def embed_inputs(self, input_ids, images=None):
    """(embeddings, visual): the family seam's form of `embed`; Qwen2.5-VL adds nothing later (None)."""
    return self.embed(input_ids, images), None

  def decode(self, h, positions, *, mask=None, cache=None, cache_index=0, prefix=None, visual=None):
    """Runs the decoder stack on embeddings h [B, L, D] -> (final hidden [B, L, D], new cache).

    cache/prefix: per-layer stacked {'k','v'} [layers, ...] (see DecoderLayer). visual: unused (the
    seam's argument for families that add image features inside the decoder)."""
    t = self.cfg.text
    h = _constrain(h, ("activation_batch", "activation_length", "activation_embed"))
    cos, sin = rope.mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, self.opts.dtype)
    h, new_cache = self.layers(h, cache, cos, sin, mask, cache_index, prefix)
    return self.norm(h), new_cache

  def logits(self, h):
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.attend(h)
    return self.lm_head(h)

  def __call__(self, input_ids, positions, images=None, attention_mask=None, return_hidden=False):
    h = self.embed(input_ids, images)
    mask = None
    if attention_mask is not None:
      mask = attn_lib.RightPadding(jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
    h, _ = self.decode(h, positions, mask=mask)
    return h if return_hidden else self.logits(h)


