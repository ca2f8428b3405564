"""Logits, vision-tower and position parity of the Flax Qwen2.5-VL against transformers (fp32)."""
import numpy as np
import pytest
import torch

import hf_reference as R
import jax
from dcsft_jax import hf
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl import rope
from dcsft_jax.models.qwen2_5_vl.config import tiny_config

CONFIGS = {"untied_window56": tiny_config, "tied_window112": R.tiny_config_b}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(cfg, transformers model, its saved directory, our params loaded from that directory)."""
  cfg = CONFIGS[request.param]()
  hf_model = R.random_hf_model(cfg, seed=sorted(CONFIGS).index(request.param))
  d = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(d)
  loaded_cfg, params = hf.load_hf(str(d))
  assert loaded_cfg == cfg
  return cfg, hf_model, str(d), params


def _ours_logits(cfg, params, batch, **kw):
  ids, pos, images, am = batch.ours(cfg, **kw)
  model = M.Qwen25VL(cfg)
  return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, ids, pos, images, am))


def test_configs_cover_window_and_full_attention_tied_and_untied():
  a, b = tiny_config(), R.tiny_config_b()
  assert {a.tie_word_embeddings, b.tie_word_embeddings} == {True, False}
  for c in (a, b):
    assert c.vision.depth >= 4
    assert 0 < len(c.vision.fullatt_block_indexes) < c.vision.depth
    assert c.vision.window_merged >= 2


def test_logits_match_transformers(pair):
  cfg, hf_model, _, params = pair
  batch = R.make_batch(cfg, R.MIXED_ROWS, seed=1)
  grids = batch.image_grid_thw.tolist()
  assert len({tuple(g) for g in grids}) == 3 and all(h != w for _, h, w in grids[:2])  # non-square, distinct
  assert batch.attention_mask[2].sum() < batch.attention_mask.shape[1]                # a padded text-only row
  with torch.no_grad():
    ref = hf_model(**batch.hf_kwargs(cfg)).logits.numpy()
  ours = _ours_logits(cfg, params, batch)
  m = batch.attention_mask.astype(bool)
  rel = np.abs(ours - ref)[m].max() / np.abs(ref[m]).max()
  assert rel <= 1e-4, rel
  # A wrong position scheme is far outside the bound, so the test can tell (QWEN25VL.md §4.3).
  with torch.no_grad():
    kw = batch.hf_kwargs(cfg)
    kw.pop("mm_token_type_ids")
    flat = hf_model(**kw).logits.numpy()
  assert np.abs(flat - ref)[m].max() / np.abs(ref[m]).max() > 1e-3


def test_bucket_padding_does_not_change_logits(pair):
  cfg, _, _, params = pair
  batch = R.make_batch(cfg, R.MIXED_ROWS, seed=2)
  tight = _ours_logits(cfg, params, batch)
  padded = _ours_logits(cfg, params, batch, num_patches=192, num_images=5)
  m = batch.attention_mask.astype(bool)
  # Only float reassociation differs (other matmul shapes): far below any modelling error.
  np.testing.assert_allclose(padded[m], tight[m], rtol=0, atol=1e-5 * np.abs(tight[m]).max())


def test_vision_tower_matches_transformers(pair):
  cfg, hf_model, _, params = pair
  batch = R.make_batch(cfg, R.MIXED_ROWS, seed=3)
  with torch.no_grad():
    ref = hf_model.model.visual(torch.tensor(batch.pixel_values),
                                grid_thw=torch.tensor(batch.image_grid_thw)).pooler_output.numpy()
  _, _, images, _ = batch.ours(cfg, num_patches=160)
  feats, valid = jax.jit(lambda p, im: M.Qwen25VL(cfg).apply({"params": p}, im, method=M.Qwen25VL.encode_images))(
      params, images)
  ours = np.asarray(feats)[np.asarray(valid)]
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("rows", [R.MIXED_ROWS, [[2, (1, 4, 6), (1, 10, 2), 3], [(1, 2, 2)]], [[4], [7]]])
def test_rope_index_matches_transformers(pair, rows):
  cfg, hf_model, _, _ = pair
  batch = R.make_batch(cfg, rows, seed=4)
  types = rope.mm_token_types(batch.input_ids, cfg)
  grid = torch.tensor(batch.image_grid_thw) if len(batch.image_grid_thw) else None
  ref_pos, ref_delta = hf_model.model.get_rope_index(
      torch.tensor(batch.input_ids), torch.tensor(types), grid, attention_mask=torch.tensor(batch.attention_mask))
  pos, delta = rope.get_rope_index(batch.input_ids, cfg, image_grid_thw=batch.image_grid_thw,
                                   attention_mask=batch.attention_mask)
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_rope_index_worked_example():
  """QWEN25VL.md §4.3: 18 text tokens, an image of grid (1, 6, 10), then text."""
  cfg = tiny_config()
  ids = np.array([[1] * 18 + [cfg.image_token_id] * 15 + [2] * 3])
  pos, delta = rope.get_rope_index(ids, cfg, image_grid_thw=[[1, 6, 10]])
  assert (pos[:, 0, :18] == np.arange(18)).all()
  assert (pos[0, 0, 18:33] == 18).all()
  assert (pos[1, 0, 18:33] == np.repeat([18, 19, 20], 5)).all()
  assert (pos[2, 0, 18:33] == np.tile(np.arange(18, 23), 3)).all()
  assert (pos[:, 0, 33:] == np.arange(23, 26)).all()
  assert delta[0] == 26 - 36


def test_vision_windows_follow_transformers_window_index():
  """Our window segments group exactly the patches that transformers' window_index groups."""
  from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hfm
  cfg = tiny_config()
  grids = [[1, 6, 10], [1, 14, 4], [1, 8, 8]]
  lay = rope.vision_layout(grids, cfg.vision)
  import inspect
  kw = {}
  if "kwargs" in inspect.signature(hfm.get_vision_window_index).parameters:
    kw["kwargs"] = {}
  index, cu = hfm.get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=cfg.vision.window_size,
                                          patch_size=14, **kw)
  index, cu = index.numpy(), np.unique(cu.numpy())
  # Windows of the permuted merged sequence, as sets of (image, merged token) pairs.
  offsets = np.cumsum([0] + [t * h * w // 4 for t, h, w in grids])
  theirs = {frozenset(int(i) for i in index[a // 4:b // 4]) for a, b in zip(cu[:-1], cu[1:])}
  ours = set()
  for img, seg in enumerate(lay["window_seg"]):
    merged = seg[::4]
    for s in np.unique(merged[merged >= 0]):
      ours.add(frozenset((offsets[img] + np.flatnonzero(merged == s)).tolist()))
  assert ours == theirs


def test_model_options_attention_kinds():
  from dcsft_jax.models import attention
  import jax.numpy as jnp
  assert attention.resolve("auto", jnp.bfloat16, 128) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  assert attention.resolve("auto", jnp.float32, 128) == "xla"
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="cuDNN"):
      attention.resolve("cudnn", jnp.bfloat16, 128)
  with pytest.raises(ValueError):
    attention.resolve("flash", jnp.float32, 64)


def test_xla_attention_matches_naive_reference():
  from dcsft_jax.models import attention
  rng = np.random.default_rng(0)
  B, T, S, N, K, H = 2, 3, 7, 6, 2, 8
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  v = rng.standard_normal((B, S, K, H)).astype(np.float32)
  mask = rng.random((B, 1, T, S)) > 0.3
  mask[..., -1] = True
  out = np.asarray(attention.dot_product_attention(q, k, v, mask=mask, is_causal=True, impl="xla"))
  kk, vv = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(H)
  allowed = mask & np.tril(np.ones((T, S), bool), k=S - T)[None, None]
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = np.einsum("bnts,bsnh->btnh", p, vv)
  np.testing.assert_allclose(out, ref, atol=1e-5)
