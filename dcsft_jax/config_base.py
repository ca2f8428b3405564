"""Every config field, with its meaning and the paper's value where it has one. Config files
(configs/dcsft.py, configs/paper/*.py) start from `base()` and change what their run needs; a key
that is not here is a typo, and run_config.validate names it before any work starts.
"""
from __future__ import annotations

import importlib.util
import os
import types

import ml_collections


def rl_overrides() -> ml_collections.ConfigDict:
  """One section per named RL algorithm, a key per part of it, every key unset (None)."""
  import dataclasses

  from ml_collections import config_dict

  from dcsft_jax.train import rl
  fields = dataclasses.fields(rl.Algorithm)
  return ml_collections.ConfigDict({name: {f.name: config_dict.placeholder(type(f.default)) for f in fields}
                                    for name in rl.ALGORITHMS})


def train_section(**overrides) -> ml_collections.ConfigDict:
  """One training run's settings. The paper: AdamW, lr 1e-5, warmup 0.1, batch 16 (1 x accum 2 x 8
  GPUs), ms-swift's cosine schedule, weight decay 0.1, clipping at 1.0; LoRA r32 a64 dropout .05.
  What the paper's scripts leave unset is ms-swift 3.6's default (FIDELITY.md)."""
  s = ml_collections.ConfigDict(dict(
      model="cold_start_model",    # the starting model: a stage's model directory in the workdir, or a path
      steps=0,                     # optimizer steps; 0 = `epochs` passes over the data
      epochs=1.0,
      batch_size=16,               # examples (GRPO: prompts) per optimizer step, over all devices
      accum=1,                     # micro-batches per step (gradient accumulation)
      learning_rate=1e-5,
      warmup_ratio=0.1,
      schedule="cosine",           # cosine | linear | constant
      weight_decay=0.1,
      b1=0.9,                      # AdamW betas and epsilon: ms-swift's defaults (adam_beta2 0.95,
      b2=0.95,                     # not transformers' 0.999)
      eps=1e-8,
      max_grad_norm=1.0,
      adam_moments="float32",      # float32 | bfloat16: Adam's moments as stored between steps (half the
                                   # optimizer state; the second moment stochastically rounded, train/optim.py)
      max_length=0,                # > 0: drop samples longer than this many tokens, image tokens
                                   # included (ms-swift's max_length; counted and reported), 0 = keep all
      lora=True,                   # False = full fine-tuning
      lora_rank=32,
      lora_alpha=64.0,
      lora_dropout=0.05,
      lora_vision=False,           # adapters on the ViT blocks and the aligner too
      freeze_vit=False,            # the paper's scripts: freeze_vit false, freeze_aligner false
      freeze_aligner=False,
      save_every=100,              # Orbax checkpoint every N steps (and at the end, and on SIGTERM)
      keep=2,                      # checkpoints kept
      eval_every=0,                # OOD accuracy every N steps for the Fig. 3 curves (0 = off)
  ))
  s.update(overrides)
  return s


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "workdir/dcsft"
  # Stages run in this order; each one is skipped when its outputs already exist in the workdir.
  c.stages = "init,cold_start,score,curate,finetune,grpo,evaluate,report,export"
  # Start one stage over: delete its outputs (journal and checkpoints included) and those of every
  # later stage that reads them, before the run; e.g. after changing its settings, which a finished
  # stage and a resume both refuse to mix with the old ones.
  c.restart_stage = ""
  # A training run none of whose checkpoints can be read (each is set aside, named in one line):
  # 'restart' starts it from step 0, 'stop' stops the run for a look first.
  c.damaged_checkpoints = "restart"
  c.seed = 0
  # Training seeds: finetune and GRPO run once per seed (seed s > 0 as NAME.seed{s}, its own LoRA
  # init, data order and dropout) on the same cold start, scores and curated files; evaluation covers
  # every seed, and the report gives mean +- std over seeds and paired-bootstrap intervals.
  c.seeds = 1
  c.distributed = "auto"             # 'auto': jax.distributed.initialize() under a multi-host launcher
  # Device mesh: one size may be -1 (all remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""               # a local Qwen2.5-VL or Qwen3-VL directory; empty = the embedded tiny model
  c.model.preset = ""                # a preset of models.registry (tiny | 3b | 7b | <family>_tiny | <family>_<size>):
                                     # the model without hf_path; with it, the shapes hf_path must have (checked)
  c.model.dtype = "float32"          # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"    # master weights and optimizer state
  c.model.attention = "auto"         # auto | xla | cudnn (GPU) | splash (TPU)
  c.model.remat = False              # recompute each layer in the backward pass (memory for compute)
  # Keep frozen weights (the base model under LoRA, GRPO's reference copy, and the whole model that
  # scoring and evaluation sample from) in `dtype` instead of `param_dtype`: half the memory in a bf16
  # run, same computation (layers cast weights to `dtype`); adapters and Adam moments stay in
  # param_dtype. The authors' LoRA runs load the base in bf16, and their samplers a bf16 model.
  c.model.frozen_in_compute_dtype = False

  # Datasets (dcsft_jax/data/sources.py): builtin:SPLIT | json:PATH | tfds:NAME[:SPLIT] | hf:PATH[:SPLIT],
  # each optionally followed by a record range [START:STOP].
  c.data = ml_collections.ConfigDict()
  c.data.train = "builtin:train"     # post-training prompts: scored, curated, GRPO's prompts
  c.data.train_limit = 0             # 0 = every record
  c.data.eval = "id=builtin:test,rendition=builtin:rendition,adversarial=builtin:adversarial"
  c.data.ood = "rendition,adversarial"   # which eval sets are out of distribution (the OOD average)
  c.data.image_root = ""             # 'OLD_PREFIX=NEW_PREFIX' or a directory, for the paper's JSON paths
  c.data.tfds_dir = ""               # where prepared TFDS datasets live
  c.data.label_names = ""            # JSON file mapping TFDS class names (WordNet ids) to answer words
  c.data.skip_bad_records = False    # True: skip (and count) unreadable records instead of stopping
  # An image with more pixels than this is a bad record (a decompression bomb: a small file that
  # decodes to gigabytes). 0 = PIL's own limit (89.5M pixels warn, twice that refuse).
  c.data.max_image_pixels = 0
  c.data.min_pixels = 0              # 0 = the processor's own setting
  c.data.max_pixels = 0              # the paper: 802816 (1024 * 28 * 28)
  c.data.answer_budget = "error"     # error | warn: a classification answer longer than the max_new_tokens of a
                                     # stage that generates for it (checked before any work; dcsft_jax/answer_budget.py)
  c.data.max_buckets = 4             # image-size classes, i.e. compiled shapes per stage
  c.data.label_noise = 0.0           # builtin train only: wrong labels, the kind of data that lands in 'hard'
  c.data.builtin_image_size = 56

  # Step 0, optional (stage 'pretrain', not in the default stages): full SFT of the base model on a broad
  # set before the cold start, the prior a pretrained VLM brings (README "A miniature with a prior");
  # a config that runs it points cold_start.model at its output, 'pretrained_model'.
  c.pretrain = train_section(model="base_model", lora=False, epochs=1.0)
  c.pretrain.data = ""               # a dataset spec, e.g. builtin:prior[2048:]

  # Step 1: cold start, full fine-tuning (the paper: 400 samples, 1 epoch, lr 1e-5, batch 16).
  c.cold_start = train_section(model="base_model", lora=False, epochs=1.0)
  c.cold_start.data = "builtin:train[:400]"

  # Step 2: difficulty scoring (the paper: K = 8, T = 0.9, top-k 50, top-p 1.0, 128 new tokens).
  c.score = ml_collections.ConfigDict()
  c.score.model = "cold_start_model"
  c.score.num_samples = 8
  c.score.temperature = 0.9
  c.score.top_k = 50
  c.score.top_p = 1.0
  c.score.max_new_tokens = 128
  c.score.batch_size = 16            # prompts per batch (each gives num_samples answers)
  # transformers' repetition penalty (over prompt and answer, before temperature); 0 = the scored
  # model's generation_config.json (Qwen2.5-VL-Instruct: 1.05), as HF generate takes it.
  c.score.repetition_penalty = 0.0
  c.score.max_pixels = 0             # image size cap while scoring; 0 = data.max_pixels

  # Step 3: curation into recipes among sft_m (medium), sft_em (easy+medium), sft (all), easy, medium, hard.
  c.curate = ml_collections.ConfigDict()
  c.curate.recipes = "sft,sft_m,sft_em"
  c.curate.hard_ratio = 0.0          # Fig. 5: add back this share of the hard bucket (recipes without hard)
  c.curate.window_lo = 0.0           # keep only pass rates in [window_lo, window_hi]
  c.curate.window_hi = 1.0

  # Step 4: LoRA SFT on each recipe (the paper: 600 steps, batch 16, lr 1e-5, warmup 0.1, r32 a64).
  c.finetune = train_section(steps=600)
  c.finetune.recipes = "sft,sft_m,sft_em"

  # The RL baseline (the paper: 600 steps of 16 prompts x 8 generations, T 0.9, beta 0.04, LoRA).
  c.grpo = train_section(steps=600)
  c.grpo.num_generations = 8
  c.grpo.temperature = 0.9
  c.grpo.top_k = 50
  c.grpo.top_p = 1.0
  c.grpo.max_new_tokens = 128
  c.grpo.beta = 0.04
  c.grpo.clip_eps = 0.2
  c.grpo.num_iterations = 1          # mu: optimizer steps per batch of rollouts (> 1 makes clip_eps act)
  c.grpo.repetition_penalty = 1.0    # the rollouts' (0 = the model's generation_config.json)
  # The RL baselines, each a run models/NAME (dcsft_jax/train/rl.py): grpo (the paper's, with beta and
  # clip_eps above), dr_grpo, dapo, gspo, rloo (as published: their own clip and KL).
  c.grpo.algorithms = "grpo"
  # Any part of a baseline, per algorithm: --config.grpo.overrides.dapo.epsilon_high=0.3 (the fields of
  # train/rl.py's Algorithm: advantage, ratio, aggregation, epsilon_low, epsilon_high, beta,
  # dynamic_sampling, overlong, overlong_buffer). Unset: the algorithm's own; grpo's beta and clip
  # are grpo.beta and grpo.clip_eps above.
  c.grpo.overrides = rl_overrides()

  # Step 5: greedy evaluation of each NAME=MODEL on every data.eval set.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.models = ("cold_start=cold_start_model,sft=models/sft,grpo=models/grpo,sft_m=models/sft_m,"
                       "sft_em=models/sft_em")
  c.evaluate.batch_size = 32
  c.evaluate.max_new_tokens = 128
  c.evaluate.limit = 0               # 0 = every record of each set
  c.evaluate.repetition_penalty = 0.0   # 0 = each model's generation_config.json (as HF generate)
  c.evaluate.max_pixels = 0          # image size cap while evaluating; 0 = data.max_pixels
  # LoRA models evaluated merged (kernel + a @ b * alpha/r in fp32, then the stored dtype), as the
  # authors evaluate their `swift export --merge_lora` checkpoints; False applies the adapters on the fly.
  c.evaluate.merge_lora = True

  # The verifier that scoring, GRPO's reward and evaluation share (dcsft_jax/verify.py).
  c.verify = ml_collections.ConfigDict()
  c.verify.math_verify_only = False  # reasoning answers by math-verify alone, as ms-swift's 'accuracy' reward
                                     # judges them (no OR with our parser; a reference it cannot parse, such
                                     # as a bare option letter, scores 0). Needs math-verify installed

  c.report = ml_collections.ConfigDict()
  c.report.curve_limit = 0           # records per OOD set for the accuracy-vs-step curves (0 = all)

  # Step 6: the model to hand back to transformers.
  c.export = ml_collections.ConfigDict()
  c.export.model = "models/sft_em"
  c.export.dtype = ""                # '' = the checkpoint's own dtype (config.json torch_dtype)
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """The config file's argument (`--config=FILE.py:key=value,key=value`, big_vision's habit) over
  `defaults`; values keep their default's type. An unknown key is refused, naming the known ones."""
  out = ml_collections.ConfigDict(defaults)
  for item in [x for x in (arg or "").split(",") if x.strip()]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key one of {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = (value.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(value.strip())
  return out


def load_config_file(path: str, beside: str | None = None) -> types.ModuleType:
  """A config file as a module, loaded by path the way config_flags loads `--config=FILE.py`:
  configs/ is not a package, so one config file reaches another (configs/paper/_common.py,
  configs/dcsft.py) this way. `beside`: resolve `path` next to this file (a config passes `__file__`)."""
  if beside is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(beside)), path)
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  # A name per path, so two config files never share a module in sys.modules' sense.
  name = "dcsft_config_" + "".join(ch if ch.isalnum() else "_" for ch in path)
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def field_help() -> dict[str, str]:
  """Each field's comment in this file, by dotted key ("c.score.num_samples = 8   # K answers ...", and
  train_section's "steps=0,   # ..." for every training section), with the comment lines aligned under
  it: what `python -m dcsft_jax.main -h` prints beside the defaults."""
  import re
  out, last = {}, None
  sections = [k for k, v in base().items() if hasattr(v, "keys") and "learning_rate" in v]
  with open(__file__, encoding="utf-8") as f:
    for line in f:
      m = re.match(r"\s*c\.([\w.]+)\s*=.*?#\s?(.*)$", line) or re.match(r"\s{6}(\w+)=.*?#\s?(.*)$", line)
      if m and not line.lstrip().startswith("#"):
        keys = [m.group(1)] if line.lstrip().startswith("c.") else [f"{sec}.{m.group(1)}" for sec in sections]
        for k in keys:
          out[k] = m.group(2).strip()
        last = keys
        continue
      cont = re.match(r"\s{20,}#\s?(.*)$", line)         # a comment aligned under the previous one
      if cont and last:
        for k in last:
          out[k] += " " + cont.group(1).strip()
      else:
        last = None
  return out


def resolve_config(value: str) -> str:
  """--config's value with a bare name resolved: `dcsft`, `paper/imagenet_qwen25vl_3b` or `bench/...`
  (with or without .py, and any `:args` after it) name the configs shipped with the package, so a
  console script works from any directory; a path that exists is left as it is."""
  name, sep, args = value.partition(":")
  if os.path.exists(name):
    return value
  here = os.path.dirname(os.path.abspath(__file__))
  rel = name if name.endswith(".py") else name + ".py"
  rel = rel[len("configs/"):] if rel.startswith("configs/") else rel
  # Installed: dcsft_jax/configs/ (pyproject maps the repository's configs/ there); a source tree: ../configs.
  for root in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
    path = os.path.join(root, rel)
    if os.path.isfile(path):
      return path + sep + args
  return value
