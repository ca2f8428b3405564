"""The Qwen2.5-VL-3B prefill of one ImageNet-sized image, counted by XLA (issue 31): the windowed ViT
blocks' attention by window blocks against the masked P x P.

XLA's cost analysis counts a scanned layer once (tests/test_cost_analysis.py), so each layer is
compiled on its own at the 3B's real widths: a full-attention ViT block, a windowed one (masked, then
by window blocks) and a decoder layer. The whole prefill is then

    base + 4 full blocks + 28 windowed blocks + 36 decoder layers

(the 3B's 32 ViT blocks, 4 of them full attention, and 36 decoder layers), with `base` what is left
outside the stacks (patch embedding, merger, embeddings, norms): the prefill program's figure, which
counts one layer of each stack, less those two layers. The vision tower's figures leave `base` out. Compile-only on this host's CPU: no
weights, no device memory.

  python benchmarks/prefill_flops.py [--grid 36] [--json benchmarks/prefill_flops.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dcsft_jax.models import params as params_lib  # noqa: E402
from dcsft_jax.models import qwen2_5_vl as M  # noqa: E402
from dcsft_jax.models.qwen2_5_vl import rope  # noqa: E402
from dcsft_jax.models.qwen2_5_vl.config import preset  # noqa: E402


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def _spec(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def prefill_flops(cfg, grid: int, text_tokens: int = 28) -> float:
  """FLOPs of the prefill (hidden states, no LM head) of one prompt: text_tokens + the image."""
  v = cfg.vision
  P = grid * grid
  lay = rope.vision_layout([(1, grid, grid)], v, P)
  n_img = P // v.merge_unit
  L = text_tokens + n_img
  ids = np.zeros((1, L), np.int32)
  ids[0, 8:8 + n_img] = cfg.image_token_id
  images = {**{k: jnp.asarray(a) for k, a in lay.items()},
            "pixel_values": jax.ShapeDtypeStruct((1, P, v.patch_dim), jnp.float32)}
  params = jax.tree.map(_spec, params_lib.unbox(M.init_params(cfg, abstract=True)))
  model = M.Qwen25VL(cfg)
  lay_arrays = {k: a for k, a in images.items() if k != "pixel_values"}
  return _flops(lambda p, px: model.apply({"params": p}, jnp.asarray(ids), jnp.zeros((3, 1, L), jnp.int32),
                                          {**lay_arrays, "pixel_values": px}, return_hidden=True),
                params, images["pixel_values"])


def stacks(cfg, vision_depth: int, vision_full: bool, text_layers: int = 1):
  v = dataclasses.replace(cfg.vision, depth=vision_depth,
                          fullatt_block_indexes=tuple(range(vision_depth)) if vision_full else ())
  return dataclasses.replace(cfg, vision=v, text=dataclasses.replace(cfg.text, num_hidden_layers=text_layers))


def attention_flops(v, grid: int) -> tuple[float, float]:
  """One windowed block's attention alone (16 heads of 80 for the 3B): (masked P x P, window blocks)."""
  from dcsft_jax.models import attention as attn_lib
  from dcsft_jax.models.layers import ModelOptions
  from dcsft_jax.models.qwen2_5_vl import model as model_lib
  P = grid * grid
  seg = jnp.asarray(rope.vision_layout([(1, grid, grid)], v, P)["window_seg"])
  x = jax.ShapeDtypeStruct((1, P, v.num_heads, v.head_dim), jnp.float32)
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  masked = _flops(lambda q, k, val: attn_lib.dot_product_attention(q, k, val, mask=mask), x, x, x)
  slot, patch = model_lib.window_slots(seg, rope.window_count(P, v), rope.window_block(v))
  blocks = _flops(lambda q, k, val: model_lib.window_attention(q, k, val, slot, patch, rope.window_block(v),
                                                               ModelOptions()), x, x, x)
  return masked, blocks


def layer_flops(cfg, grid: int, text_tokens: int = 28) -> dict:
  """FLOPs of one ViT block (full attention; windowed, masked and by blocks) and one decoder layer of
  the prefill, each compiled on its own with the 3B's widths."""
  from dcsft_jax.models.layers import ModelOptions
  from dcsft_jax.models.qwen2_5_vl import model as model_lib
  from dcsft_jax.models import rope as rope_lib
  v, t = cfg.vision, cfg.text
  P = grid * grid
  lay = rope.vision_layout([(1, grid, grid)], v, P)
  params = params_lib.unbox(M.init_params(cfg, abstract=True))
  first = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)
  vit, dec = first(params["visual"]["blocks"]), first(params["layers"])
  cos, sin = rope_lib.vision_cos_sin(jnp.asarray(lay["pos_hw"]), v.head_dim, v.rope_theta)
  fseg, wseg = jnp.asarray(lay["frame_seg"]), jnp.asarray(lay["window_seg"])
  from dcsft_jax.models.attention import Segments
  x = jax.ShapeDtypeStruct((1, P, v.hidden_size), jnp.float32)
  block = model_lib.VisionBlock(v, ModelOptions())
  run = lambda full, window: lambda p, h: block.apply({"params": p}, h, full, cos, sin, Segments(fseg), window)[0]
  slots = model_lib.window_slots(wseg, rope.window_count(P, v), rope.window_block(v))
  out = {"vit_full_block": _flops(run(True, Segments(wseg)), vit, x),
         "vit_windowed_block_masked": _flops(run(False, Segments(wseg)), vit, x),
         "vit_windowed_block_blocks": _flops(run(False, slots), vit, x)}
  L = text_tokens + P // v.merge_unit
  layer = model_lib.DecoderLayer(t, ModelOptions())
  cos, sin = rope_lib.mrope_cos_sin(jnp.zeros((3, 1, L), jnp.int32), t.head_dim, t.rope_theta, t.mrope_section,
                                    jnp.float32)
  h = jax.ShapeDtypeStruct((1, L, t.hidden_size), jnp.float32)
  out["decoder_layer"] = _flops(lambda p, h: layer.apply({"params": p}, h, None, cos, sin, None, 0)[0], dec, h)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--grid", type=int, default=36, help="patches a side (36: 504 px, 1,296 patches)")
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  cfg = preset("3b")
  v, t = cfg.vision, cfg.text
  P = a.grid * a.grid
  t0 = time.time()
  # XLA counts a scanned stack's layer once: the whole prefill's program is base + one ViT block + one
  # decoder layer in its figures, and each layer is also compiled on its own.
  per = layer_flops(cfg, a.grid)
  once = prefill_flops(stacks(cfg, 1, True), a.grid)
  full, win_masked, win_blocks, lm = (per[k] for k in ("vit_full_block", "vit_windowed_block_masked",
                                                       "vit_windowed_block_blocks", "decoder_layer"))
  base = once - full - lm
  n_full = len(v.fullatt_block_indexes)
  n_win = v.depth - n_full
  before = base + n_full * full + n_win * win_masked + t.num_hidden_layers * lm
  after = base + n_full * full + n_win * win_blocks + t.num_hidden_layers * lm
  att_masked, att_blocks = attention_flops(v, a.grid)
  g = lambda x: round(x / 1e9, 3)
  out = {"model": "Qwen2.5-VL-3B", "patches": P, "prompt_tokens": 28 + P // v.merge_unit,
         "window_blocks": rope.window_count(P, v), "block_patches": rope.window_block(v),
         "gflop": {"windowed_block_attention_masked": g(att_masked), "windowed_block_attention_blocks": g(att_blocks),
                   "vit_full_block": g(full), "vit_windowed_block_masked": g(win_masked),
                   "vit_windowed_block_blocks": g(win_blocks), "decoder_layer": g(lm), "outside_the_stacks": g(base),
                   "vision_tower_before": g(n_full * full + n_win * win_masked),
                   "vision_tower_after": g(n_full * full + n_win * win_blocks),
                   "prefill_before": g(before), "prefill_after": g(after)},
         "attention_cut": round(att_masked / att_blocks, 2), "windowed_block_cut": round(win_masked / win_blocks, 2),
         "prefill_cut": round(before / after, 3),
         "jax": jax.__version__, "device": jax.devices()[0].device_kind, "seconds": round(time.time() - t0, 1),
         "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/prefill_flops.py" +
         (f" --grid {a.grid}" if a.grid != 36 else "")}
  print(json.dumps(out, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
