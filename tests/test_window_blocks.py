"""Qwen2.5-VL's windowed vision blocks attend by window blocks (issue 31): [windows, 64, 64], not a
masked P x P. The same numbers as the masked form (partial windows, padding images, several frames),
an image too thin for its bucket's window slots gets a larger bucket (never a wrong answer), and the
attention work of a windowed block at 1,296 patches falls more than tenfold (XLA's cost analysis)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as R
from dcsft_jax.data import batching
from dcsft_jax.models import attention as attn_lib
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.layers import ModelOptions
from dcsft_jax.models.qwen2_5_vl import model as model_lib
from dcsft_jax.models.qwen2_5_vl import rope
from dcsft_jax.models.qwen2_5_vl.config import VisionConfig, preset, tiny_config

CONFIGS = {"window56": lambda: tiny_config().vision, "window112": lambda: R.tiny_config_b().vision}


def _masked(q, k, v, seg):
  mask = jnp.asarray((seg[:, :, None] == seg[:, None, :])[:, None])
  return attn_lib.dot_product_attention(q, k, v, mask=mask)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_window_blocks_equal_the_masked_form_with_partial_windows(name):
  v = CONFIGS[name]()
  m = v.spatial_merge_size * v.window_merged        # a window's side in patches
  # Partial windows on the right, at the bottom and both; an image smaller than one window; no image;
  # two frames (each its own windows).
  grids = [(1, m + 2, 2 * m + 4), (1, 2 * m, 2 * m), None, (1, 2, 4), (2, m, m + 2), (1, 2 * m + 2, m)]
  P = max(g[0] * g[1] * g[2] for g in grids if g)
  P = -(-P // 64) * 64
  assert rope.use_window_blocks(P, v)
  lay = rope.vision_layout(grids, v, P)
  W, B = rope.window_count(P, v), rope.window_block(v)
  slot, patch = model_lib.window_slots(jnp.asarray(lay["window_seg"]), W, B)
  # Every real patch has its own slot, in its window's block; the slots map back.
  seg = lay["window_seg"]
  for i in range(len(grids)):
    real = np.flatnonzero(seg[i] >= 0)
    s = np.asarray(slot[i])[real]
    assert len(set(s.tolist())) == len(real) and np.all(s // B == seg[i][real])
    np.testing.assert_array_equal(np.asarray(patch[i])[s], real)
  rng = np.random.default_rng(0)
  I, H, hd = len(grids), 3, 8
  q, k, val = (jnp.asarray(rng.normal(size=(I, P, H, hd)) * 2, jnp.float32) for _ in range(3))
  blocked = np.asarray(model_lib.window_attention(q, k, val, slot, patch, B, ModelOptions()))
  want = np.asarray(_masked(q, k, val, seg))
  real = seg >= 0
  # The same softmax over the same keys, summed over B slots instead of P: fp32 reassociation.
  np.testing.assert_allclose(blocked[real], want[real], rtol=0, atol=1e-6 * np.abs(want[real]).max())
  # And it can tell: a window's neighbour is a different answer.
  wrong = np.asarray(_masked(q, k, val, np.where(seg >= 0, seg // 2, -1)))
  assert np.abs(wrong[real] - want[real]).max() > 1e-2


def test_the_vision_tower_by_blocks_equals_it_masked(monkeypatch):
  cfg = R.tiny_config_b()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(3)))
  batch = R.make_batch(cfg, R.MIXED_ROWS, seed=5)
  _, _, images, _ = batch.ours(cfg, num_patches=256)
  assert rope.use_window_blocks(256, cfg.vision)
  run = lambda: np.asarray(jax.jit(lambda p, im: M.Qwen25VL(cfg).apply(
      {"params": p}, im, method=M.Qwen25VL.encode_images)[0])(params, images))
  blocked = run()
  monkeypatch.setattr(rope, "use_window_blocks", lambda P, v: False)
  masked = run()
  valid = np.asarray(images["frame_seg"])[:, ::cfg.vision.merge_unit] >= 0
  np.testing.assert_allclose(blocked[valid], masked[valid], rtol=0, atol=1e-5 * np.abs(masked[valid]).max())


def test_a_thin_image_gets_a_bucket_that_holds_its_windows():
  v = preset("3b").vision
  square, thin = (1, 36, 36), (1, 4, 324)               # 1,296 patches each
  assert rope.patch_room(square, v) == 1296
  room = rope.patch_room(thin, v)
  assert room > 1296 and rope.window_count(room, v) >= rope.windows_of(thin, v)
  rope.vision_layout([square], v, 1296)
  with pytest.raises(ValueError, match=r"grid \(1, 4, 324\) has 41 attention windows, more than the 30 .* "
                                       rf"bucket of at least {room} patches"):
    rope.vision_layout([thin], v, 1296)
  rope.vision_layout([thin, square], v, room)
  # A thin strip small enough to be masked at its own size (2 x 50 patches, 7 windows) must not land in
  # a larger bucket that attends by blocks with fewer slots than its windows (the review's case).
  strip = (1, 2, 50)
  r = rope.patch_room(strip, v)
  assert rope.windows_of(strip, v) == 7 and r > 100
  for P in range(r, r + 2000, 4):
    rope.vision_layout([strip], v, P)
  # The batcher's buckets come from the room (Processor.measure), so such a record never meets the error.
  assert batching.choose(batching.make_buckets([1296, room], 64), room, 10) == 1


def _attention_flops(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"]


def test_a_windowed_blocks_attention_work_falls_tenfold_at_1296_patches():
  """The 3B's vision attention (16 heads of 80) for one ImageNet-sized image, 1,296 patches (36 x 36):
  the masked P x P against the window blocks, counted by XLA's cost analysis of each program."""
  v: VisionConfig = preset("3b").vision
  P, H, hd = 1296, v.num_heads, v.head_dim
  W, B = rope.window_count(P, v), rope.window_block(v)
  lay = rope.vision_layout([(1, 36, 36)], v, P)
  seg = jnp.asarray(lay["window_seg"])
  x = ((1, P, H, hd), jnp.float32)
  masked = _attention_flops(lambda q, k, val: _masked(q, k, val, seg), x, x, x)
  slot, patch = model_lib.window_slots(seg, W, B)
  blocked = _attention_flops(lambda q, k, val: model_lib.window_attention(q, k, val, slot, patch, B, ModelOptions()),
                             x, x, x)
  # Two P x P x hd products per head against W x 64 x 64 x hd: 1296 / (30 x 64 x 64 / 1296) = 13.7x.
  assert masked > 2 * 2 * H * P * P * hd * 0.99
  assert masked / blocked >= 10, (masked, blocked)
