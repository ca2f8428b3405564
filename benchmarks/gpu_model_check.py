"""GPU checks of the model port (issue 2), ready for whenever a GPU is at hand:

1. bf16 with cuDNN flash attention against the XLA path, on a random tiny model and a mixed batch;
2. the Qwen2.5-VL-3B-shaped forward (random bf16 weights, one 448x448 image + 20 question tokens):
   compile time, step time and peak memory.

  python benchmarks/gpu_model_check.py [--batch=8] [--skip_3b]

Prints one JSON object. On a CPU it runs part 1 on the XLA path only, at a smaller 3B stand-in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl import rope
from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig, tiny_config


def mixed_batch(cfg, rows, seed=0):
  """Right-padded ids, positions and images for rows of text lengths / image grids (no torch needed)."""
  rng = np.random.default_rng(seed)
  seqs, grids = [], []
  for row in rows:
    ids = []
    for item in row:
      if isinstance(item, int):
        ids += rng.integers(0, cfg.vision_start_token_id - 1, item).tolist()
      else:
        grids.append(item)
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (int(np.prod(item)) // 4) + [cfg.vision_end_token_id]
    seqs.append(ids)
  L = max(map(len, seqs))
  ids = np.zeros((len(seqs), L), np.int32)
  am = np.zeros((len(seqs), L), np.int32)
  for b, s in enumerate(seqs):
    ids[b, :len(s)], am[b, :len(s)] = s, 1
  pos, _ = rope.get_rope_index(ids, cfg, image_grid_thw=grids, attention_mask=am)
  P = max(int(np.prod(g)) for g in grids)
  images = {"pixel_values": rng.standard_normal((len(grids), P, cfg.vision.patch_dim)).astype(np.float32),
            **rope.vision_layout(grids, cfg.vision, P)}
  return ids, pos, images, am


def attention_kinds(out):
  cfg = tiny_config(hidden_size=512, num_heads=4, num_kv_heads=2, mrope_section=(16, 24, 24),
                    vision_hidden=320, vision_heads=4, vision_intermediate=256, intermediate_size=1024)
  params = M.init_params(cfg, M.ModelOptions(param_dtype=jnp.bfloat16), jax.random.PRNGKey(0))
  params = M.unbox(params)
  batch = mixed_batch(cfg, [[5, (1, 16, 20), 7], [3, (1, 28, 8), 4], [9]])
  m = batch[3].astype(bool)
  res = {}
  for impl in ("xla", "cudnn"):
    try:
      model = M.Qwen25VL(cfg, M.ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=impl))
      res[impl] = np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *batch), np.float32)
    except ValueError as e:
      out[f"attention_{impl}"] = f"unavailable: {e}"
  fp32 = M.Qwen25VL(cfg, M.ModelOptions(attention="xla"))
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  ref = np.asarray(jax.jit(lambda p, *a: fp32.apply({"params": p}, *a))(p32, *batch))
  scale = np.abs(ref[m]).max()
  for impl, v in res.items():
    out[f"bf16_{impl}_vs_fp32_rel"] = float(np.abs(v - ref)[m].max() / scale)
  if len(res) == 2:
    out["bf16_cudnn_vs_xla_rel"] = float(np.abs(res["cudnn"] - res["xla"])[m].max() / scale)


def forward_3b(out, batch_size, small):
  text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2)
  vision = VisionConfig(out_hidden_size=2048)
  if small:  # a CPU stand-in with the same structure
    text = TextConfig(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    vision = VisionConfig(depth=4, hidden_size=160, intermediate_size=256, num_heads=2, out_hidden_size=256,
                          fullatt_block_indexes=(3,))
  cfg = Qwen25VLConfig(text=text, vision=vision, tie_word_embeddings=True).validate()
  opts = M.ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = M.unbox(jax.jit(lambda r: M.init_params(cfg, opts, r))(jax.random.PRNGKey(0)))
  batch = mixed_batch(cfg, [[14, (1, 32, 32), 16]] * batch_size)
  model = M.Qwen25VL(cfg, opts)
  fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a, return_hidden=True))
  t0 = time.perf_counter()
  compiled = fwd.lower(params, *batch).compile()
  out["3b_compile_s"] = round(time.perf_counter() - t0, 2)
  compiled(params, *batch).block_until_ready()
  t0 = time.perf_counter()
  n = 5
  for _ in range(n):
    h = compiled(params, *batch)
  h.block_until_ready()
  dt = (time.perf_counter() - t0) / n
  out.update({"3b_params": M.count_params(params), "3b_batch": batch_size, "3b_prompt_tokens": batch[0].shape[1],
              "3b_forward_s": round(dt, 4), "3b_prompts_per_s": round(batch_size / dt, 2),
              "3b_finite": bool(np.isfinite(np.asarray(h, np.float32)).all())})
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--skip_3b", action="store_true")
  a = ap.parse_args()
  out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  attention_kinds(out)
  if not a.skip_3b:
    forward_3b(out, a.batch, small=jax.default_backend() == "cpu")
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
