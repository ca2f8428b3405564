"""Adam's moments in bfloat16 (issue 31: `optimiser moments`, train/optim.py): half the optimizer
state's bytes, for the full fine-tuning that does not fit small slices otherwise. The rounding is
unbiased, the first update is Adam's own, and a short run of the tiny model ends where float32
moments end, within a tolerance stated below."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcsft_jax import mesh as mesh_lib
from dcsft_jax.data import batching, builtin
from dcsft_jax.data.processor import Processor
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl.config import tiny_config
from dcsft_jax.train import optim, trainer


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
  x = jnp.full((20000,), 1.0 + 3 * 2.0 ** -10, jnp.float32)      # between two bfloat16 values
  lo, hi = 1.0, 1.0 + 2.0 ** -7                                   # bfloat16's neighbours of x
  y = np.asarray(optim.stochastic_round(x, jax.random.key(1)).astype(jnp.float32))
  assert set(np.unique(y).tolist()) == {lo, hi}
  # P(hi) = (x - lo) / (hi - lo) = 3/8; 20,000 draws: standard error 0.0034.
  assert abs((y == hi).mean() - 3 / 8) < 0.02
  # Round to nearest would lose the whole increment every time.
  assert float(x[0].astype(jnp.bfloat16)) == lo
  # Exactly representable values stay.
  np.testing.assert_array_equal(np.asarray(optim.stochastic_round(jnp.asarray([0.5, -2.0, 0.0]), jax.random.key(0))
                                           .astype(jnp.float32)), [0.5, -2.0, 0.0])


def test_the_first_update_is_adams_and_the_state_is_half_the_bytes():
  oc = optim.OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, total_steps=10)
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32), "bias": jnp.ones(32)}
  grads = jax.tree.map(lambda p: jnp.sin(p * 3.0), params)
  fp32, bf16 = optim.optimizer(oc), optim.optimizer(dataclasses.replace(oc, moments="bfloat16"))
  s32, s16 = fp32.init(params), bf16.init(params)
  nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s))
  assert nbytes(s16) < 0.51 * nbytes(s32)
  u32, _ = fp32.update(grads, s32, params)
  u16, _ = bf16.update(grads, s16, params)
  # Step 1 updates from the float32 moments before they are stored: Adam's numbers.
  for a, b in zip(jax.tree.leaves(u32), jax.tree.leaves(u16)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match="moments 'float16' is not one of"):
    optim.OptimConfig(moments="float16")


def _run(moments: str, steps: int = 30) -> list[float]:
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
  proc = Processor.tiny(cfg=cfg)
  recs = builtin.load_builtin("train", limit=32)
  buckets = batching.auto_buckets(recs, proc, with_answers=True, max_buckets=1)
  it = batching.BatchIterator(recs, proc, batch_size=8, buckets=buckets, shuffle=True, seed=3, epochs=None)
  tc = trainer.TrainConfig(steps=steps, batch_size=8, save_every=1000,
                           optim=optim.OptimConfig(learning_rate=1e-3, total_steps=steps, warmup_ratio=0.1,
                                                   moments=moments))
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  import tempfile
  with tempfile.TemporaryDirectory() as d, mesh_lib.use(mesh):
    h = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, d).fit(it, progress=False)["history"]
  return [r["loss"] for r in h]


def test_bfloat16_moments_train_the_tiny_model_as_float32_moments_do():
  """Full fine-tuning of the tiny model, 30 steps at lr 1e-3 (warmup 3): the same data and start.
  Tolerance: the mean loss of the last 5 steps within 2% of float32's, and both fall by more than a
  third (the difference between the two runs is rounding, which the loss curve must not show)."""
  f32, b16 = _run("float32"), _run("bfloat16")
  assert f32[0] == b16[0]                                        # the same first step
  tail = lambda h: float(np.mean(h[-5:]))
  assert tail(f32) < 0.67 * f32[0] and tail(b16) < 0.67 * b16[0], (f32, b16)
  assert abs(tail(b16) - tail(f32)) <= 0.02 * tail(f32), (tail(f32), tail(b16))
