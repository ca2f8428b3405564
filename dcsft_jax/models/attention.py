"""Scaled dot-product attention, with the fastest kernel the platform has.

- GPU, bf16/fp16, head_dim a multiple of 8 and <= 128: cuDNN flash attention through
  `jax.nn.dot_product_attention(implementation="cudnn")`.
- Everywhere else (CPU, TPU, fp32 on GPU): an XLA einsum path with the numerics of transformers'
  eager attention: logits accumulated in fp32, softmax in fp32, probabilities cast back to the
  value dtype. GQA is computed by grouping query heads, never by copying K/V.

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

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@flax.struct.dataclass
class RightPadding:
  """Each row's first `lengths[b]` tokens are real, the rest padding (queries and keys alike)."""
  lengths: jax.Array            # int32 [B]

  def key_mask(self, S: int):
    """bool [B, 1, 1, S]: which keys are real."""
    return (jnp.arange(S)[None, :] < self.lengths[:, None])[:, None, None, :]


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
  if impl == "auto":
    return "cudnn" if cudnn_ok else "xla"
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
  tokens, `mask` a RightPadding or None. With one ({'k','v'} [B, S, KV, hd]): k, v are written at
  `cache_index`, and the queries attend to the cache, `mask` saying which slots each may see (causality
  included); with `prefix` (a read-only {'k','v'} [P, S0, KV, hd] shared by groups of B/P rows, the K
  samples of a prompt) `mask` is (prefix_mask [P, S0], cache_mask [B, L, S]) and the prefix is read in place.
  """
  dtype = dtype or q.dtype
  if cache is None:
    return dot_product_attention(q, k, v, mask=mask, is_causal=True, impl=impl, platform=platform), None
  ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
  cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
  if prefix is None:
    a = dot_product_attention(q, ck.astype(dtype), cv.astype(dtype), mask=mask, impl=impl, platform=platform)
  else:
    a = shared_prefix_attention(q, prefix["k"].astype(dtype), prefix["v"].astype(dtype), ck.astype(dtype),
                                cv.astype(dtype), *mask)
  return a, {"k": ck, "v": cv}
