"""The GRPO training loop: each step samples G answers per prompt with the current policy, scores
them with the verifiers, and takes one jitted policy-gradient step (train/grpo.py's loss).

It is the SFT loop (trainer.SFTTrainer) with a different way of making a batch: the same optimizer,
LoRA, sharding, Orbax checkpoints, SIGTERM handling and metrics. Rollout keys come from (seed, step,
record id, k), so a resumed run draws the same answers as an uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from dcsft_jax import sampling, verify
from dcsft_jax.models import qwen2_5_vl as model_lib
from dcsft_jax.train import grpo, trainer


def _reward(rec, text: str) -> float:
  """The paper's rewards: 1/0 exact match for labels, IoU >= 0.5 for boxes (verify.verify)."""
  return float(verify.verify(rec.task, text, rec.answer))


class GRPOTrainer(trainer.SFTTrainer):
  """GRPO on `records` (objects with .id .task .answer) from a generation-batch iterator.

  sampling: the rollout settings; num_samples is the group size G. The reference policy is the
  starting model: with LoRA the params with adapters switched off, with full fine-tuning a frozen
  copy made here.
  """

  def __init__(self, cfg, opts: model_lib.ModelOptions, params, tc: trainer.TrainConfig, mesh, workdir: str, *,
               sampling_params: sampling.SamplingParams, records, processor, beta: float = 0.04,
               clip_eps: float = 0.2, reward_fn: Callable[[object, str], float] = _reward):
    if sampling_params.num_samples < 2:
      raise ValueError(f"GRPO needs at least 2 generations per prompt, got {sampling_params.num_samples}")
    super().__init__(cfg, opts, params, tc, mesh, workdir, loss=grpo.make_loss(beta=beta, clip_eps=clip_eps),
                     count_name="completions")
    # A real copy: the state's frozen leaves are donated to the step and must not be the reference.
    # It is frozen, so it is stored like the frozen base of a LoRA run (tc.frozen_dtype).
    copy = (lambda x: x.astype(tc.frozen_dtype)) if tc.frozen_dtype is not None else (lambda x: x.copy())
    self.ref_params = jax.tree.map(copy, self.state.params) if tc.lora is None else None
    self.sp = sampling_params
    self.sampler = sampling.shared_sampler(cfg, self.opts)
    self.records = {str(r.id): r for r in records}
    self.processor = processor
    self.reward_fn = reward_fn
    self._flops_per_token = None        # rollouts and three forwards a step: 6N per token does not apply

  def _rollout_seed(self, step: int) -> int:
    return int(self.tc.seed) * 1_000_003 + step

  def _host_batch(self, batches):
    from dcsft_jax.data import batching
    t0 = time.time()
    step = int(self.state.step)
    params = self.state.params
    G, T = self.sp.num_samples, self.sp.max_new_tokens
    micro, prompt_tokens = [], 0.0
    for _ in range(self.tc.accum):
      batch = next(batches)
      arrays = dict(batch.arrays)
      keys = sampling.sample_keys(self._rollout_seed(step), batch.ids, G)
      g = batching.to_global({**arrays, "keys": keys}, self.mesh)
      tokens, lengths, _ = self.sampler.generate(params, g, g.pop("keys"), self.sp)
      # Every host gets the global rollouts and keeps its own rows.
      b = arrays["input_ids"].shape[0]
      lo = jax.process_index() * b
      tokens = sampling._to_host(tokens)[lo:lo + b]
      lengths = sampling._to_host(lengths)[lo:lo + b]
      mask = (np.arange(T)[None, None, :] < lengths[:, :, None]).astype(np.int32)
      rewards = np.zeros((b, G), np.float32)
      toks = sampling.completions(tokens, lengths, self.sp.eos_ids)
      for i, rid in enumerate(batch.ids):
        if rid is None or not arrays["valid"][i]:
          continue
        rec = self.records[rid]
        rewards[i] = [self.reward_fn(rec, self.processor.decode(t)) for t in toks[i]]
      micro.append({**arrays, "completions": tokens.astype(np.int32), "completion_mask": mask, "rewards": rewards})
      prompt_tokens += float(arrays["attention_mask"].sum())
    host = trainer.stack_micro(micro)
    info = {"_tokens_in": prompt_tokens + float(host["completion_mask"].sum()),
            "rollout_seconds": time.time() - t0}
    return host, info

  def _run_step(self, batch):
    if self.ref_params is None:
      return self.step_fn(self.state, batch)
    return self.step_fn(self.state, batch, self.ref_params)

  def _postfix(self, m: dict) -> dict:
    return {"loss": f"{m['loss']:.4f}", "reward": f"{m['reward']:.3f}", "kl": f"{m['kl']:.4f}"}
