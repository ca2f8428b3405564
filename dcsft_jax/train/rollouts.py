"""Policy-gradient training's parts for the one training loop (train/trainer.py): the batch source
that rolls out G answers per prompt with the current policy and scores them with the verifiers, the
algorithm's loss (train/grpo.py, train/rl.py) and the reference weights.

Every num_iterations (mu) steps the source samples; each step is one jitted policy-gradient step on
the latest rollouts. With mu > 1 the rollout policy's log-probs are stored with the rollouts (and
written to train/NAME/rollouts/, so a run resumed in the middle of a cycle trains on the same
rollouts), which is what makes the clip act (ms-swift's num_iterations). Rollout keys come from
(seed, step, record id, k), so a resumed run draws the same answers as an uninterrupted one; the
algorithm's rollout filters (DAPO's dynamic sampling and overlong shaping) run here, on the host.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import time
from typing import Callable

import jax
import numpy as np

from dcsft_jax import atomic, sampling, verify
from dcsft_jax.models import registry
from dcsft_jax.models.layers import ModelOptions
from dcsft_jax.train import grpo, rl, trainer


# Further batches DAPO's dynamic sampling may draw to refill one micro-batch (ms-swift's max_resample_times).
MAX_RESAMPLE = 3


def _reward(rec, text: str) -> float:
  """The paper's rewards: 1/0 exact match for labels, IoU >= 0.5 for boxes (verify.verify)."""
  return float(verify.verify(rec.task, text, rec.answer))


def parts(cfg, opts: ModelOptions, tc: trainer.TrainConfig, mesh, workdir: str, *,
          sampling_params: sampling.SamplingParams, records, processor, algorithm: rl.Algorithm | None = None,
          beta: float = 0.04, clip_eps: float = 0.2, num_iterations: int = 1,
          reward_fn: Callable[[object, str], float] = _reward) -> trainer.Parts:
  """An RL run's parts: `algorithm` (train/rl.py; None is the paper's GRPO with `beta` and `clip_eps`) on
  rollouts of `records` (objects with .id .task .answer) by `sampling_params` (num_samples is the
  group size G). The reference policy is the starting model: with LoRA the params with adapters
  switched off, with full fine-tuning a frozen copy the trainer keeps."""
  if sampling_params.num_samples < 2:
    raise ValueError(f"GRPO needs at least 2 generations per prompt, got {sampling_params.num_samples}")
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  paper = grpo.paper_algorithm(beta, clip_eps)
  algorithm = paper if algorithm is None else algorithm
  source = Rollouts(cfg, trainer.train_options(opts, tc), tc, mesh, workdir, sampling_params=sampling_params,
                    records=records, processor=processor, algorithm=algorithm, num_iterations=num_iterations,
                    reward_fn=reward_fn)
  # The paper's GRPO keeps the fingerprint it always had (its runs resume across versions); any other
  # algorithm is fingerprinted whole.
  which = {"beta": beta, "clip_eps": clip_eps} if algorithm == paper else {"algorithm": dataclasses.asdict(algorithm)}
  return trainer.Parts(
      loss=grpo.make_loss(algorithm, temperature=float(sampling_params.temperature or 1.0)),
      count_name="completions", source=source, reference=True,
      postfix=lambda m: {"loss": f"{m['loss']:.4f}", "reward": f"{m['reward']:.3f}", "kl": f"{m['kl']:.4f}"},
      after_save=source.prune, model_flops=False,     # rollouts and three forwards a step: 6N per token does not apply
      fingerprint={"sampling": sampling_params, **which, "num_iterations": num_iterations})


class Rollouts:
  """The batch source of an RL run (Parts.source): source(batches, state) -> (host arrays, figures)."""

  def __init__(self, cfg, opts: ModelOptions, tc: trainer.TrainConfig, mesh, workdir: str, *,
               sampling_params: sampling.SamplingParams, records, processor, algorithm: rl.Algorithm,
               num_iterations: int, reward_fn: Callable[[object, str], float]):
    self.cfg, self.opts, self.tc, self.mesh, self.workdir = cfg, opts, tc, mesh, workdir
    self.algorithm = algorithm
    self.num_iterations = int(num_iterations)
    self._rollouts: tuple[int, dict, dict] | None = None     # (cycle's first step, host arrays, figures)
    self._old_logprobs = None
    self.sp = sampling_params
    self.sampler = sampling.shared_sampler(cfg, opts)
    self.records = {str(r.id): r for r in records}
    self.processor = processor
    self.reward_fn = reward_fn

  def _rollout_seed(self, step: int) -> int:
    return int(self.tc.seed) * 1_000_003 + step

  # ------------------------------------------------------------------ rollouts, kept for mu steps
  def _rollout_path(self, cycle: int) -> str:
    return os.path.join(self.workdir, "rollouts", f"{cycle:08d}.p{jax.process_index()}.npz")

  def __call__(self, batches, state):
    """The next step's rollouts, sampled with `state`'s params (or read back within a cycle)."""
    step, params = int(state.step), state.params
    mu = self.num_iterations
    if mu == 1:
      return self._rollout(batches, step, params)
    cycle = step - step % mu
    if self._rollouts is None or self._rollouts[0] != cycle:
      path = self._rollout_path(cycle)
      if step != cycle:
        # Resumed in the middle of a cycle: its rollouts (and their policy's log-probs) are on disk.
        if not os.path.exists(path):
          raise FileNotFoundError(f"{path}: the rollouts of steps {cycle}..{cycle + mu - 1} are missing, so step "
                                  f"{step} cannot resume; delete {os.path.join(self.workdir, 'checkpoints')} to "
                                  f"restart the run")
        with np.load(path) as z:
          host = {k: z[k] for k in z.files}
        info = {"_tokens_in": float(host["attention_mask"].sum() + host["completion_mask"].sum())}
      else:
        host, info = self._rollout(batches, step, params)
        host["old_logprobs"] = self._rollout_logprobs(host, params)
        _save_npz(path, host)
      self._rollouts = (cycle, host, info)
    _, host, info = self._rollouts
    return host, {**info, "rollout_seconds": info.get("rollout_seconds", 0.0) if step == cycle else 0.0}

  def _rollout_logprobs(self, host: dict, params) -> np.ndarray:
    """The rollout policy's log-probs of each micro-batch's loss tokens, [A, b, G, T + 1] (no dropout)."""
    from dcsft_jax.data import batching
    if self._old_logprobs is None:
      model = registry.of(self.cfg).model(self.cfg, dataclasses.replace(self.opts, deterministic=True))
      temp = float(self.sp.temperature or 1.0)
      self._old_logprobs = jax.jit(lambda p, mb: grpo.completion_logprobs(
          model, p, {k: v for k, v in mb.items() if k not in grpo.ROLLOUT_KEYS}, mb["completions"],
          temperature=temp))
    out = []
    for a in range(host["input_ids"].shape[0]):
      mb = batching.to_global({k: v[a] for k, v in host.items()}, self.mesh)
      lp = sampling._to_host(self._old_logprobs(params, mb))
      b = host["input_ids"].shape[1]
      lo = jax.process_index() * b
      out.append(lp.reshape(-1, *host["completions"].shape[2:])[lo:lo + b])
    return np.stack(out).astype(np.float32)

  def prune(self, steps) -> None:
    """After a save (Parts.after_save): rollouts older than the oldest kept checkpoint's cycle can no
    longer be resumed into."""
    if self.num_iterations == 1:
      return
    floor = min(steps) - min(steps) % self.num_iterations if steps else 0
    for p in glob.glob(os.path.join(self.workdir, "rollouts", f"*.p{jax.process_index()}.npz")):
      if int(os.path.basename(p).split(".")[0]) < floor:
        os.remove(p)

  def _rollout(self, batches, step: int, params):
    t0 = time.time()
    micro, prompt_tokens, refilled = [], 0.0, 0
    for _ in range(self.tc.accum):
      rolled = self._roll(next(batches), step, params)
      if self.algorithm.dynamic_sampling:
        rolled, n = self._refill(rolled, batches, step, params)
        refilled += n
        # The groups still without signal leave the loss.
        rolled["keep"] = rl.informative(rolled["rewards"]).astype(np.float32)
      micro.append(rolled)
      prompt_tokens += float(rolled["attention_mask"].sum())
    host = trainer.stack_micro(micro, self.cfg)
    info = {"_tokens_in": prompt_tokens + float(host["completion_mask"].sum()),
            "rollout_seconds": time.time() - t0}
    if self.algorithm.dynamic_sampling:
      info["refilled_groups"] = float(refilled)
    return host, info

  def _roll(self, batch, step: int, params) -> dict:
    """One batch of prompts rolled out with the current policy: its arrays (this process's rows), the
    loss tokens, the verifiers' rewards after the algorithm's overlong rule, and the truncated flags."""
    from dcsft_jax.data import batching
    G = self.sp.num_samples
    arrays = dict(batch.arrays)
    keys = sampling.sample_keys(self._rollout_seed(step), batch.ids, G)
    g = batching.to_global({**arrays, "keys": keys}, self.mesh)
    tokens, lengths, _ = self.sampler.generate(params, g, g.pop("keys"), self.sp)
    # Every host gets the global rollouts and keeps its own rows.
    b = arrays["input_ids"].shape[0]
    lo = jax.process_index() * b
    tokens = sampling._to_host(tokens)[lo:lo + b]
    lengths = sampling._to_host(lengths)[lo:lo + b]
    comps, mask = grpo.loss_tokens(tokens, lengths, self.sp.eos_ids, self.processor.im_end_id, self.sp.pad_id)
    rewards = np.zeros((b, G), np.float32)
    toks = sampling.completions(tokens, lengths, self.sp.eos_ids)
    for i, rid in enumerate(batch.ids):
      if rid is None or not arrays["valid"][i]:
        continue
      rec = self.records[rid]
      rewards[i] = [self.reward_fn(rec, self.processor.decode(t)) for t in toks[i]]
    return {**arrays, "completions": comps, "completion_mask": mask,
            **self._shape_rollouts(rewards, mask, tokens, lengths, arrays["valid"])}

  def _refill(self, rolled: dict, batches, step: int, params) -> tuple[dict, int]:
    """DAPO's dynamic sampling (ms-swift's `dynamic_sample`): each valid group whose rewards are all
    equal is replaced by an informative group from further batches of the same iterator, up to
    MAX_RESAMPLE batches (ms-swift's `max_resample_times`). The extra batches and their rollout keys
    come from the iterator and (seed, step, record id), so a resumed run refills the same way. Every
    process draws as many batches as the one that needs most; a batch of another shape is passed over."""
    from dcsft_jax import multihost
    rolled = {k: np.array(v) for k, v in rolled.items()}
    filled = 0
    for _ in range(MAX_RESAMPLE):
      dead = np.flatnonzero(rolled["valid"].astype(bool) & ~rl.informative(rolled["rewards"]))
      if not multihost.any_process(len(dead) > 0):
        break
      extra = self._roll(next(batches), step, params)
      if multihost.any_process(any(extra[k].shape != v.shape for k, v in rolled.items())):
        continue
      good = np.flatnonzero(extra["valid"].astype(bool) & rl.informative(extra["rewards"]))
      for i, j in zip(dead, good):
        for k, v in rolled.items():
          if k == "positions":           # [3, rows, L]
            v[:, i] = extra[k][:, j]
          else:
            v[i] = extra[k][j]
        filled += 1
    return rolled, filled

  def _shape_rollouts(self, rewards, mask, tokens, lengths, valid) -> dict:
    """The algorithm's overlong rule, on the host: overlong completions leave the loss ('filter') or get
    DAPO's length penalty on their reward ('soft')."""
    a = self.algorithm
    cut = grpo.truncated(tokens, lengths, self.sp.eos_ids)
    if a.overlong == "soft":
      budget = int(self.sp.max_new_tokens)
      rewards = rewards + (rl.overlong_penalty(lengths, budget, a.buffer_tokens(budget)) *
                           np.asarray(valid, bool)[:, None]).astype(np.float32)
    elif a.overlong == "filter":
      mask = mask * (~cut)[..., None].astype(mask.dtype)
    return {"completion_mask": mask, "rewards": rewards.astype(np.float32), "truncated": cut.astype(np.float32)}


def _save_npz(path: str, arrays: dict) -> None:
  """Atomically: a crash never leaves a half-written rollout file to resume from."""
  with atomic.writer(path, "wb") as f:
    np.savez(f, **arrays)


def rl_trainer(cfg, opts: ModelOptions, params, tc: trainer.TrainConfig, mesh, workdir: str, *,
               fingerprint: dict | None = None, **parts_kw) -> trainer.Trainer:
  """The training loop with an RL run's parts (`parts`'s keywords: sampling_params, records, processor,
  algorithm, beta, clip_eps, num_iterations, reward_fn)."""
  return trainer.Trainer(cfg, opts, params, tc, mesh, workdir, parts(cfg, opts, tc, mesh, workdir, **parts_kw),
                         fingerprint=fingerprint)
