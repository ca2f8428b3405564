"""The GRPO family's parts (dcsft_jax/train/rl.py, issue 30): for each named algorithm, the loss and
its gradient on a hand-built batch against the published objective written out here, term by term,
in plain Python loops. The batch has completions of mixed lengths, one cut at the token budget, a
group whose rewards are all equal, and ratios outside both clip bounds."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcsft_jax.train import grpo, rl

jax.config.update("jax_enable_x64", False)

B, G, T = 3, 4, 6                   # 3 prompts x 4 completions, 6 loss tokens at most
LENGTHS = np.array([[6, 3, 2, 5], [4, 5, 1, 2], [3, 3, 6, 4]])      # 6 = cut at the budget
TRUNCATED = LENGTHS == T
REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])   # group 1: all equal


def _batch():
  rng = np.random.default_rng(0)
  logp = -rng.uniform(0.1, 3.0, (B * G, T)).astype(np.float32)
  # The rollout policy: equal on some tokens (ratio 1), and +-0.5 in log on others, which puts the
  # ratio at 1.65 or 0.61: outside DAPO's [0.8, 1.28] on both sides, and GSPO's far more so.
  shift = rng.choice([0.0, 0.5, -0.5, 0.05], size=(B * G, T)).astype(np.float32)
  shift[0] = 0.0                      # one completion exactly on-policy (GSPO's ratio 1: its gradient flows)
  old = logp - shift
  ref = logp + rng.normal(0, 0.3, (B * G, T)).astype(np.float32)
  mask = (np.arange(T)[None] < LENGTHS.reshape(-1, 1)).astype(np.float32)
  return jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(mask)


# ----------------------------------------------------------------------------- the objectives by hand
def _adv_by_hand(r, kind):
  out = []
  for g in r:
    m = sum(g) / len(g)
    if kind == "group":
      sd = math.sqrt(sum((x - m) ** 2 for x in g) / (len(g) - 1))
      out.append([(x - m) / (sd + 1e-4) for x in g])
    elif kind == "group_mean":
      out.append([x - m for x in g])
    elif kind == "rloo":
      out.append([x - (sum(g) - x) / (len(g) - 1) for x in g])
  return out


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _by_hand(name, logp, old, ref, mask, rewards):
  """The published objective of `name`, written out: returns the loss as a function of logp."""
  r = [list(map(float, g)) for g in rewards]
  n = [int(x) for x in np.asarray(mask).sum(1)]
  seqs = range(B * G)

  def k3(i, t):
    d = ref[i, t] - logp[i, t]
    return jnp.exp(d) - d - 1

  def pol(ratio, a, lo, hi):
    return -jnp.minimum(ratio * a, _clip(ratio, 1 - lo, 1 + hi) * a)

  if name in ("grpo", "rloo"):
    # GRPO (the paper's Eq. 4-5, ms-swift): (1/R) sum_i (1/|o_i|) sum_t [policy_t + 0.04 k3_t].
    A = _adv_by_hand(r, "group" if name == "grpo" else "rloo")
    total = 0.0
    for i in seqs:
      a = A[i // G][i % G]
      total += sum(pol(jnp.exp(logp[i, t] - old[i, t]), a, 0.2, 0.2) + 0.04 * k3(i, t) for t in range(n[i])) / n[i]
    return total / (B * G)
  if name == "dr_grpo":
    # Dr. GRPO: A = r - mean (no std), sum over all tokens / (R x the budget T), no KL.
    A = _adv_by_hand(r, "group_mean")
    total = sum(pol(jnp.exp(logp[i, t] - old[i, t]), A[i // G][i % G], 0.2, 0.2) for i in seqs for t in range(n[i]))
    return total / (B * G * T)
  if name == "dapo":
    # DAPO: rewards + the soft overlong penalty (20% of a 6-token budget: the last token, -1 when cut),
    # groups with equal (shaped) rewards dropped, clip [0.8, 1.28], sum over the kept tokens / their count.
    shaped = [[x + (0.0 if LENGTHS[b, k] <= 5 else -1.0) for k, x in enumerate(g)] for b, g in enumerate(r)]
    A = _adv_by_hand(shaped, "group")
    keep = [i for i in seqs if len(set(shaped[i // G])) > 1]
    total = sum(pol(jnp.exp(logp[i, t] - old[i, t]), A[i // G][i % G], 0.2, 0.28) for i in keep for t in range(n[i]))
    return total / sum(n[i] for i in keep)
  if name == "gspo":
    # GSPO: s_i = exp(mean_t (logp - old)), -min(s A, clip(s, 1 - 3e-4, 1 + 4e-4) A) per completion, averaged.
    A = _adv_by_hand(r, "group")
    total = 0.0
    for i in seqs:
      s = jnp.exp(sum(logp[i, t] - old[i, t] for t in range(n[i])) / n[i])
      total += pol(s, A[i // G][i % G], 3e-4, 4e-4)
    return total / (B * G)
  raise AssertionError(name)


def _ours(name, logp, old, ref, mask):
  algo = rl.algorithm(name)
  rewards = REWARDS.copy()
  rows = None
  if algo.overlong == "soft":
    rewards = rewards + rl.overlong_penalty(LENGTHS, T, algo.buffer_tokens(T))
  if algo.overlong == "filter":
    mask = rl.truncated_mask(mask, TRUNCATED.reshape(-1))
  if algo.dynamic_sampling:
    rows = jnp.asarray(np.repeat(rl.informative(rewards), G), jnp.float32)
  adv = rl.advantages(algo.advantage, rewards).reshape(-1)
  return lambda lp: rl.loss_and_grad(algo, lp, old, ref, adv, mask, rows)


@pytest.mark.parametrize("name", sorted(rl.ALGORITHMS))
def test_each_algorithm_is_its_published_objective_with_every_gradient(name):
  logp, old, ref, mask = _batch()
  loss, grad = _ours(name, logp, old, ref, mask)(logp)
  want_loss, want_grad = jax.value_and_grad(lambda lp: _by_hand(name, lp, old, ref, mask, REWARDS))(logp)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-8)
  # The batch exercises what the algorithm is about: a gradient on some tokens, none past a completion.
  assert np.abs(np.asarray(grad)).sum() > 0
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)


def test_the_batch_has_ratios_outside_both_clip_bounds_and_a_group_of_equal_rewards():
  logp, old, _, mask = _batch()
  ratio = np.exp(np.asarray(logp - old))[np.asarray(mask) > 0]
  dapo = rl.ALGORITHMS["dapo"]
  assert (ratio > 1 + dapo.epsilon_high).any() and (ratio < 1 - dapo.epsilon_low).any()
  assert rl.informative(REWARDS).tolist() == [True, False, True] and TRUNCATED.any()


def test_grpo_is_exactly_the_papers_loss_and_gradient():
  """The registry's grpo against dcsft_jax.train.grpo (what the trainer has always computed)."""
  logp, old, ref, mask = _batch()
  adv = rl.advantages("group", REWARDS).reshape(-1)
  np.testing.assert_array_equal(adv, grpo.group_advantages(jnp.asarray(REWARDS)).reshape(-1))

  def today(lp):
    per_seq, _, _, _ = grpo.sequence_terms(lp, old, ref, adv, mask, beta=0.04, clip_eps=0.2)
    return per_seq.sum() / B / G
  loss, grad = rl.loss_and_grad(rl.algorithm("grpo"), logp, old, ref, adv, mask)
  want, want_grad = jax.value_and_grad(today)(logp)
  np.testing.assert_array_equal(loss, want)
  np.testing.assert_array_equal(grad, want_grad)


def test_a_variant_changes_the_objective_and_the_named_parts_refuse_unknown_names():
  logp, old, ref, mask = _batch()
  base, _ = _ours("grpo", logp, old, ref, mask)(logp)
  adv = rl.advantages("group", REWARDS).reshape(-1)
  higher, _ = rl.loss_and_grad(rl.algorithm("grpo", epsilon_high=0.28), logp, old, ref, adv, mask)
  assert higher != base                               # clip-higher acts on this batch
  with pytest.raises(ValueError, match="unknown RL algorithm 'ppo'; the algorithms are grpo, dr_grpo"):
    rl.algorithm("ppo")
  with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
    rl.Algorithm(aggregation="mean")
  with pytest.raises(ValueError, match="overlong_buffer"):
    rl.Algorithm(overlong="soft", overlong_buffer=0)


def test_any_part_of_a_named_algorithm_is_overridden_from_the_config_and_checked_before_work():
  """grpo.overrides.NAME.PART: one key per Algorithm field, for every named algorithm, unset by default;
  a set key changes that algorithm alone; a bad value is one ConfigError naming the key."""
  import dataclasses
  from dcsft_jax import config_base, run_config
  c = config_base.base()
  assert set(c.grpo.overrides) == set(rl.ALGORITHMS)
  assert set(c.grpo.overrides.dapo) == {f.name for f in dataclasses.fields(rl.Algorithm)}
  assert all(v is None for sec in c.grpo.overrides.values() for v in sec.values())
  assert run_config.rl_algorithm(c, "dapo") == rl.ALGORITHMS["dapo"]
  assert run_config.rl_algorithm(c, "grpo") == rl.configured("grpo", beta=c.grpo.beta, clip_eps=c.grpo.clip_eps)
  c.grpo.overrides.dapo.epsilon_high = 0.3
  c.grpo.overrides.dapo.dynamic_sampling = False
  c.grpo.overrides.grpo.epsilon_high = 0.28           # clip-higher on the paper's GRPO
  assert run_config.rl_algorithm(c, "dapo") == dataclasses.replace(rl.ALGORITHMS["dapo"], epsilon_high=0.3,
                                                                   dynamic_sampling=False)
  g = run_config.rl_algorithm(c, "grpo")
  assert (g.epsilon_low, g.epsilon_high, g.beta) == (c.grpo.clip_eps, 0.28, c.grpo.beta)
  assert run_config.rl_algorithm(c, "gspo") == rl.ALGORITHMS["gspo"]
  c.grpo.overrides.gspo.ratio = "segment"
  with pytest.raises(run_config.ConfigError, match=r"^grpo\.overrides\.gspo: unknown ratio 'segment'"):
    run_config.rl_algorithm(c, "gspo")
  c.grpo.overrides.gspo.ratio = None
  c.grpo.overrides.grpo.beta = 0.1
  with pytest.raises(run_config.ConfigError, match=r"grpo\.overrides\.grpo\.beta: .* from grpo\.beta; set that instead"):
    run_config.rl_algorithm(c, "grpo")
  with pytest.raises(ValueError, match="epsilon_hi is not a part of an algorithm; the parts are"):
    rl.algorithm("dapo", epsilon_hi=0.3)


def test_overlong_shaping_and_filter():
  assert rl.overlong_penalty([2, 3, 4, 5, 6], 6, 4).tolist() == [0.0, -0.25, -0.5, -0.75, -1.0]
  m = rl.truncated_mask(jnp.ones((3, 4)), [False, True, False])
  assert np.asarray(m).tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]


def test_figures_count_clipping_on_the_side_that_binds():
  """clip_low counts tokens with ratio < 1 - eps and a negative advantage, clip_high ratio > 1 + eps
  and a positive one (TRL's clip_ratio/low_mean and high_mean), each a completion's token mean."""
  mask = jnp.ones((2, 2))
  logp = jnp.zeros((2, 2))
  old = jnp.array([[0.5, -0.5], [0.5, -0.5]])           # ratios 0.61 and 1.65 on each row
  adv = jnp.array([1.0, -1.0])
  _, _, f = rl.objective(rl.algorithm("grpo"), logp, old, logp, adv, mask)
  assert float(f["clip_high"]) == 0.5 and float(f["clip_low"]) == 0.5 and float(f["kl"]) == 0.0


def test_a_dapo_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
  """Issue 30: a non-default algorithm through the trainer: DAPO (token-mean loss, clip-higher, its
  overlong penalty on a 2-token budget, dynamic sampling's dropped groups), killed after step 3 and
  resumed from its step-2 checkpoint, equals an uninterrupted run: params and every logged figure."""
  from dcsft_jax.train import trainer
  from dcsft_jax import mesh as mesh_lib
  from test_grpo import _killed_and_resumed, _lora_grpo_run, resume_setup
  cfg, proc, recs, lora, tc, sp, odd, mesh = resume_setup()
  make = _lora_grpo_run(cfg, proc, recs, lora, tc, sp, mesh, reward_fn=odd, algorithm=rl.algorithm("dapo"))
  with mesh_lib.use(mesh):
    full, want, resumed, got = _killed_and_resumed(make, tmp_path, kill_at=3)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  strip = lambda h: [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in h]
  assert strip(full["history"]) == strip(resumed["history"]) and len(full["history"]) == 4
  h = full["history"]
  # Every completion hits the 2-token budget with no end token: truncated, so DAPO's penalty is -1 on
  # each reward; the figures the RL step logs are there.
  assert all(r["truncated"] == 1.0 for r in h)
  assert all(-1.0 <= r["reward"] <= 0.0 for r in h) and any(r["reward"] > -1.0 for r in h)
  assert all(k in h[0] for k in ("clip_low", "clip_high", "kl", "zero_advantage", "completion_tokens", "entropy",
                                 "reward_std", "truncated"))


@pytest.mark.slow
def test_the_default_run_trains_evaluates_and_reports_several_rl_baselines(tmp_path):
  """`--config.grpo.algorithms=grpo,dapo,gspo` on the default run (shortened): each algorithm trains its
  own run, is evaluated under its name (evaluate.models' grpo entry stands for all of them) and has its
  row and its comparison with SFT in the report."""
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wd = tmp_path / "wd"
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py:short=true",
                      f"--config.workdir={wd}", "--config.grpo.algorithms=grpo,dapo,gspo"], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=1500)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  for a in ("grpo", "dapo", "gspo"):
    assert os.path.exists(wd / "models" / a / "config.json"), a
  acc = json.load(open(wd / "eval" / "accuracy.json"))["accuracy"]
  assert {"grpo", "dapo", "gspo"} <= set(acc)
  report = open(wd / "report.md").read()
  table = report.split("## Accuracy")[1].split("\n## ")[0]
  for name in ("GRPO", "DAPO", "GSPO"):
    assert f"| {name} |" in table, table
  res = json.load(open(wd / "results.json"))
  assert {("grpo", "sft"), ("dapo", "sft"), ("gspo", "sft")} <= {(c["method"], c["reference"]) for c in res["comparisons"]}
  # Each run's own algorithm: DAPO's rollouts were length-shaped (its reward can go below 0), GRPO's not.
  hist = lambda a: [json.loads(x) for x in open(wd / "train" / a / "logs" / "metrics.jsonl") if '"loss"' in x]
  assert all(h["reward"] >= 0 for h in hist("grpo")) and all("clip_high" in h for h in hist("gspo"))
  # A second invocation finds every run done.
  r = subprocess.run([sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py:short=true",
                      f"--config.workdir={wd}", "--config.grpo.algorithms=grpo,dapo,gspo", "--config.stages=grpo"],
                     cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "[grpo] done already" in r.stdout, r.stdout[-2000:]


def test_dynamic_sampling_refills_groups_without_signal_from_further_prompts_and_resumes_the_same(tmp_path):
  """DAPO's dynamic sampling: half the prompts reward every answer alike (their groups teach nothing);
  those groups are replaced by informative ones drawn from further prompts, so the step trains on fewer
  zero-advantage groups than the same step without it, and a killed run refills identically on resume."""
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax import sampling
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.train import optim, trainer
  from test_grpo import _generation_batch, _killed_and_resumed, _lora_grpo_run
  cfg, proc, recs, _ = _generation_batch(8)
  flat = {r.id for r in recs[::2]}
  reward = lambda rec, text: 1.0 if rec.id in flat else float(len(text) > 0 and ord(text[0]) % 2 == 1)
  lora = M.LoraSpec(rank=4, alpha=8, dropout=0.0)
  sp = sampling.SamplingParams(max_new_tokens=2, num_samples=4, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(),
                               pad_id=0)
  tc = trainer.TrainConfig(steps=4, batch_size=4, save_every=2, lora=lora,
                           optim=optim.OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, total_steps=4))
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  # Without the length penalty, so the reward alone decides which groups are informative.
  on = rl.algorithm("dapo", overlong="none")
  off = rl.algorithm("dapo", overlong="none", dynamic_sampling=False)
  with mesh_lib.use(mesh):
    runs = {}
    for name, algo in (("on", on), ("off", off)):
      it, t = _lora_grpo_run(cfg, proc, recs, lora, tc, sp, mesh, reward_fn=reward, algorithm=algo)(tmp_path / name)
      runs[name] = t.fit(it, progress=False)["history"]
    full, want, resumed, got = _killed_and_resumed(
        _lora_grpo_run(cfg, proc, recs, lora, tc, sp, mesh, reward_fn=reward, algorithm=on), tmp_path / "k", kill_at=3)
  h_on, h_off = runs["on"], runs["off"]
  assert sum(r["refilled_groups"] for r in h_on) > 0 and "refilled_groups" not in h_off[0]
  # The first step rolls out the same prompts and answers; refilled, fewer groups lack signal.
  assert h_on[0]["zero_advantage"] < h_off[0]["zero_advantage"] or h_on[0]["refilled_groups"] == 0
  assert sum(r["zero_advantage"] for r in h_on) < sum(r["zero_advantage"] for r in h_off)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  strip = lambda h: [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in h]
  assert strip(full["history"]) == strip(resumed["history"])
