"""GRPO's objective against hand-computed values; equal-reward groups give no policy gradient."""
import jax
import jax.numpy as jnp
import numpy as np

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


def test_completion_logprobs_equal_a_full_forward_of_each_sequence():
  """The shared-prefix teacher-forced log-probs equal those of each prompt + completion run alone."""
  from dcsft_jax.data import batching, builtin
  from dcsft_jax.data.processor import Processor
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.config import tiny_config
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
  ours = np.asarray(jax.jit(lambda p: grpo.completion_logprobs(model, p, a, jnp.asarray(comp)))(params))
  for b in range(2):
    n = int(a["lengths"][b])
    for g in range(G):
      ids = np.concatenate([a["input_ids"][b, :n], comp[b, g]])[None].astype(np.int32)
      tail = (n + a["rope_deltas"][b] + np.arange(T))[None, None].repeat(3, 0)
      pos = np.concatenate([a["positions"][:, b:b + 1, :n], tail], axis=2).astype(np.int32)
      imgs = {k: a[k][b:b + 1] for k in ("pixel_values", "pos_hw", "frame_seg", "window_seg")}
      logits = model.apply({"params": params}, ids, pos, imgs)
      lp = jax.nn.log_softmax(logits[0, n - 1:n + T - 1].astype(jnp.float32), axis=-1)
      ref = np.asarray(jnp.take_along_axis(lp, jnp.asarray(comp[b, g])[:, None], axis=-1)[:, 0])
      np.testing.assert_allclose(ours[b * G + g], ref, rtol=1e-5, atol=1e-5)
