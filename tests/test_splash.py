"""Splash attention, the TPU path (models/attention.py, issue 31), run here in Pallas' interpreter on
the CPU against XLA's attention: causal with right padding (the LM's training forward and prefill)
and segments (the vision tower's per-image blocks), GQA, head_dim and sequence padded to 128, values
and gradients. That the compiled TPU programs call the kernel is tests/test_aot.py's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcsft_jax.models import attention as A


def _qkv(B=2, T=40, N=4, K=2, H=16, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))


def test_splash_equals_xla_causal_with_right_padding_values_and_gradients():
  q, k, v = _qkv()
  lengths = jnp.asarray([40, 23], jnp.int32)
  mask = A.RightPadding(lengths)
  real = np.arange(40)[None, :] < np.asarray(lengths)[:, None]
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real[:, :, None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w)
  splash = lambda q, k, v: A.splash_attention(q, k, v, mask, is_causal=True, scale=16 ** -0.5, interpret=True)
  xla = lambda q, k, v: A._xla_attention(q, k, v, mask.key_mask(40), True, 16 ** -0.5)
  got, want = np.asarray(splash(q, k, v)), np.asarray(xla(q, k, v))
  # Two fused fp32 softmax orders (online vs one pass): fp32 reassociation.
  np.testing.assert_allclose(got[real], want[real], rtol=0, atol=2e-6 * np.abs(want[real]).max())
  g_got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  g_want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(np.asarray(b)).max())
  # It can tell: without causality the answer is another.
  other = np.asarray(A._xla_attention(q, k, v, mask.key_mask(40), False, 16 ** -0.5))
  assert np.abs(other[real] - want[real]).max() > 1e-2


def test_splash_equals_xla_within_segments_with_padding_patches():
  q, k, v = _qkv(B=2, T=48, N=3, K=3, H=20, seed=2)
  ids = np.full((2, 48), -1, np.int32)
  ids[0, :30], ids[0, 30:44] = 0, 1            # two frames, then padding patches
  ids[1, :48] = np.repeat(np.arange(3), 16)
  seg = A.Segments(jnp.asarray(ids))
  got = np.asarray(A.splash_attention(q, k, v, seg, is_causal=False, scale=0.3, interpret=True))
  want = np.asarray(A._xla_attention(q, k, v, seg.mask(), False, 0.3))
  real = ids >= 0
  np.testing.assert_allclose(got[real], want[real], rtol=0, atol=2e-6 * np.abs(want[real]).max())


def test_auto_picks_splash_on_tpu_and_the_masks_it_takes():
  assert A.resolve("auto", jnp.bfloat16, 128, "tpu") == "splash"
  assert A.resolve("auto", jnp.bfloat16, 128, "gpu") == "cudnn"
  assert A.resolve("auto", jnp.float32, 80, "cpu") == "xla"
  with pytest.raises(ValueError, match="Splash attention is a TPU kernel"):
    A.resolve("splash", jnp.float32, 128, "cpu")
