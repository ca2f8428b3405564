"""Choices that must be the authors' (FIDELITY.md): the schedule's warmup, LoRA A's initialisation,
which parameters get weight decay, the paper configs' values, and FIDELITY.md's own citations."""
from __future__ import annotations

import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcsft_jax.train import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("steps", [25, 600])
def test_warmup_and_cosine_schedule_equal_transformers(steps):
  """HF's get_warmup_steps takes ceil(ratio * steps): 3 of the cold start's 25 (round gave 2), 60 of
  600. The learning rate at every step equals transformers' cosine-with-warmup LambdaLR."""
  import torch
  import transformers
  from transformers.training_args import TrainingArguments
  hf_args = types.SimpleNamespace(warmup_steps=0.1, warmup_ratio=0.1)   # either spelling (4.x / 5.x)
  want = TrainingArguments.get_warmup_steps(hf_args, steps)
  c = optim.OptimConfig(learning_rate=1e-5, warmup_ratio=0.1, schedule="cosine", total_steps=steps)
  assert optim.warmup_steps(c) == want == {25: 3, 600: 60}[steps]
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=1e-5)
  sched = transformers.get_cosine_schedule_with_warmup(opt, want, steps)
  theirs = []
  for _ in range(steps):
    theirs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  ours = np.asarray(jax.vmap(optim.schedule(c))(jnp.arange(steps)))
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)


def test_lora_a_initialisation_has_peft_bound():
  """PEFT: kaiming_uniform_(A, a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Ours draws the same
  distribution (bound, and the uniform's std bound/sqrt(3)); B starts at zero."""
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  from dcsft_jax.train import trainer
  cfg = tiny_config()
  base = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
  params = trainer.init_lora(base, cfg, M.LoraSpec(rank=32, alpha=64, vision=True, merger=True), seed=1)
  n = 0
  for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(k, "key", "") for k in path]
    if names[-1] == "lora_b":
      assert not np.asarray(a).any()
    if names[-1] != "lora_a":
      continue
    a = np.asarray(a)
    fan_in = a.shape[-2]
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(a).max() <= bound
    if a.size >= 4000:            # enough draws to pin the distribution down
      assert np.abs(a).max() > 0.97 * bound
      np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05)
      n += 1
  assert n >= 3


def test_weight_decay_follows_transformers_trainer_names():
  """transformers' Trainer (ms-swift 3.6's <4.53): no decay for biases and for names containing
  'layernorm'/'rmsnorm'; every other weight decays, the final norm, ViT norm1/norm2 and ln_q included."""
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  params = M.unbox(M.init_params(tiny_config(), abstract=True))
  got = {"/".join(getattr(k, "key", "") for k in path): bool(v)
         for path, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
  exempt = {k for k, v in got.items() if not v}
  assert exempt == {k for k in got if k.endswith("/bias") or "layernorm" in k}
  for name in ("norm/scale", "visual/blocks/norm1/scale", "visual/blocks/norm2/scale", "visual/ln_q/scale",
               "embed_tokens/embedding", "lm_head/kernel", "visual/patch_embed/kernel"):
    assert got[name], name
  for name in ("layers/input_layernorm/scale", "layers/post_attention_layernorm/scale", "layers/q_proj/bias"):
    assert not got[name], name


def _hf_decays(name: str, transformers_ge_4_53: bool) -> bool:
  """Trainer.get_decay_parameter_names on one parameter name of a model without nn.LayerNorm (Qwen2.5-VL's
  norms are all Qwen2RMSNorm): transformers 4.49 to 4.52.4 exempt names holding 'bias', 'layernorm' or
  'rmsnorm'; 4.53 on add the patterns `(?:^|\\.)norm(?:$|\\.)` and `_norm(?:$|\\.)`."""
  pats = ["bias", "layernorm", "rmsnorm"] + ([r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"] if transformers_ge_4_53 else [])
  return not any(re.search(p, name.lower()) for p in pats)


def test_weight_decay_is_the_same_under_the_pre_and_post_4_52_module_names():
  """The fork's model keys are transformers < 4.52's (`model.layers`, `visual`); 4.52 loads the same
  weights as `model.language_model.layers` and `model.visual`. Under the rule of the transformers ms-swift
  3.6 accepts (< 4.53), both spellings give the same decayed set, and ours is that set. transformers >= 4.53
  would exempt the final norm as well, and nothing else."""
  from dcsft_jax import hf
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, abstract=True))
  ours = {tuple(getattr(k, "key", "") for k in path): bool(v)
          for path, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
  later = []
  for e in hf.name_table(cfg):
    old = e.hf.replace("{i}", "0")
    new = re.sub(r"^model(?!\.(language_model|visual))", "model.language_model", re.sub(r"^visual", "model.visual", old))
    assert _hf_decays(old, False) == _hf_decays(new, False) == ours[e.path], (old, new)
    if _hf_decays(new, True) != ours[e.path]:
      later.append(new)
  assert len(ours) == len(hf.name_table(cfg))
  assert later == ["model.language_model.norm.weight"]


def _paper_configs():
  d = os.path.join(REPO, "configs", "paper")
  return sorted(f for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", _paper_configs())
def test_paper_configs_dry_run_at_the_authors_values(name):
  """Every paper config validates and dry-runs with the authors' values for what their scripts leave
  to ms-swift and HF generate: Adam b2 0.95, the checkpoint's repetition penalty (1.05 for
  Qwen2.5-VL-Instruct), qwen_vl_utils' 12,845,056-pixel cap for scoring and evaluation."""
  from dcsft_jax import config_base
  from dcsft_jax.stages import STAGES
  config = config_base.load_config_file(os.path.join(REPO, "configs", "paper", name)).get_config()
  for s in ("cold_start", "finetune", "grpo"):
    sec = config[s]
    assert (sec.b1, sec.b2, sec.eps, sec.weight_decay, sec.max_grad_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0), s
    assert sec.schedule == "cosine" and sec.warmup_ratio == 0.1
  assert config.data.max_pixels == 802816
  assert config.score.max_pixels == config.evaluate.max_pixels == 16384 * 28 * 28
  assert config.score.repetition_penalty == 0.0             # 0 = the checkpoint's generation_config.json
  assert config.evaluate.repetition_penalty == (1.1 if name.startswith("mmk12") else 0.0)
  assert config.grpo.repetition_penalty == 1.0 and config.grpo.num_iterations == 1
  assert (config.score.temperature, config.score.top_k, config.score.top_p) == (0.9, 50, 1.0)
  from dcsft_jax import run_config
  out = run_config.dry_run(config, [s.name for s in STAGES])
  assert out["parameters"] > 1e9


def test_checkpoint_generation_config_sets_the_penalty(tmp_path):
  """0 = the model directory's generation_config.json (Qwen2.5-VL-Instruct: 1.05 and two end tokens),
  as HF generate reads it; an explicit value wins; no file = 1.0."""
  import json
  from dcsft_jax import sampling
  from dcsft_jax.data import tokenizer
  from dcsft_jax.data.processor import Processor
  d = tokenizer.save_tiny_processor(str(tmp_path / "m"))
  proc = Processor.from_pretrained(d)
  sp = sampling.settings(d, proc, max_new_tokens=4)
  assert sp.repetition_penalty == 1.05 and sp.eos_ids == (400, 402)
  assert sampling.settings(d, proc, repetition_penalty=1.2, max_new_tokens=4).repetition_penalty == 1.2
  os.remove(os.path.join(d, "generation_config.json"))
  assert sampling.settings(d, proc, max_new_tokens=4).repetition_penalty == 1.0
  with open(os.path.join(d, "generation_config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="generation_config.json"):
    sampling.settings(d, proc, max_new_tokens=4)
  json.dumps(tokenizer.generation_config())


# ------------------------------------------------------------------------------------ FIDELITY.md
CITE = re.compile(r"`(dcsft_jax/[\w/]+\.py|configs/[\w/]+\.py):(\d+)` \(`([^`]+)`\)")


def test_fidelity_md_cites_lines_that_hold_the_symbol():
  """Each of our citations in FIDELITY.md, `path:line` (`symbol`), points at a line holding the symbol,
  so the table follows the code as it moves; and no row is left 'unknown' without saying why."""
  text = open(os.path.join(REPO, "FIDELITY.md")).read()
  cites = CITE.findall(text)
  assert len(cites) >= 30, len(cites)
  for path, line, symbol in cites:
    lines = open(os.path.join(REPO, path)).read().splitlines()
    assert int(line) <= len(lines), (path, line)
    assert symbol in lines[int(line) - 1], f"FIDELITY.md cites {path}:{line} for {symbol!r}: " \
                                          f"{lines[int(line) - 1].strip()!r}"
  rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| ---")]
  for r in rows:
    cells = [c.strip() for c in r.strip("|").split("|")]
    if cells[-1].lower().startswith("unknown"):
      assert len(cells[-1]) > len("unknown") + 10, f"an 'unknown' row must say why: {r}"
