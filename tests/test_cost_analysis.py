"""What scoring costs, counted by XLA: one prefill per prompt plus K cheap decodes, not K prefills.

`jax.jit(f).lower(...).compile().cost_analysis()` reports the FLOPs of the compiled program. What
XLA on the CPU really reports for the sampler's `decode` (checked below, not assumed): its
`lax.while_loop` body is counted ONCE, whatever max_new_tokens is (the loop exits early once every
row has ended, so its trip count is not static). The same holds for the `nn.scan` over the stacked
layers: every figure counts ONE decoder layer (and one ViT block), whatever the depth. So
`decode`'s figure is the per-step cost of one layer (plus the first token's choice), and a whole
generation costs about
    prefill + (T - 1) * decode_step
in these units. Ratios between programs of the same model are unaffected, and they are what the
tests assert on.
The tests assert on those measured pieces:
- prefill takes no K at all, and its FLOPs are the same program whatever K the decode runs;
- a decode step grows ~linearly in K (K rows of weights-times-vector work);
- the total for K=8 is far below 8 x (prefill + decode at K=1) when the prompt is long;
- the naive baseline, which repeats each prompt K times before the prefill (what transformers'
  num_return_sequences does), pays ~K times the prefill FLOPs;
- running the sampler twice on same-shaped batches compiles prefill and decode once each.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import hf_reference as R
from dcsft_jax import sampling
from dcsft_jax.models import qwen2_5_vl as model_lib
from dcsft_jax.models.qwen2_5_vl import rope
from dcsft_jax.models.qwen2_5_vl.config import tiny_config

B = 2            # prompts
K = 8            # samples per prompt
T = 4            # new tokens: short answers, as in the paper (one word)


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def _arrays(cfg, rows: int, *, text: int = 60, grid=(1, 8, 8), seed: int = 0):
  """Sampler inputs for `rows` same-length prompts: `text` tokens, one image, 4 more tokens."""
  b = R.make_batch(cfg, [[text, grid, 4]] * rows, seed=seed)
  ids, pos, images, am = b.ours(cfg)
  _, deltas = rope.get_rope_index(b.input_ids, cfg, image_grid_thw=b.image_grid_thw, attention_mask=b.attention_mask)
  return {"input_ids": ids, "positions": pos, "attention_mask": am, "lengths": am.sum(1).astype(np.int32),
          "rope_deltas": deltas.astype(np.int32), **images}


def _images(a):
  return {k: a[k] for k in ("pixel_values", "pos_hw", "frame_seg", "window_seg")}


def _prefill_args(a):
  return a["input_ids"], a["positions"], a["attention_mask"], a["lengths"], _images(a)


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  params = model_lib.unbox(model_lib.init_params(cfg, rng=jax.random.PRNGKey(0)))
  sampler = sampling.Sampler(cfg)
  a = _arrays(cfg, B)
  prefill_flops = _flops(sampler.prefill.lower(params, *_prefill_args(a)).compile())
  logits, prefix, prefix_mask = sampler.prefill(params, *_prefill_args(a))
  start = a["lengths"] + a["rope_deltas"]

  @functools.lru_cache(maxsize=None)
  def decode_flops(k, t=T):
    sp = sampling.SamplingParams(max_new_tokens=t, num_samples=k, temperature=0.9, top_k=50)
    keys = np.zeros((B, k, 2), np.uint32)
    return _flops(sampler.decode.lower(params, prefix, prefix_mask, logits, start, keys, params_=sp).compile())

  return cfg, params, sampler, a, prefill_flops, decode_flops


def test_loop_bodies_are_counted_once(setup):
  """What XLA CPU reports: decode's FLOPs hardly change from 4 to 16 new tokens (the loop body is
  counted once), and the prefill's hardly change from 3 to 6 decoder layers (the layer scan's body
  is counted once). The other tests rely on this reading: decode_flops ~ one step of one layer."""
  *_, decode_flops = setup
  f4, f16 = decode_flops(K, 4), decode_flops(K, 16)
  assert f16 < 1.2 * f4, (f4, f16)
  by_depth = []
  for layers in (3, 6):
    cfg = tiny_config(text_layers=layers)
    params = jax.eval_shape(lambda: model_lib.unbox(model_lib.init_params(cfg, rng=jax.random.PRNGKey(0))))
    a = _arrays(cfg, B)
    by_depth.append(_flops(sampling.Sampler(cfg).prefill.lower(params, *_prefill_args(a)).compile()))
  assert by_depth[1] < 1.05 * by_depth[0], by_depth


def test_prefill_takes_no_k_and_its_cost_is_a_prompt_forward(setup):
  cfg, params, sampler, a, prefill_flops, _ = setup
  # The prefill's signature has no K: the K samples only exist in decode.
  lowered = sampler.prefill.lower(params, *_prefill_args(a))
  assert _flops(lowered.compile()) == prefill_flops
  # Its FLOPs are at least one decoder layer's weights times the prompt tokens (2 * N * tokens;
  # one layer, as the layer scan's body is counted once).
  t = cfg.text
  layer = (t.hidden_size * t.head_dim * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
           + 3 * t.hidden_size * t.intermediate_size)
  floor = 2 * layer * int(a["attention_mask"].sum())
  assert floor < prefill_flops < 20 * floor, (floor, prefill_flops)


def test_decode_step_grows_linearly_in_k(setup):
  *_, decode_flops = setup
  f1, f8 = decode_flops(1), decode_flops(K)
  assert 0.8 * K <= f8 / f1 <= 1.1 * K, (f1, f8, f8 / f1)


def test_k_samples_cost_one_prefill_not_k(setup):
  cfg, params, sampler, a, prefill_flops, decode_flops = setup
  step1, step8 = decode_flops(1), decode_flops(K)
  # A whole generation: one prefill, then T - 1 loop steps (the loop body counted once per step).
  ours_k8 = prefill_flops + (T - 1) * step8
  one_sample = prefill_flops + (T - 1) * step1
  assert ours_k8 < 0.3 * K * one_sample, (ours_k8, one_sample)
  # The prompt dominates a short answer: K samples cost less than 2 prompts' worth.
  assert ours_k8 < 2 * one_sample, (ours_k8, one_sample)

  # The naive baseline (transformers' num_return_sequences): the prompt repeated K times, then a
  # prefill over B*K rows. Its prefill alone costs ~K times ours.
  naive = _arrays(cfg, B * K)
  naive_prefill = _flops(sampler.prefill.lower(params, *_prefill_args(naive)).compile())
  assert 0.9 * K <= naive_prefill / prefill_flops <= 1.1 * K, naive_prefill / prefill_flops
  naive_total = naive_prefill + (T - 1) * step8
  assert naive_total > 4 * ours_k8, (naive_total, ours_k8)


def test_same_shapes_compile_once(setup):
  cfg, params, _, _, _, _ = setup
  sampler = sampling.Sampler(cfg)        # fresh jit caches
  sp = sampling.SamplingParams(max_new_tokens=T, num_samples=K, temperature=0.9, top_k=50)
  compiles = []

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    outs = []
    for seed in (1, 2):   # same shapes, different tokens, pixels and keys
      a = _arrays(cfg, B, seed=seed)
      keys = sampling.sample_keys(seed, [f"r{i}" for i in range(B)], K)
      tok, _, _ = sampler.generate(params, a, keys, sp)
      outs.append(np.asarray(tok))
      if seed == 1:
        first = len(compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  if hasattr(sampler.prefill, "_cache_size"):    # a private API: checked where this JAX has it
    assert sampler.prefill._cache_size() == 1 and sampler.decode._cache_size() == 1
  # The first run compiled at least prefill and decode.
  assert first >= 2, compiles
  # The second run compiled nothing at all (no prefill, no decode, no stray eager op).
  assert len(compiles) == first, compiles
  assert (outs[0] != outs[1]).any()
