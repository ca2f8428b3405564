"""Qwen3-VL (dense) in Flax (Linen): vision tower with DeepStack, patch mergers, Qwen3 decoder,
interleaved M-RoPE.

Numerics follow transformers' `modeling_qwen3_vl.py` (QWEN3VL.md is the spec); the layout follows
what jit and a mesh want, as in the Qwen2.5-VL port:
- the vision tower runs images as a batch [images, patches, dim], each padded to a bucket size;
  attention stays inside a frame through a segment mask (frame_seg), so every shape is static;
- vision blocks and decoder layers are stacked with `nn.scan` (one compiled layer, leading 'layers'
  axis). DeepStack keeps both scans: the vision scan carries a [levels, I, P, D] buffer that block
  `deepstack_visual_indexes[j]` writes into slot j (outside the block's remat, so the buffer is never
  saved per layer); the decoder scan takes its layer index as a scanned input and adds level i's
  features (a broadcast [levels, B, L, D] array, zeros off the image positions) after layer i;
- every parameter carries logical axis names (dcsft_jax.mesh holds the rules);
- position ids (3-axis M-RoPE) and the vision layout (2-D positions, frame segments, the learned
  position embedding's bilinear taps) are computed on the host (qwen3_vl/rope.py).

Inputs of `Qwen3VL.__call__`:
  input_ids [B, L] int32; positions [3, B, L] int32;
  images: None or {'pixel_values' [I, P, C*T*p*p], 'pos_hw' [I, P, 2], 'frame_seg' [I, P],
          'pe_index' [I, P, 4], 'pe_weight' [I, P, 4]} (rope.vision_layout); the valid merged tokens of
          all images, in order, fill the <|image_pad|> positions in row-major order, as transformers'
          masked_scatter;
  attention_mask [B, L] (optional): rows are right-padded, each row's real tokens first.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dcsft_jax.models import attention as attn_lib
from dcsft_jax.models import rope
from dcsft_jax.models.layers import (ACTIVATION, LayerNorm, Linear, ModelOptions, RMSNorm, constrain as _constrain,
                                     linear_factory, normal_init as _init)
from dcsft_jax.models.qwen3_vl.config import Qwen3VLConfig, TextConfig, VisionConfig

TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("qkv", "proj", "linear_fc1", "linear_fc2")
MERGER_LORA_TARGETS = ("linear_fc1", "linear_fc2")   # of the merger and of every DeepStack merger

_LEVELS = (None, "activation_batch", "activation_length", "activation_embed")   # DeepStack [levels, B, L, D]


# ------------------------------------------------------------------------------------- vision
class VisionBlock(nn.Module):
  """transformers' Qwen3VLVisionBlock (LayerNorms with bias, per-frame attention, tanh-GELU MLP), one
  scanned step that also records its output into the DeepStack buffer when it is a DeepStack layer."""
  cfg: VisionConfig
  opts: ModelOptions

  @nn.compact
  def block(self, x, cos, sin, mask):
    c, o = self.cfg, self.opts
    lin = linear_factory(o, "vision", use_bias=True)
    I, P, D = x.shape
    H, hd = c.num_heads, c.head_dim
    h = LayerNorm(1e-6, o.dtype, o.param_dtype, name="norm1")(x)
    qkv = lin("qkv", 3 * D, ("embed", "heads"))(h).reshape(I, P, 3, H, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Vision RoPE is applied in fp32 and cast back (transformers' apply_rotary_pos_emb_vision).
    q = rope.apply_rope(q.astype(jnp.float32), cos, sin).astype(o.dtype)
    k = rope.apply_rope(k.astype(jnp.float32), cos, sin).astype(o.dtype)
    a = attn_lib.dot_product_attention(q, k, v, mask=mask, impl=o.attention, platform=o.platform)
    x = x + lin("proj", D, ("heads", "embed"))(a.reshape(I, P, D))
    h = LayerNorm(1e-6, o.dtype, o.param_dtype, name="norm2")(x)
    h = lin("linear_fc1", c.intermediate_size, ("embed", "mlp"))(h)
    x = x + lin("linear_fc2", D, ("mlp", "embed"))(nn.gelu(h, approximate=True))   # gelu_pytorch_tanh
    return _constrain(x, ACTIVATION)

  def __call__(self, carry, slot, cos, sin, mask):
    """carry (x [I, P, D], deepstack buffer [levels, I, P, D]); slot: this block's DeepStack level or -1."""
    x, buf = carry
    block = nn.remat(type(self).block, prevent_cse=False) if self.opts.remat else type(self).block
    x = block(self, x, cos, sin, mask)
    put = jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), jnp.maximum(slot, 0), 0)
    return (x, jnp.where(slot >= 0, put, buf)), None


class PatchMerger(nn.Module):
  """transformers' Qwen3VLVisionPatchMerger: LayerNorm(D) -> 2x2 shuffle -> fc1 -> exact GELU -> fc2 (the
  merger), or with `postshuffle` the DeepStack form: shuffle -> LayerNorm(4D) -> fc1 -> GELU -> fc2."""
  cfg: VisionConfig
  opts: ModelOptions
  postshuffle: bool = False

  @nn.compact
  def __call__(self, x):
    c, o = self.cfg, self.opts
    I, P, D = x.shape
    lin = linear_factory(o, "merger", use_bias=True)
    if not self.postshuffle:
      x = LayerNorm(1e-6, o.dtype, o.param_dtype, name="norm")(x)
    x = x.reshape(I, P // c.merge_unit, c.merge_unit * D)
    if self.postshuffle:
      x = LayerNorm(1e-6, o.dtype, o.param_dtype, name="norm")(x)
    x = lin("linear_fc1", c.merge_unit * D, ("embed", "mlp"))(x)
    return lin("linear_fc2", c.out_hidden_size, ("mlp", "embed"))(nn.gelu(x, approximate=False))


class VisionTower(nn.Module):
  """transformers' Qwen3VLVisionModel on a padded image batch."""
  cfg: VisionConfig
  opts: ModelOptions

  @nn.compact
  def __call__(self, pixel_values, pos_hw, frame_seg, pe_index, pe_weight):
    """-> merged tokens [I, P/4, out], DeepStack features [levels, I, P/4, out], validity [I, P/4]."""
    c, o = self.cfg, self.opts
    I, P, _ = pixel_values.shape
    D, levels = c.hidden_size, len(c.deepstack_visual_indexes)
    # Conv3d (bias=True) with kernel == stride is a matmul over the flattened (C, T, p, p) patch;
    # transformers casts pixel_values to the weight dtype first (Linear casts to the compute dtype).
    x = Linear(D, ("patch", "embed"), use_bias=True, dtype=o.dtype, param_dtype=o.param_dtype,
               name="patch_embed")(pixel_values)
    # Learned S x S position grid, resampled per image (bilinear, align_corners=True; taps from the host):
    # rows gathered in the model dtype, weighted and summed in fp32, cast before the add (§3.2).
    table = nn.Embed(c.num_position_embeddings, D, dtype=o.dtype, param_dtype=o.param_dtype, name="pos_embed",
                     embedding_init=nn.with_logical_partitioning(_init(), (None, "embed")))
    pe = jnp.sum(table(pe_index).astype(jnp.float32) * pe_weight.astype(jnp.float32)[..., None], axis=-2)
    x = x + pe.astype(x.dtype)
    cos, sin = rope.vision_cos_sin(pos_hw, c.head_dim, c.rope_theta)
    mask = attn_lib.Segments(frame_seg)                                    # within a frame
    slots = np.full((c.depth,), -1, np.int32)
    for j, i in enumerate(c.deepstack_visual_indexes):
      slots[i] = j
    buf = jnp.zeros((max(levels, 1), I, P, D), x.dtype)
    blocks = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                     length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, buf), _ = blocks(c, o, name="blocks")((x, buf), jnp.asarray(slots), cos, sin, mask)
    merged = PatchMerger(c, o, name="merger")(x)
    if levels:
      # One DeepStack merger per level, stacked like the layers (leading 'layers' axis of size `levels`).
      mergers = nn.vmap(PatchMerger, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=0, out_axes=0, axis_size=levels, metadata_params={nn.PARTITION_NAME: "layers"})
      deep = mergers(c, o, True, name="deepstack_merger")(buf)
    else:
      deep = jnp.zeros((0,) + merged.shape, merged.dtype)
    valid = frame_seg[:, ::c.merge_unit] >= 0
    return merged, deep, valid


# ------------------------------------------------------------------------------------- text
class DecoderLayer(nn.Module):
  """transformers' Qwen3VLTextDecoderLayer (no biases, per-head RMS QK-norm before the rotary), plus the
  DeepStack addition after the layer: level `index` of `deepstack` when index < levels."""
  cfg: TextConfig
  opts: ModelOptions

  @nn.compact
  def __call__(self, h, cache, cos, sin, mask, cache_index, prefix, index, deepstack):
    """h [B, L, D]; cache None or {'k','v'} [B, S, KV, hd] for this layer, written at cache_index.

    prefix: None, or a read-only {'k','v'} [P, S0, KV, hd] shared by groups of B/P consecutive
    rows (the K samples of a prompt); then `mask` is (prefix_mask [P, S0], cache_mask [B, L, S]).
    index: this layer's number (scanned); deepstack: None or [levels, B, L, D] (broadcast).
    """
    c, o = self.cfg, self.opts
    lin = linear_factory(o, "language", use_bias=False)
    B, L, D = h.shape
    N, K, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    x = RMSNorm(c.rms_norm_eps, o.dtype, o.param_dtype, name="input_layernorm")(h)
    q = lin("q_proj", N * hd, ("embed", "heads"))(x).reshape(B, L, N, hd)
    k = lin("k_proj", K * hd, ("embed", "kv_heads"))(x).reshape(B, L, K, hd)
    v = lin("v_proj", K * hd, ("embed", "kv_heads"))(x).reshape(B, L, K, hd)
    # QK-norm: one (hd,) RMSNorm per projection, shared by the heads, before the rotary.
    q = RMSNorm(c.rms_norm_eps, o.dtype, o.param_dtype, name="q_norm")(q)
    k = RMSNorm(c.rms_norm_eps, o.dtype, o.param_dtype, name="k_norm")(k)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    a, new_cache = attn_lib.decoder_attention(q, k, v, mask=mask, cache=cache, cache_index=cache_index, prefix=prefix,
                                              dtype=o.dtype, impl=o.attention, platform=o.platform)
    h = h + lin("o_proj", D, ("heads", "embed"))(a.reshape(B, L, N * hd))
    x = RMSNorm(c.rms_norm_eps, o.dtype, o.param_dtype, name="post_attention_layernorm")(h)
    g = lin("gate_proj", c.intermediate_size, ("embed", "mlp"))(x)
    u = lin("up_proj", c.intermediate_size, ("embed", "mlp"))(x)
    g = _constrain(g, ("activation_batch", "activation_length", "activation_mlp"))
    h = h + lin("down_proj", D, ("mlp", "embed"))(nn.silu(g) * u)
    if deepstack is not None:
      # transformers' _deepstack_process: level i joins after text layer i (QWEN3VL.md §4.5).
      n = deepstack.shape[0]
      level = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(index, n - 1), 0, keepdims=False)
      h = h + jnp.where(index < n, level, jnp.zeros_like(level)).astype(h.dtype)
    return _constrain(h, ACTIVATION), new_cache


class Qwen3VL(nn.Module):
  cfg: Qwen3VLConfig
  opts: ModelOptions = ModelOptions()

  def setup(self):
    c, o, t = self.cfg, self.opts, self.cfg.text
    self.visual = VisionTower(c.vision, o)
    self.embed_tokens = nn.Embed(t.vocab_size, t.hidden_size, dtype=o.dtype, param_dtype=o.param_dtype,
                                 embedding_init=nn.with_logical_partitioning(_init(), ("vocab", "embed")))
    layer = nn.remat(DecoderLayer, prevent_cse=False) if o.remat else DecoderLayer
    self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                          length=t.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(t, o)
    self.norm = RMSNorm(t.rms_norm_eps, o.dtype, o.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(t.vocab_size, ("embed", "vocab"), dtype=o.dtype, param_dtype=o.param_dtype)

  def encode_images(self, images):
    """-> (merged [I, P/4, D], deepstack [levels, I, P/4, D], valid [I, P/4])."""
    return self.visual(images["pixel_values"], images["pos_hw"], images["frame_seg"], images["pe_index"],
                       images["pe_weight"])

  def embed_inputs(self, input_ids, images=None):
    """(embeddings [B, L, D], visual): the image features replace the <|image_pad|> embeddings; visual is
    None (no images, or no DeepStack levels) or {'deepstack': [levels, B, L, D]}, level j's features at
    the image positions and zeros elsewhere, which `decode` adds after text layer j."""
    h = self.embed_tokens(input_ids)
    if images is None:
      return h, None
    feats, deep, valid = self.encode_images(images)
    B, L, D = h.shape
    feats = feats.reshape(-1, D)
    order = jnp.argsort(jnp.logical_not(valid.reshape(-1)), stable=True)   # valid rows first, in order
    is_img = (input_ids == self.cfg.image_token_id).reshape(-1)
    src = order[jnp.clip(jnp.cumsum(is_img) - 1, 0, feats.shape[0] - 1)]
    h = jnp.where(is_img[:, None], feats[src].astype(h.dtype), h.reshape(-1, D)).reshape(B, L, D)
    if deep.shape[0] == 0:
      return h, None
    ds = deep.reshape(deep.shape[0], -1, D)[:, src].astype(h.dtype)
    ds = jnp.where(is_img[None, :, None], ds, jnp.zeros_like(ds)).reshape(-1, B, L, D)
    return h, {"deepstack": _constrain(ds, _LEVELS)}

  def embed(self, input_ids, images=None):
    """Token embeddings with the image features scattered in (DeepStack levels not included)."""
    return self.embed_inputs(input_ids, images)[0]

  def decode(self, h, positions, *, mask=None, cache=None, cache_index=0, prefix=None, visual=None):
    """Runs the decoder stack on embeddings h [B, L, D] -> (final hidden [B, L, D], new cache).

    cache/prefix: per-layer stacked {'k','v'} [layers, ...] (see DecoderLayer). visual: what
    `embed_inputs` returned for these positions (the DeepStack levels), or None (decode steps)."""
    t = self.cfg.text
    h = _constrain(h, ACTIVATION)
    cos, sin = rope.mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, self.opts.dtype,
                                  interleaved=True)
    deepstack = None if visual is None else visual.get("deepstack")
    index = jnp.arange(t.num_hidden_layers, dtype=jnp.int32)
    h, new_cache = self.layers(h, cache, cos, sin, mask, cache_index, prefix, index, deepstack)
    return self.norm(h), new_cache

  def logits(self, h):
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.attend(h)
    return self.lm_head(h)

  def __call__(self, input_ids, positions, images=None, attention_mask=None, return_hidden=False):
    h, visual = self.embed_inputs(input_ids, images)
    mask = None
    if attention_mask is not None:
      mask = attn_lib.RightPadding(jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
    h, _ = self.decode(h, positions, mask=mask, visual=visual)
    return h if return_hidden else self.logits(h)
