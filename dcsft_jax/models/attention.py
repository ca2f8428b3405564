"""Scaled dot-product attention, with the fastest kernel the platform has.

- GPU, bf16/fp16, head_dim a multiple of 8 and <= 128: cuDNN flash attention through
  `jax.nn.dot_product_attention(implementation="cudnn")`.
- TPU: Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a fused kernel that
  never holds the [T, S] scores, for the attentions whose mask it can take: causal with right padding
  (the LM's training forward and prefill) and segments (the vision tower's per-image blocks). The
  sequence is padded to a multiple of 128 and head_dim to one of 128 (zeros change no dot product);
  on a mesh it runs per shard (shard_map over the batch and head axes).
- Everywhere else (CPU, fp32 on GPU, a mask neither kernel takes): an XLA einsum path with the
  numerics of transformers' eager attention: logits accumulated in fp32, softmax in fp32,
  probabilities cast back to the value dtype. GQA is computed by grouping query heads, never by
  copying K/V.

The kernel is chosen for the platform of the devices a program is compiled for (ModelOptions.platform,
set from the mesh), not for the host's default backend: a compile for GPUs from a CPU host
(dcsft_jax.aot) must pick what the GPU will run.

Padding. Rows are right-padded (each row's real tokens come first), so a row's padding is described by
its length alone (`RightPadding`). cuDNN takes lengths natively (`query_seq_lengths`,
`key_value_seq_lengths`): no [B, 1, T, S] bias is built or differentiated. cuDNN refuses a mask that
broadcasts over queries ([B, 1, 1, S]); such masks are broadcast to [B, 1, T, S] before the call.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
LANES = 128           # Splash's block and lane size: sequences and head_dim are padded to multiples of it


@flax.struct.dataclass
class RightPadding:
  """Each row's first `lengths[b]` tokens are real, the rest padding (queries and keys alike)."""
  lengths: jax.Array            # int32 [B]

  def key_mask(self, S: int):
    """bool [B, 1, 1, S]: which keys are real."""
    return (jnp.arange(S)[None, :] < self.lengths[:, None])[:, None, None, :]


@flax.struct.dataclass
class Segments:
  """A query sees the keys of its own segment (T == S): ids [B, T] int32, e.g. the image or frame of
  each vision patch (padding patches share a segment of their own)."""
  ids: jax.Array

  def mask(self):
    """bool [B, 1, T, T]."""
    return (self.ids[:, :, None] == self.ids[:, None, :])[:, None]


def resolve(impl: str, dtype, head_dim: int, platform: str = "") -> str:
  """Turns 'auto' into the kernel that `platform` ('gpu', 'tpu', 'cpu'; '' = this host's default
  backend), dtype and shape can use."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS}")
  platform = platform or jax.default_backend()
  cudnn_ok = (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and head_dim % 8 == 0 and head_dim <= 128)
  if impl == "cudnn" and not cudnn_ok:
    raise ValueError(f"cuDNN attention needs a GPU, bf16/fp16 and head_dim % 8 == 0 <= 128 "
                     f"(platform={platform}, dtype={jnp.dtype(dtype).name}, head_dim={head_dim}); use 'auto'")
  if impl == "splash" and platform != "tpu":
    raise ValueError(f"Splash attention is a TPU kernel (platform={platform}); use 'auto'")
  if impl == "auto":
    return "cudnn" if cudnn_ok else "splash" if platform == "tpu" else "xla"
  return impl


def _xla_attention(q, k, v, mask, is_causal, scale):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  qg = q.reshape(B, T, K, G, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  allowed = None
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    # [B|1, N|1, T, S] -> [B|1, K|1, G|1, T, S] to line up with the grouped logits.
    allowed = mask.reshape(mask.shape[0], K, G, *mask.shape[2:]) if mask.shape[1] == N else mask[:, :, None]
  if is_causal:
    causal = jnp.tril(jnp.ones((T, S), bool), k=S - T)[None, None, None]
    allowed = causal if allowed is None else jnp.logical_and(allowed, causal)
  if allowed is not None:
    # A finite minimum (not -inf) keeps fully-masked rows (padding) finite, as transformers does.
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(B, T, N, H).astype(q.dtype)


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False, impl: str = "auto",
                          scale: float | None = None, platform: str = ""):
  """q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0; mask bool, broadcastable to [B, N, T, S], or
  a RightPadding (T == S: the rows' lengths).

  `is_causal` aligns the last query with the last key (T <= S), as a KV-cache append needs.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  kind = resolve(impl, q.dtype, q.shape[-1], platform)
  T, S = q.shape[1], k.shape[1]
  if kind == "splash" and mask is None and is_causal and T == S:
    mask = RightPadding(jnp.full((q.shape[0],), T, jnp.int32))
  if kind == "splash" and T == S and (isinstance(mask, Segments) or (isinstance(mask, RightPadding) and is_causal)):
    out = splash_attention(q, k, v, mask, is_causal=is_causal, scale=scale)
    if out is not None:
      return out
  if isinstance(mask, Segments):
    mask = mask.mask()
  if kind == "cudnn" and not (is_causal and T != S):
    if isinstance(mask, RightPadding):
      return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, query_seq_lengths=mask.lengths,
                                          key_value_seq_lengths=mask.lengths, implementation="cudnn")
    if mask is not None:
      mask = jnp.asarray(mask)
      mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
      mask = jnp.broadcast_to(mask, mask.shape[:2] + (T, S))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                                        implementation="cudnn")
  if isinstance(mask, RightPadding):
    mask = mask.key_mask(S)
  return _xla_attention(q, k, v, mask, is_causal, scale)


def splash_attention(q, k, v, mask, *, is_causal: bool, scale: float, interpret: bool = False):
  """Splash attention for q [B, T, N, H], k, v [B, T, K, H] under `mask` (RightPadding with is_causal,
  or Segments), or None where the current mesh cannot split the batch and heads evenly (the caller
  falls back to XLA's). Padding rows and padded positions get segment 0 / a segment of their own, so
  no query row is empty; their outputs are never read. interpret: run the kernel in Pallas' interpreter
  (tests on the CPU)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  B, T, N, H = q.shape
  K = k.shape[2]
  Tp, Hp = -(-T // LANES) * LANES, -(-H // LANES) * LANES
  if isinstance(mask, RightPadding):
    ids = (jnp.arange(Tp)[None, :] < mask.lengths[:, None]).astype(jnp.int32)    # 1 real, 0 padding
  else:
    ids = jnp.pad(mask.ids.astype(jnp.int32) + 1, ((0, 0), (0, Tp - T)))          # 0: padding slots
  mesh = _current_mesh()
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh is not None and a in mesh.shape)
  ways = 1
  for a in batch_axes:
    ways *= mesh.shape[a]
  heads = mesh.shape.get("tensor", 1) if mesh is not None else 1
  if B % ways or N % heads or K % heads:
    return None
  pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Hp - H))).transpose(0, 2, 1, 3)   # [B, heads, Tp, Hp]
  qp, kp, vp = pad(q * jnp.asarray(scale, q.dtype)), pad(k), pad(v)
  base = sm.CausalMask((Tp, Tp)) if is_causal else sm.FullMask((Tp, Tp))
  blocks = sk.BlockSizes(block_q=LANES, block_kv=LANES, block_kv_compute=LANES, block_q_dkv=LANES,
                         block_kv_dkv=LANES, block_kv_dkv_compute=LANES, block_q_dq=LANES, block_kv_dq=LANES)

  def local(qp, kp, vp, ids):
    kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * qp.shape[1]), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(qp, kp, vp, ids)

  if mesh is None or (ways == 1 and heads == 1):
    out = local(qp, kp, vp, ids)
  else:
    P = jax.sharding.PartitionSpec
    b = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    h = "tensor" if heads > 1 else None
    spec = P(b, h, None, None)
    out = _shard_map(local, mesh, (spec, spec, spec, P(b, None)), spec)(qp, kp, vp, ids)
  return out.transpose(0, 2, 1, 3)[:, :T, :, :H].astype(q.dtype)


def _current_mesh():
  """The mesh the program is traced under (mesh.use), or None."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get is not None else None
  if mesh is None or not getattr(mesh, "shape", None):
    return None
  return mesh


def _shard_map(fn, mesh, in_specs, out_specs):
  smap = getattr(jax, "shard_map", None)
  if smap is not None:
    return smap(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map
  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def shared_prefix_attention(q, prefix_k, prefix_v, k, v, prefix_mask, mask, *, scale: float | None = None):
  """Attention of rows that share a prompt prefix, without copying the prefix per row.

  q [B, T, N, H]; prefix_k/v [P, S0, K, H] with B = P * R (R consecutive rows per prefix, e.g. the
  K samples of one prompt); k/v [B, S, K, H] the rows' own cache; prefix_mask [P, S0] (which prefix
  slots are real tokens); mask broadcastable to [B, T, S] (which own slots each query sees).
  One softmax runs over [prefix, own] keys, so this equals attention over the concatenated cache;
  the prefix product is a matmul with R*G*T query rows per KV head instead of R copies.
  """
  B, T, N, H = q.shape
  P, S0, K = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
  R, G, S = B // P, N // K, k.shape[1]
  scale = H ** -0.5 if scale is None else scale
  qg = q.reshape(P, R, T, K, G, H)
  lp = jnp.einsum("prtkgh,pskh->pkgrts", qg, prefix_k, preferred_element_type=jnp.float32) * scale
  lo = jnp.einsum("prtkgh,prskh->pkgrts", qg, k.reshape(P, R, S, K, H), preferred_element_type=jnp.float32) * scale
  lo_mask = jnp.broadcast_to(jnp.asarray(mask), (B, T, S)).reshape(P, 1, 1, R, T, S)
  neg = jnp.finfo(jnp.float32).min
  lp = jnp.where(prefix_mask.reshape(P, 1, 1, 1, 1, S0), lp, neg)
  lo = jnp.where(lo_mask, lo, neg)
  probs = jax.nn.softmax(jnp.concatenate([lp, lo], axis=-1), axis=-1).astype(v.dtype)
  out = jnp.einsum("pkgrts,pskh->prtkgh", probs[..., :S0], prefix_v, preferred_element_type=jnp.float32)
  out = out + jnp.einsum("pkgrts,prskh->prtkgh", probs[..., S0:], v.reshape(P, R, S, K, H),
                         preferred_element_type=jnp.float32)
  return out.reshape(B, T, N, H).astype(q.dtype)


def decoder_attention(q, k, v, *, mask=None, cache=None, cache_index=0, prefix=None, dtype=None, impl: str = "auto",
                      platform: str = ""):
  """A decoder layer's causal self-attention over its KV cache, the same for every family -> (out, new cache).

  q [B, L, N, hd]; k, v [B, L, KV, hd] (rotary applied). Without a cache: causal attention over the L
  tokens, `mask` a RightPadding or None. A prefill (a cache of L slots written from 0) takes a
  RightPadding too. With a cache and any other mask ({'k','v'} [B, S, KV, hd]): k, v are written at
  `cache_index`, and the queries attend to the cache, `mask` saying which slots each may see (causality
  included); with `prefix` (a read-only {'k','v'} [P, S0, KV, hd] shared by groups of B/P rows, the K
  samples of a prompt) `mask` is (prefix_mask [P, S0], cache_mask [B, L, S]) and the prefix is read in place.
  """
  dtype = dtype or q.dtype
  if cache is None:
    return dot_product_attention(q, k, v, mask=mask, is_causal=True, impl=impl, platform=platform), None
  ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
  cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
  if isinstance(mask, RightPadding):
    # A prefill: the prompt fills the whole cache (a cache of exactly its length, so the write above
    # starts at slot 0 whatever the index: XLA clamps it), and attending over the cache is causal
    # attention over the prompt's own k, v (the fused kernels take it as lengths). The index may be
    # traced (remat, scan), so the check is on the shapes.
    if cache["k"].shape[1] != q.shape[1]:
      raise ValueError("a RightPadding mask with a cache is a prefill: a cache of the prompt's length "
                       f"({q.shape[1]}), got {cache['k'].shape[1]} slots")
    a = dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask=mask, is_causal=True, impl=impl,
                              platform=platform)
    return a, {"k": ck, "v": cv}
  if prefix is None:
    a = dot_product_attention(q, ck.astype(dtype), cv.astype(dtype), mask=mask, impl=impl, platform=platform)
  else:
    a = shared_prefix_attention(q, prefix["k"].astype(dtype), prefix["v"].astype(dtype), ck.astype(dtype),
                                cv.astype(dtype), *mask)
  return a, {"k": ck, "v": cv}
