"""GRPO's objective against hand-computed values; equal-reward groups give no policy gradient."""
import os

import jax
import pytest
import jax.numpy as jnp
import numpy as np

import numerics

from dcsft_jax.train import grpo


def test_advantages_match_hand_computation():
  r = jnp.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]], jnp.float32)
  adv = np.asarray(grpo.group_advantages(r))
  # Row 0: mean .5, sample std sqrt(4 * .25 / 3) = 0.57735.
  np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5773503 + 1e-4), rtol=1e-6)
  np.testing.assert_array_equal(adv[1], 0.0)
  s = np.sqrt(((np.array([0, 0, 0, 1]) - 0.25) ** 2).sum() / 3)
  np.testing.assert_allclose(adv[2], (np.array([0, 0, 0, 1]) - 0.25) / (s + 1e-4), rtol=1e-6)


def test_loss_matches_hand_computation():
  logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
  old = jnp.array([[-1.2, -1.5, -0.5], [-0.3, -0.2, -9.0]])
  ref = jnp.array([[-1.1, -2.0, -0.4], [-0.5, -0.7, -9.0]])
  adv = jnp.array([1.0, -2.0])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  loss, m = grpo.grpo_loss(logp, old, ref, adv, mask, beta=0.04, clip_eps=0.2)
  expected = []
  for i in range(2):
    terms = []
    for t in range(3):
      if not mask[i, t]:
        continue
      rho = np.exp(float(logp[i, t] - old[i, t]))
      a = float(adv[i])
      pol = -min(rho * a, min(max(rho, 0.8), 1.2) * a)
      d = float(ref[i, t] - logp[i, t])
      terms.append(pol + 0.04 * (np.exp(d) - d - 1))
    expected.append(sum(terms) / len(terms))
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-6)
  # Ratios outside [0.8, 1.2]: e^0.2 and e^-0.5 in row 0, e^-0.5 in row 1: 3 of the 5 unmasked tokens.
  np.testing.assert_allclose(float(m["clip_fraction"]), 3 / 5, rtol=1e-6)


def test_equal_rewards_give_no_policy_gradient():
  key = jax.random.key(0)
  logp = -jax.random.uniform(key, (8, 5)) * 3
  ref = logp + 0.1
  mask = jnp.ones((8, 5))
  for rewards in (jnp.ones((1, 8)), jnp.zeros((1, 8))):
    adv = grpo.group_advantages(rewards)[0]
    g0 = jax.grad(lambda lp: grpo.grpo_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, beta=0.0)[0])(logp)
    np.testing.assert_array_equal(np.asarray(g0), 0.0)
    # With beta > 0 only the KL term pulls, and it is not zero (the paper's caveat).
    g = jax.grad(lambda lp: grpo.grpo_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, beta=0.04)[0])(logp)
    assert np.abs(np.asarray(g)).max() > 0
  mixed = grpo.group_advantages(jnp.array([[1, 0, 0, 0, 1, 0, 0, 0]], jnp.float32))[0]
  g = jax.grad(lambda lp: grpo.grpo_loss(lp, jax.lax.stop_gradient(lp), ref, mixed, mask, beta=0.0)[0])(logp)
  assert np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_completion_logprobs_equal_a_full_forward_of_each_sequence(temperature):
  """The shared-prefix teacher-forced log-probs equal those of each prompt + completion run alone,
  log_softmax(logits / T) at the rollout temperature T (ms-swift's, for policy and reference), and so
  do the next-token entropies the RL step logs."""
  from dcsft_jax.data import batching, builtin
  from dcsft_jax.data.processor import Processor
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  cfg = tiny_config()
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(4))))
  proc = Processor.tiny(cfg=cfg)
  recs = builtin.load_builtin("test", limit=2)
  recs = [recs[0], recs[1].__class__(recs[1].id, recs[1].image, recs[1].prompt + " now, quickly", "x",
                                     "classification")]
  buckets = batching.auto_buckets(recs, proc, with_answers=False, max_buckets=1)
  it = batching.BatchIterator(recs, proc, batch_size=2, buckets=buckets, with_answers=False, shuffle=False)
  a = next(iter(it)).arrays
  it.close()
  assert a["lengths"][0] != a["lengths"][1]
  G, T = 3, 5
  comp = np.asarray(jax.random.randint(jax.random.key(0), (2, G, T), 0, 400), np.int32)
  model = M.Qwen25VL(cfg)
  ours, entropy = map(np.asarray, jax.jit(lambda p: grpo.completion_logprobs(
      model, p, a, jnp.asarray(comp), temperature=temperature, with_entropy=True))(params))
  forward = jax.jit(lambda p, ids, pos, imgs: model.apply({"params": p}, ids, pos, imgs))
  for b in range(2):
    n = int(a["lengths"][b])
    for g in range(G):
      ids = np.concatenate([a["input_ids"][b, :n], comp[b, g]])[None].astype(np.int32)
      tail = (n + a["rope_deltas"][b] + np.arange(T))[None, None].repeat(3, 0)
      pos = np.concatenate([a["positions"][:, b:b + 1, :n], tail], axis=2).astype(np.int32)
      imgs = {k: a[k][b:b + 1] for k in ("pixel_values", "pos_hw", "frame_seg", "window_seg")}
      logits = forward(params, ids, pos, imgs)
      lp = jax.nn.log_softmax(logits[0, n - 1:n + T - 1].astype(jnp.float32) / temperature, axis=-1)
      ref = np.asarray(jnp.take_along_axis(lp, jnp.asarray(comp[b, g])[:, None], axis=-1)[:, 0])
      # Two programs of the same forward (shared prefix vs full sequence): reassociated fp32 sums in
      # each layer; a log-prob is logit - logsumexp, so its error scales with the logits (~10), not
      # with the log-prob: 1e-5 absolute is ~1e-6 of the terms.
      np.testing.assert_allclose(ours[b * G + g], ref, rtol=1e-5, atol=1e-5)
      # The entropy figure (RL's "entropy"): -sum p log p of each position's distribution, in float64
      # here; the same logits' error, times at most log V.
      p64 = np.asarray(lp, np.float64)
      np.testing.assert_allclose(entropy[b * G + g], -(np.exp(p64) * p64).sum(-1), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- the jitted step
def _generation_batch(n=4, seed=0):
  from dcsft_jax.data import batching, builtin
  from dcsft_jax.data.processor import Processor
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  cfg = tiny_config()
  proc = Processor.tiny(cfg=cfg)
  recs = builtin.load_builtin("train", limit=n, seed=seed)
  buckets = batching.auto_buckets(recs, proc, with_answers=False, max_buckets=1)
  it = batching.BatchIterator(recs, proc, batch_size=n, buckets=buckets, with_answers=False, shuffle=False)
  a = next(iter(it)).arrays
  it.close()
  return cfg, proc, recs, a


@pytest.mark.parametrize("stored_old", [False, True])
def test_step_matches_a_direct_computation_of_the_objective(stored_old):
  """The jitted GRPO step (2 accumulated micro-batches, LoRA, reference = adapters off, a padding
  prompt, log-probs at the rollout temperature 0.9) gives the loss, KL, clip fraction and gradient
  of the objective written out by hand. stored_old: the rollouts serve num_iterations > 1 steps,
  so the ratio is to the stored rollout policy's log-probs and the clip acts."""
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.train import optim, sft, trainer
  import dataclasses
  import optax
  cfg, _, _, a = _generation_batch(4)
  a["valid"] = np.array([True, True, True, False])
  G, T = 4, 5
  rng = np.random.default_rng(0)
  comp = rng.integers(0, 400, (4, G, T)).astype(np.int32)
  lengths = rng.integers(1, T + 1, (4, G))
  cmask = (np.arange(T)[None, None] < lengths[..., None]).astype(np.int32)
  rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0]], np.float32)
  lora = M.LoraSpec(rank=4, alpha=8, dropout=0.0)
  opts = M.ModelOptions(lora=lora)
  base = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(1)))
  params = trainer.init_lora(base, cfg, lora, seed=2)
  # Non-zero adapters, so the policy differs from the reference and the KL term is live.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if "lora_b" in str(p) else x, params)
  mask = optim.trainable_mask(params, lora=True)
  train0, frozen = optim.split(params, mask)
  train0 = jax.tree.map(lambda x: None if x is None else np.asarray(x), train0, is_leaf=lambda x: x is None)

  model = M.Qwen25VL(cfg, opts)
  ref_model = M.Qwen25VL(cfg, dataclasses.replace(opts, lora=None))
  temp = 0.9
  lp_at = lambda m, p: grpo.completion_logprobs(m, p, a, jnp.asarray(comp), temperature=temp)
  ref_lp = np.asarray(jax.jit(lambda p: lp_at(ref_model, p))(params))
  cur_lp = np.asarray(jax.jit(lambda p: lp_at(model, p))(params))
  _, ent = jax.jit(lambda p: grpo.completion_logprobs(model, p, a, jnp.asarray(comp), temperature=temp,
                                                      with_entropy=True))(params)
  r = rewards
  adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
  m = cmask.reshape(-1, T).astype(np.float32)
  if stored_old:
    # The rollout policy as it was some updates ago: ratios spread over and beyond [0.8, 1.2].
    old_lp = cur_lp + rng.normal(0, 0.3, cur_lp.shape).astype(np.float32)
    ratio = np.exp(cur_lp - old_lp)
    out = ((ratio < 0.8) | (ratio > 1.2)) * m
    want_clip = (out.sum(1) / m.sum(1))[:3 * G].mean()
    assert 0.2 < want_clip < 0.8, want_clip
  else:
    want_clip = 0.0

  def direct(train):
    lp = lp_at(model, optim.merge(train, frozen))
    old = jnp.asarray(old_lp) if stored_old else jax.lax.stop_gradient(lp)
    ratio = jnp.exp(lp - old)
    A = jnp.asarray(adv.reshape(-1))[:, None]
    pol = -jnp.minimum(ratio * A, jnp.clip(ratio, 0.8, 1.2) * A)
    d = jnp.asarray(ref_lp) - lp
    kl = jnp.exp(d) - d - 1
    per_tok = pol + 0.04 * kl
    per_seq = (per_tok * m).sum(1) / m.sum(1)
    kl_seq = (kl * m).sum(1) / m.sum(1)
    return per_seq[:3 * G].mean(), kl_seq[:3 * G].mean()         # prompt 3 is padding

  (want_loss, want_kl), want_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(train0)
  tx = optax.sgd(1.0)
  step = sft.make_train_step(cfg, opts, tx, lambda s: 1.0, loss=grpo.make_loss(beta=0.04, temperature=temp),
                             count_name="completions")
  state = sft.init_state(params, tx, mask, jax.random.key_data(jax.random.key(0)))
  batch = {**a, "completions": comp, "completion_mask": cmask, "rewards": rewards}
  if stored_old:
    batch["old_logprobs"] = old_lp.reshape(4, G, T)
  stacked = {k: (v.reshape((2, 2) + v.shape[1:]) if k != "positions" else
                 v.reshape(3, 2, 2, -1).transpose(1, 0, 2, 3)) for k, v in batch.items()}
  state, metrics = step(state, stacked)
  # The step's scan over 2 micro-batches vs one direct computation: reassociation only.
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=numerics.REASSOCIATION)
  # k3 = e^d - d - 1 of log-prob differences d ~ 1e-2 whose own reassociation error is ~1e-6: ~1e-4 relative.
  np.testing.assert_allclose(float(metrics["kl"]), float(want_kl), rtol=1e-3)
  # Near the clip edges a ratio may land on either side by float noise; at most a token or two.
  np.testing.assert_allclose(float(metrics["clip_fraction"]), want_clip, atol=2 / (3 * G * T))
  assert float(metrics["completions"]) == 3 * G
  np.testing.assert_allclose(float(metrics["reward"]), rewards[:3].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["zero_advantage"]), 1 / 3, rtol=1e-6)
  # TRL's reward_std: the mean over the valid prompts' groups of each group's std (Bessel's).
  np.testing.assert_allclose(float(metrics["reward_std"]), rewards[:3].std(1, ddof=1).mean(), rtol=1e-6)
  # The policy's next-token entropy, each completion's mean over its loss tokens, averaged.
  want_ent = ((np.asarray(ent) * m).sum(1) / m.sum(1))[:3 * G].mean()
  np.testing.assert_allclose(float(metrics["entropy"]), want_ent, rtol=numerics.REASSOCIATION)
  assert float(metrics["kl"]) > 1e-6
  # SGD with lr 1 moved each adapter by its gradient: compare with w - (the hand-written gradient).
  want = jax.tree.map(lambda x, g: None if x is None else x - np.asarray(g), train0, want_grads,
                      is_leaf=lambda x: x is None)
  assert len(numerics.leaves(want)) > 10
  numerics.assert_sgd_steps_close(train0, state.train, want)


def test_grpo_trainer_raises_the_reward(tmp_path):
  """Full fine-tuning (reference = a frozen copy) on a reward the random model earns half the
  time: after a few steps the policy earns it far more often, and the KL to the reference grows."""
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax import sampling
  from dcsft_jax.data import batching
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.train import optim, rollouts, trainer
  cfg, proc, recs, _ = _generation_batch(8)
  buckets = batching.auto_buckets(recs, proc, with_answers=False, max_buckets=1)
  it = batching.BatchIterator(recs, proc, batch_size=4, buckets=buckets, with_answers=False, shuffle=True,
                              seed=1, epochs=None)
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
  even = lambda rec, text: float(len(text) > 0 and ord(text[0]) % 2 == 0)
  sp = sampling.SamplingParams(max_new_tokens=1, num_samples=8, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(),
                               pad_id=0)
  tc = trainer.TrainConfig(steps=16, batch_size=8, accum=2, save_every=100,
                           optim=optim.OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, schedule="constant",
                                                   total_steps=16, weight_decay=0.0))
  # One device: this test is about learning; sharded equals unsharded is shown for the shared step.
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  with mesh_lib.use(mesh):
    t = rollouts.rl_trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path), sampling_params=sp,
                                 records=recs, processor=proc, reward_fn=even)
    out = t.fit(it, progress=False)
  h = out["history"]
  first, last = np.mean([x["reward"] for x in h[:3]]), np.mean([x["reward"] for x in h[-3:]])
  assert 0.2 < first < 0.8, first
  assert last > max(first + 0.25, 0.8), (first, last)
  assert h[0]["kl"] < 1e-6 < h[-1]["kl"]
  assert t.manager.latest_step() == 16
  assert all(np.isfinite(x["loss"]) for x in h)


def resume_setup():
  """The kill-and-resume runs' pieces: 8 prompts, LoRA with dropout, 4 steps of 4 prompts x 4 answers of
  2 tokens, a reward on the answer's first character, one device."""
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax import sampling
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.train import optim, trainer
  cfg, proc, recs, _ = _generation_batch(8)
  lora = M.LoraSpec(rank=4, alpha=8, dropout=0.05)
  sp = sampling.SamplingParams(max_new_tokens=2, num_samples=4, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(),
                               pad_id=0)
  tc = trainer.TrainConfig(steps=4, batch_size=4, save_every=2, lora=lora,
                           optim=optim.OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, total_steps=4))
  odd = lambda rec, text: float(len(text) > 0 and ord(text[0]) % 2 == 1)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  return cfg, proc, recs, lora, tc, sp, odd, mesh


def test_grpo_killed_run_resumes_bit_identical(tmp_path):
  """GRPO with LoRA (dropout on), killed after step 3 and resumed from its step-2 checkpoint: the
  rollouts (keys from seed/step/record), rewards, params and metrics equal an uninterrupted run."""
  from dcsft_jax.train import trainer
  from dcsft_jax import mesh as mesh_lib
  cfg, proc, recs, lora, tc, sp, odd, mesh = resume_setup()
  make = _lora_grpo_run(cfg, proc, recs, lora, tc, sp, mesh, reward_fn=odd)
  with mesh_lib.use(mesh):
    full, want, resumed, got = _killed_and_resumed(make, tmp_path, kill_at=3)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  strip = lambda h: [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in h]
  assert strip(full["history"]) == strip(resumed["history"]) and len(full["history"]) == 4
  assert any(0 < r["reward"] < 1 for r in full["history"])


def test_loss_tokens_end_with_one_im_end():
  """ms-swift re-encodes a completion as answer + <|im_end|>: the sampled end token (<|im_end|> or
  <|endoftext|>) becomes <|im_end|>, and a completion cut at T tokens gets one appended."""
  IM_END, EOT = 402, 400
  tokens = np.array([[[5, 6, IM_END, 0], [5, 6, 7, 8], [5, EOT, 0, 0], [IM_END, 0, 0, 0]]], np.int32)
  lengths = np.array([[3, 4, 2, 1]])
  comp, mask = grpo.loss_tokens(tokens, lengths, (EOT, IM_END), IM_END)
  assert comp.shape == mask.shape == (1, 4, 5)
  assert comp[0].tolist() == [[5, 6, IM_END, 0, 0], [5, 6, 7, 8, IM_END], [5, IM_END, 0, 0, 0],
                              [IM_END, 0, 0, 0, 0]]
  assert mask[0].sum(1).tolist() == [3, 5, 2, 1]
  assert (mask[0, :, :1] == 1).all() and mask[0, 0].tolist() == [1, 1, 1, 0, 0]


def test_num_iterations_reuses_rollouts_and_resumes_mid_cycle(tmp_path):
  """num_iterations = 2: one rollout per 2 steps (the second step trains on the same rollouts against
  their stored log-probs, so the clip acts after the first update), and a run killed in the middle
  of a cycle resumes from the rollouts it wrote, bit-identical to an uninterrupted run."""
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax import sampling
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.train import optim, trainer
  cfg, proc, recs, _ = _generation_batch(8)
  lora = M.LoraSpec(rank=4, alpha=8, dropout=0.0)
  sp = sampling.SamplingParams(max_new_tokens=3, num_samples=4, temperature=0.9, top_k=0, top_p=1.0, eos_ids=(),
                               pad_id=0)
  tc = trainer.TrainConfig(steps=4, batch_size=4, save_every=1, lora=lora,
                           optim=optim.OptimConfig(learning_rate=0.3, warmup_ratio=0.0, schedule="constant",
                                                   total_steps=4))
  odd = lambda rec, text: float(len(text) > 0 and ord(text[0]) % 2 == 1)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  calls = []      # which run (1 full, 2 killed, 3 resumed) each rollout belongs to
  build = _lora_grpo_run(cfg, proc, recs, lora, tc, sp, mesh, reward_fn=odd, num_iterations=2)

  def make(workdir):
    it, t = build(workdir)
    run, gen = make.runs + 1, t.parts.source.sampler.generate
    make.runs = run
    t.parts.source.sampler = type("Counting", (), {"generate": lambda self, *a: calls.append(run) or gen(*a)})()
    return it, t
  make.runs = 0

  with mesh_lib.use(mesh):
    # Killed after step 4's update, before its save: the resume starts at step 3, mid-cycle.
    full, want, resumed, got = _killed_and_resumed(make, tmp_path, kill_at=4)
  assert calls.count(1) == 2                                   # steps 0 and 2 sample; 1 and 3 reuse
  assert calls.count(2) == 2                                   # the killed run's two
  assert calls.count(3) == 0                                   # the resume reads cycle 2's rollouts from disk
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  strip = lambda h: [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in h]
  assert strip(full["history"]) == strip(resumed["history"])
  h = full["history"]
  # First step of a cycle: the stored log-probs are the policy's own (ratio 1 up to float noise).
  assert h[0]["clip_fraction"] == 0 and h[2]["clip_fraction"] == 0
  # Second step: one update later, with a large learning rate, some ratios leave [0.8, 1.2].
  assert h[1]["clip_fraction"] > 0 or h[3]["clip_fraction"] > 0
  # Rollout files older than the oldest kept checkpoint's cycle are gone.
  assert sorted(os.listdir(tmp_path / "a" / "rollouts")) == ["00000002.p0.npz"]


def _lora_grpo_run(cfg, proc, recs, lora, tc, sp, mesh, **kw):
  """make(workdir) -> (iterator, trainer): the same LoRA GRPO run from scratch, every call."""
  from dcsft_jax.data import batching
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.train import rollouts, trainer

  def make(workdir):
    buckets = batching.auto_buckets(recs, proc, with_answers=False, max_buckets=1)
    it = batching.BatchIterator(recs, proc, batch_size=4, buckets=buckets, with_answers=False, shuffle=True,
                                seed=2, epochs=None)
    params = trainer.init_lora(M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0))), cfg, lora, seed=1)
    return it, rollouts.rl_trainer(cfg, M.ModelOptions(), params, tc, mesh, str(workdir), sampling_params=sp,
                                        records=recs, processor=proc, **kw)
  return make


def _killed_and_resumed(make, tmp_path, *, kill_at: int):
  """An uninterrupted run, and one killed (an exception in on_step at `kill_at`) then resumed in its
  workdir -> (full fit, its params, resumed fit, its params)."""
  class Killed(Exception):
    pass

  def die(step, m):
    if step == kill_at:
      raise Killed()

  it, t = make(tmp_path / "a")
  full = t.fit(it, progress=False)
  want = jax.tree.map(np.asarray, t.params)
  it, t = make(tmp_path / "b")
  with pytest.raises(Killed):
    t.fit(it, progress=False, on_step=die)
  it, t = make(tmp_path / "b")
  resumed = t.fit(it, progress=False)
  return full, want, resumed, jax.tree.map(np.asarray, t.params)
