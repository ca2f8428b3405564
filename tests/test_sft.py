"""The SFT step: loss and gradients equal transformers', overfitting works (full and LoRA),
accumulation equals one big batch, sharded equals single device."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as R
import numerics
from dcsft_jax import hf
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.data import batching, builtin
from dcsft_jax.data.processor import Processor
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl.config import tiny_config
from dcsft_jax.train import optim, sft, trainer


def _batch(cfg, rows=R.MIXED_ROWS, seed=1):
  b = R.make_batch(cfg, rows, seed=seed)
  ids, pos, images, am = b.ours(cfg)
  rng = np.random.default_rng(seed)
  loss_mask = am * (rng.random(am.shape) < 0.6)
  arrays = {"input_ids": ids, "positions": pos, "attention_mask": am, "loss_mask": loss_mask.astype(np.int32),
            "valid": np.ones(len(ids), bool), **images}
  return b, arrays


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  cfg = tiny_config()
  model = R.random_hf_model(cfg, seed=11)
  d = tmp_path_factory.mktemp("hf")
  model.save_pretrained(d)
  _, params = hf.load_hf(str(d))
  return cfg, model, params


def test_loss_and_gradients_match_transformers(pair):
  cfg, hf_model, params = pair
  b, arrays = _batch(cfg)
  labels = np.where(arrays["loss_mask"] > 0, b.input_ids, -100)
  hf_model.zero_grad()
  out = hf_model(**b.hf_kwargs(cfg), labels=torch.tensor(labels))
  out.loss.backward()
  theirs = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}

  model = M.Qwen25VL(cfg)

  def mean_loss(p):
    s, n = sft.sft_loss(model, p, arrays, jax.random.key(0))
    return s / n

  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
  assert abs(float(loss) - out.loss.item()) <= 1e-5 * abs(out.loss.item())
  ours = dict(hf.hf_tensors(grads, cfg, np.float32))
  assert set(ours) <= set(hf.canonical_name(n) for n in theirs) | set(theirs)
  worst = 0.0
  for name, g in theirs.items():
    mine = ours[hf.canonical_name(name)]
    scale = np.abs(g).max()
    assert scale > 0, name
    worst = max(worst, np.abs(mine - g).max() / scale)
  assert worst <= 1e-4, worst


def _digit_batches(cfg, n=8, accum=1):
  proc = Processor.tiny(cfg=cfg)
  recs = builtin.load_builtin("train", limit=n)
  buckets = batching.auto_buckets(recs, proc, with_answers=True, max_buckets=1)
  it = batching.BatchIterator(recs, proc, batch_size=n, buckets=buckets, shuffle=False)
  arrays = next(iter(it)).arrays
  it.close()
  stack = {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) if k != "positions"
           else v.reshape(3, accum, -1, v.shape[-1]).transpose(1, 0, 2, 3) for k, v in arrays.items()}
  return stack


@pytest.mark.parametrize("lora", [False, True])
def test_overfits_a_small_set(lora):
  cfg = tiny_config()
  spec = M.LoraSpec(rank=8, alpha=16, dropout=0.0) if lora else None
  opts = M.ModelOptions(lora=spec)
  params = M.unbox(M.init_params(cfg, opts, jax.random.PRNGKey(0)))
  # init's 0.02-std head behind the final RMSNorm caps every logit near 1; a frozen head (LoRA)
  # could then never reach a low loss, so give it a realistic scale.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 25
  oc = optim.OptimConfig(learning_rate=3e-3, warmup_ratio=0.0, schedule="constant",
                         weight_decay=0.0, total_steps=60)
  tx = optim.optimizer(oc)
  mask = optim.trainable_mask(params, lora=lora)
  state = sft.init_state(params, tx, mask, jax.random.key_data(jax.random.key(0)))
  if lora:
    n_train = sum(x.size for x in jax.tree.leaves(state.train))
    assert 0 < n_train < M.count_params(params) // 5
  before = jax.tree.map(np.asarray, params)   # the step donates the state, frozen leaves included
  step = sft.make_train_step(cfg, opts, tx, optim.schedule(oc))
  batch = _digit_batches(cfg, 4)
  losses = []
  for _ in range(60):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[0] > 3.0 and losses[-1] < 0.05, losses[::10]
  if lora:
    # Only adapters moved.
    final = state.params
    for path, x in jax.tree_util.tree_flatten_with_path(before)[0]:
      y = final
      for k in path:
        y = y[k.key]
      if path[-1].key not in ("lora_a", "lora_b"):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_accumulation_equals_one_big_batch():
  """4 accumulated micro-batches of 2 and one batch of 8 are the same mathematics (the loss is the sum
  over the 8 examples' target tokens divided by their count): equal loss, gradient and one SGD step.
  Only the summation order differs, so the tolerances are fp32 reassociation (tests/numerics.py)."""
  import optax
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(1)))
  before = jax.tree.map(np.asarray, params)
  tx = optax.sgd(1.0)
  mask = optim.trainable_mask(params, lora=False)
  step = sft.make_train_step(cfg, M.ModelOptions(), tx, lambda s: 1.0)
  out = []
  for accum in (1, 4):
    state = sft.init_state(jax.tree.map(jnp.copy, params), tx, mask, jax.random.key_data(jax.random.key(0)))
    state, m = step(state, _digit_batches(cfg, 8, accum))
    out.append((jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in m.items()}))
  (one, m1), (acc, m4) = out
  assert m1["tokens"] == m4["tokens"] > 8
  # The loss: a mean of ~30 fp32 token losses of size ~6 summed in another order, each from a
  # log-softmax over a batch of another shape: n * u ~ 2e-6 at worst; typically a few ulps.
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=numerics.REASSOCIATION)
  # The global gradient norm: a sum of 56k squares, each gradient carrying reassociation noise.
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=numerics.REASSOCIATION)
  # SGD with lr 1: each leaf moves by exactly its gradient (plus one rounding per weight).
  numerics.assert_sgd_steps_close(before, acc, one)


def test_sharded_training_equals_single_device():
  """The same steps on a 2x2x2 mesh (weights, moments and batch really split) and on one device.

  Three AdamW steps: the loss and gradient norm of each step agree to fp32 reassociation (the sharded
  program sums partial products across devices in another order). Weights after Adam are not compared:
  Adam divides each gradient by its own running magnitude, so the reassociation noise of a near-zero
  gradient can move its weight by a whole step of lr. The weights are compared after one SGD step
  instead, which moves each weight by exactly its gradient."""
  import optax
  cfg = tiny_config()
  opts = M.ModelOptions()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(2)))
  before = jax.tree.map(np.asarray, params)
  batch = _digit_batches(cfg, 8, 1)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  mask = optim.trainable_mask(params, lora=False)
  oc = optim.OptimConfig(learning_rate=1e-3, warmup_ratio=0.0, total_steps=3)
  runs = {}
  for name, tx, sched, n in (("adam", optim.optimizer(oc), optim.schedule(oc), 3),
                             ("sgd", optax.sgd(1.0), lambda s: 1.0, 1)):
    step = sft.make_train_step(cfg, opts, tx, sched)
    state = sft.init_state(jax.tree.map(jnp.copy, params), tx, mask, jax.random.key_data(jax.random.key(0)))
    single = []
    for _ in range(n):
      state, m = step(state, batch)
      single.append((float(m["loss"]), float(m["grad_norm"])))
    single_params = jax.tree.map(np.asarray, state.params)
    with mesh_lib.use(mesh):
      shard = mesh_lib.param_shardings(M.init_params(cfg, abstract=True), mesh)
      state = sft.init_state(jax.device_put(params, shard), tx, mask, jax.random.key_data(jax.random.key(0)))
      gbatch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim, 2 if k == "positions" else 1))
                for k, v in batch.items()}
      step = sft.make_train_step(cfg, opts, tx, sched)
      sharded = []
      for _ in range(n):
        state, m = step(state, gbatch)
        sharded.append((float(m["loss"]), float(m["grad_norm"])))
      emb = state.params["embed_tokens"]["embedding"]
      assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
    runs[name] = (single, sharded, single_params, jax.tree.map(np.asarray, state.params))
  single, sharded, _, _ = runs["adam"]
  # Steps 2 and 3 start from Adam-updated weights; where noise moved a weight by up to lr, its
  # gradient is near zero, so the loss moves by ~|g| * lr: far below the reassociation tolerance.
  np.testing.assert_allclose(sharded, single, rtol=numerics.REASSOCIATION)
  _, _, single_params, sharded_params = runs["sgd"]
  numerics.assert_sgd_steps_close(before, sharded_params, single_params)


@pytest.mark.parametrize("freeze_vit,freeze_aligner", [(True, False), (False, True)])
def test_freeze_switches_keep_their_part_fixed(freeze_vit, freeze_aligner):
  """freeze_vit keeps the ViT blocks (patch embedding included) fixed and trains the aligner and
  the LLM; freeze_aligner the reverse for the merger. Frozen leaves get no optimizer moments."""
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(2)))
  oc = optim.OptimConfig(learning_rate=1e-3, warmup_ratio=0.0, total_steps=2)
  tx = optim.optimizer(oc)
  mask = optim.trainable_mask(params, lora=False, freeze_vit=freeze_vit, freeze_aligner=freeze_aligner)
  before = jax.tree.map(np.asarray, params)
  state = sft.init_state(params, tx, mask, jax.random.key_data(jax.random.key(0)))
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_moments == 2 * sum(x.size for x in jax.tree.leaves(state.train))
  step = sft.make_train_step(cfg, M.ModelOptions(), tx, optim.schedule(oc))
  state, _ = step(state, _digit_batches(cfg, 4))
  after = state.params
  moved = {}
  for path, x in jax.tree_util.tree_flatten_with_path(before)[0]:
    names = [k.key for k in path]
    y = after
    for k in names:
      y = y[k]
    part = ("aligner" if names[1] in ("ln_q", "mlp_0", "mlp_2") else "vit") if names[0] == "visual" else "llm"
    moved.setdefault(part, []).append(not np.array_equal(x, np.asarray(y)))
  assert not any(moved["vit"]) if freeze_vit else all(moved["vit"])
  assert not any(moved["aligner"]) if freeze_aligner else all(moved["aligner"])
  assert all(moved["llm"])


def test_bf16_compute_with_fp32_master_weights():
  """bf16 compute, fp32 params and Adam moments: the loss tracks fp32's to bf16 precision, the
  master weights stay fp32, and training still drives the loss down."""
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(3)))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 25
  oc = optim.OptimConfig(learning_rate=3e-3, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                         total_steps=20)
  tx = optim.optimizer(oc)
  mask = optim.trainable_mask(params, lora=False)
  batch = _digit_batches(cfg, 4)
  losses = {}
  for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
    opts = M.ModelOptions(dtype=dtype, param_dtype=jnp.float32)
    state = sft.init_state(jax.tree.map(jnp.copy, params), tx, mask, jax.random.key_data(jax.random.key(0)))
    step = sft.make_train_step(cfg, opts, tx, optim.schedule(oc))
    losses[name] = []
    for _ in range(20):
      state, m = step(state, batch)
      losses[name].append(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
  # bf16 keeps 8 significant bits (relative rounding 2**-9 ~ 2e-3 per cast); the first loss passes
  # through ~10 casts and matmuls of the tiny model, whose errors partly cancel: 2e-2 is 10 such roundings.
  np.testing.assert_allclose(losses["bf16"][0], losses["fp32"][0], rtol=2e-2)
  assert np.all(np.isfinite(losses["bf16"])) and losses["bf16"][-1] < 0.3 * losses["bf16"][0], losses["bf16"][::5]


def test_lora_on_a_bf16_frozen_base():
  """model.frozen_in_compute_dtype: under LoRA the frozen base is stored in bf16, the adapters and
  their Adam moments stay fp32. The layers cast every weight to the compute dtype, so in a bf16 run
  the gradients are those of the fp32-stored base (only XLA's fusion may reassociate), and they track
  the all-fp32 run to bf16 precision."""
  import optax
  cfg = tiny_config()
  lora = M.LoraSpec(rank=8, alpha=16, dropout=0.0)
  base = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(7)))
  params = trainer.init_lora(base, cfg, lora, seed=3)
  # Non-zero B, so that A gets a gradient too.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if "lora_b" in str(p) else x,
      params)
  before = jax.tree.map(np.asarray, params)
  mask = optim.trainable_mask(params, lora=True)
  tx = optax.sgd(1.0)
  batch = _digit_batches(cfg, 4)
  runs = {}
  for name, dtype, frozen in (("fp32", jnp.float32, None), ("bf16", jnp.bfloat16, None),
                              ("bf16_base", jnp.bfloat16, jnp.bfloat16)):
    opts = M.ModelOptions(dtype=dtype, param_dtype=jnp.float32, lora=lora)
    state = sft.init_state(jax.tree.map(jnp.copy, params), tx, mask, jax.random.key_data(jax.random.key(0)), frozen)
    if frozen is not None:
      assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.train)} == {jnp.dtype(jnp.float32)}
    state, m = sft.make_train_step(cfg, opts, tx, lambda s: 1.0)(state, batch)
    runs[name] = (float(m["loss"]), jax.tree.map(np.asarray, state.train))
  (l32, w32), (l16, w16), (lb, wb) = runs["fp32"], runs["bf16"], runs["bf16_base"]
  # Same bf16 weights reach the matmuls either way: equal up to reassociation.
  np.testing.assert_allclose(lb, l16, rtol=numerics.REASSOCIATION)
  adapters = optim.split(before, mask)[0]
  numerics.assert_sgd_steps_close(adapters, wb, w16)
  # Against fp32 compute: bf16 keeps 8 significant bits; through a few layers the adapters' gradients
  # keep about 2 significant digits of the largest one per leaf (measured: 1.9e-2).
  np.testing.assert_allclose(lb, l32, rtol=2e-2)
  grads = lambda w: jax.tree.map(lambda a, b: a - b, adapters, w)
  assert numerics.max_leaf_rel_diff(grads(wb), grads(w32)) < 5e-2


def test_logits_at_target_positions_only_give_the_same_loss_and_gradients():
  """The step that runs the LM head only where a target is (trainer default) equals the full one."""
  import optax
  lm = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
  idx, sel = sft.loss_positions(lm, np.array([True, True, False]), min_size=2)
  assert idx.shape == (3, 4)                                   # 3 targets in row 0 -> C = 4
  assert idx[0, :3].tolist() == [1, 2, 3] and sel[0].tolist() == [1, 1, 1, 0]
  assert idx[1, 0] == 0 and sel[1].tolist() == [1, 0, 0, 0] and sel[2].sum() == 0   # row 2 is padding
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(5)))
  tx = optax.sgd(1.0)
  mask = optim.trainable_mask(params, lora=False)
  step = sft.make_train_step(cfg, M.ModelOptions(), tx, lambda s: 1.0)
  batch = _digit_batches(cfg, 8, accum=2)
  batch["valid"][1, 3] = False
  idx, sel = sft.loss_positions(batch["loss_mask"], batch["valid"])
  assert idx.shape[-1] < batch["input_ids"].shape[-1] // 4
  out = []
  for b in (batch, {**batch, "loss_index": idx, "loss_select": sel}):
    state = sft.init_state(jax.tree.map(jnp.copy, params), tx, mask, jax.random.key_data(jax.random.key(0)))
    state, m = step(state, b)
    out.append((jax.tree.map(np.asarray, state.params), m))
  # The same token losses gathered before or after the LM head: only the summation order differs.
  np.testing.assert_allclose(float(out[1][1]["loss"]), float(out[0][1]["loss"]), rtol=numerics.REASSOCIATION)
  assert float(out[1][1]["tokens"]) == float(out[0][1]["tokens"])
  numerics.assert_sgd_steps_close(jax.tree.map(np.asarray, params), out[1][0], out[0][0])
