"""Checks a run config before any work starts, naming the key that is wrong."""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import ml_collections

from dcsft_jax import mesh as mesh_lib
from dcsft_jax.models import attention
from dcsft_jax.models import params as params_lib
from dcsft_jax.models import registry
from dcsft_jax.models.layers import ModelOptions

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  pass


def _check(ok: bool, key: str, msg: str):
  if not ok:
    raise ConfigError(f"config.{key}: {msg}")


def _check_keys(config, schema, prefix: str = "") -> None:
  for k in config.keys():
    key = f"{prefix}{k}"
    _check(k in schema, key, "unknown key (a typo?); the keys here are " + ", ".join(sorted(schema.keys())))
    if isinstance(schema[k], ml_collections.ConfigDict):
      _check(isinstance(config[k], ml_collections.ConfigDict), key, "must be a section (ConfigDict)")
      _check_keys(config[k], schema[k], key + ".")
  for k in schema.keys():
    _check(k in config, f"{prefix}{k}", "is missing; start config files from dcsft_jax.config_base.base()")


def validate(config: ml_collections.ConfigDict, known_stages, *, check_files: bool = True) -> list[str]:
  """Returns the stage names to run; raises ConfigError naming the first bad key.

  check_files=False skips the checks that need the machine's files (model and data paths)."""
  from dcsft_jax import config_base
  _check_keys(config, config_base.base())
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  _check(bool(stages), "stages", "is empty; pick from " + ",".join(known_stages))
  for s in stages:
    _check(s in known_stages, "stages", f"unknown stage {s!r}; the stages are {','.join(known_stages)}")
  for s in [x.strip() for x in str(config.restart_stage).split(",") if x.strip()]:
    _check(s in known_stages, "restart_stage", f"unknown stage {s!r}; the stages are {','.join(known_stages)}")
  # Pipeline order whatever the listed order: a stage's inputs come from the stages before it.
  stages = [s for s in known_stages if s in stages]
  _check(bool(config.workdir), "workdir", "must be a directory path")
  _check(isinstance(config.seeds, int) and not isinstance(config.seeds, bool) and config.seeds >= 1, "seeds",
         f"{config.seeds!r} must be a positive integer (training runs per method)")
  _check(config.distributed in ("auto", "on", "off"), "distributed", f"{config.distributed!r} is not auto|on|off")
  for axis in config.mesh.keys():
    _check(axis in mesh_lib.MESH_AXES, f"mesh.{axis}", f"unknown mesh axis; the axes are {mesh_lib.MESH_AXES}")
    v = config.mesh[axis]
    _check(isinstance(v, int) and (v == -1 or v >= 1), f"mesh.{axis}", f"{v!r} must be a positive int or -1")
  m = config.model
  _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} is not one of {sorted(DTYPES)}")
  _check(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r} is not one of {sorted(DTYPES)}")
  _check(m.attention in attention.IMPLEMENTATIONS, "model.attention",
         f"{m.attention!r} is not one of {attention.IMPLEMENTATIONS}")
  presets = registry.preset_names()
  _check(m.preset in ("",) + presets, "model.preset", f"{m.preset!r} is not '' or one of {', '.join(presets)}")
  if m.hf_path and check_files:
    _check(os.path.isfile(os.path.join(m.hf_path, "config.json")), "model.hf_path",
           f"{m.hf_path!r} has no config.json; point it at a local Hugging Face Qwen-VL directory")
    # The tokenizer and processor travel with the weights into every model directory; without them the
    # run would stop only at the cold start, naming base_model/.
    missing = [f for f in ("tokenizer_config.json", "preprocessor_config.json")
               if not os.path.isfile(os.path.join(m.hf_path, f))]
    if not os.path.isfile(os.path.join(m.hf_path, "tokenizer.json")) and not os.path.isfile(
        os.path.join(m.hf_path, "vocab.json")):
      missing.insert(0, "tokenizer.json")
    _check(not missing, "model.hf_path",
           f"{m.hf_path} has no {', '.join(missing)}; copy the released model's tokenizer and processor files "
           f"(tokenizer.json, tokenizer_config.json, preprocessor_config.json, chat template) into it")
    if m.preset:
      problem = _preset_mismatch(m.hf_path, m.preset)
      _check(problem is None, "model.preset", str(problem))
  _check(config.export.dtype in ("",) + tuple(DTYPES), "export.dtype",
         f"{config.export.dtype!r} is not '' or one of {sorted(DTYPES)}")
  _validate_data(config, stages, check_files)
  _validate_training(config, stages)
  _validate_verify(config, stages)
  return stages


def _validate_verify(config, stages) -> None:
  """verify.math_verify_only needs math-verify wherever a stage verifies answers."""
  if not config.verify.math_verify_only or not {"score", "grpo", "evaluate"} & set(stages):
    return
  import importlib
  from dcsft_jax import optional
  try:
    importlib.import_module("math_verify")
  except Exception as e:  # noqa: BLE001 - a broken install (an antlr mismatch) is as good as none
    _check(False, "verify.math_verify_only", f"needs math-verify, which is not usable here ({type(e).__name__}). "
           f"Install it: {optional.install_hint('math_verify')}, or set it False")


def _preset_mismatch(hf_path: str, preset: str) -> str | None:
  have, want = registry.from_pretrained(hf_path), registry.preset(preset)
  if registry.of(have) is not registry.of(want):
    return (f"{hf_path}/config.json is a {registry.of(have).title} model, but preset {preset!r} is "
            f"{registry.of(want).title}; fix one of them")
  for part in ("text", "vision"):
    for f in ("hidden_size", "intermediate_size"):
      a, b = getattr(getattr(have, part), f), getattr(getattr(want, part), f)
      if a != b:
        return f"{hf_path}/config.json has {part} {f} {a}, but preset {preset!r} has {b}; fix one of them"
  if have.text.num_hidden_layers != want.text.num_hidden_layers:
    return f"{hf_path}/config.json has {have.text.num_hidden_layers} layers, preset {preset!r} has {want.text.num_hidden_layers}"
  return None


TRAIN_SECTIONS = ("pretrain", "cold_start", "finetune", "grpo")


def _validate_training(config, stages) -> None:
  from dcsft_jax import sampling
  from dcsft_jax.train import optim
  for name in TRAIN_SECTIONS:
    s = config[name]
    for f in ("batch_size", "accum", "save_every", "keep", "lora_rank"):
      _positive(config, f"{name}.{f}")
    _check(isinstance(s.steps, int) and s.steps >= 0, f"{name}.steps", f"{s.steps!r} must be an int >= 0")
    _check(s.steps > 0 or s.epochs > 0, f"{name}.epochs", "set steps or epochs > 0")
    _check(s.batch_size % s.accum == 0, f"{name}.accum", f"batch_size {s.batch_size} is not divisible by accum {s.accum}")
    _check(s.learning_rate > 0, f"{name}.learning_rate", f"{s.learning_rate!r} must be > 0")
    _check(0 <= s.warmup_ratio < 1, f"{name}.warmup_ratio", f"{s.warmup_ratio!r} must be in [0, 1)")
    _check(s.schedule in optim.SCHEDULES, f"{name}.schedule", f"{s.schedule!r} is not one of {optim.SCHEDULES}")
    _check(s.adam_moments in optim.MOMENTS, f"{name}.adam_moments", f"{s.adam_moments!r} is not one of {optim.MOMENTS}")
    _check(s.weight_decay >= 0, f"{name}.weight_decay", f"{s.weight_decay!r} must be >= 0")
    for f in ("b1", "b2"):
      _check(0 <= s[f] < 1, f"{name}.{f}", f"{s[f]!r} must be in [0, 1)")
    _check(s.eps > 0, f"{name}.eps", f"{s.eps!r} must be > 0")
    _check(isinstance(s.max_length, int) and s.max_length >= 0, f"{name}.max_length",
           f"{s.max_length!r} must be an int >= 0 (0 = no limit)")
    _check(s.max_grad_norm >= 0, f"{name}.max_grad_norm", f"{s.max_grad_norm!r} must be >= 0 (0 = no clipping)")
    _check(0 <= s.lora_dropout < 1, f"{name}.lora_dropout", f"{s.lora_dropout!r} must be in [0, 1)")
    _check(s.lora_alpha > 0, f"{name}.lora_alpha", f"{s.lora_alpha!r} must be > 0")
    _check(isinstance(s.eval_every, int) and s.eval_every >= 0, f"{name}.eval_every", f"{s.eval_every!r} must be >= 0")
    _check(bool(s.model), f"{name}.model", "name the starting model (a workdir model directory or a path)")
  try:
    from dcsft_jax.data import sources
    sources.parse(config.cold_start.data)
  except ValueError as e:
    raise ConfigError(f"config.cold_start.data: {e}") from None
  curated = [r.strip() for r in config.curate.recipes.split(",") if r.strip()]
  for r in [x.strip() for x in config.finetune.recipes.split(",") if x.strip()]:
    _check(_recipe_problem(r) is None, "finetune.recipes", str(_recipe_problem(r)))
    if "finetune" in stages and "curate" in stages:
      _check(r in curated, "finetune.recipes", f"{r!r} is not made by curate.recipes ({','.join(curated)})")
  g = config.grpo
  _check(isinstance(g.num_generations, int) and g.num_generations >= 2, "grpo.num_generations",
         f"{g.num_generations!r}: GRPO needs at least 2 generations per prompt")
  try:
    sampling.SamplingParams(max_new_tokens=g.max_new_tokens, num_samples=g.num_generations,
                            temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  except ValueError as e:
    raise ConfigError(f"config.grpo: {e}") from None
  _check(g.temperature > 0, "grpo.temperature", "GRPO samples: temperature must be > 0")
  _check(g.beta >= 0, "grpo.beta", f"{g.beta!r} must be >= 0")
  _positive(config, "grpo.num_iterations")
  for key in ("score.repetition_penalty", "evaluate.repetition_penalty", "grpo.repetition_penalty"):
    section, field = key.split(".")
    v = config[section][field]
    _check(v >= 0, key, f"{v!r} must be > 0, or 0 for the model's generation_config.json (1.0 = no penalty)")
  for key in ("score.max_pixels", "evaluate.max_pixels"):
    section, field = key.split(".")
    v = config[section][field]
    _check(isinstance(v, int) and v >= 0, key, f"{v!r} must be an int >= 0 (0 = data.max_pixels)")
  _check(0 < g.clip_eps < 1, "grpo.clip_eps", f"{g.clip_eps!r} must be in (0, 1)")
  from dcsft_jax.train import rl
  names = rl_algorithms(config)
  _check(bool(names), "grpo.algorithms", f"is empty; name one or more of {', '.join(rl.ALGORITHMS)}")
  for a in names:
    _check(a in rl.ALGORITHMS, "grpo.algorithms", f"unknown algorithm {a!r}; the algorithms are {', '.join(rl.ALGORITHMS)}")
  _check(len(set(names)) == len(names), "grpo.algorithms", f"{g.algorithms!r} names an algorithm twice")
  for a in names:
    rl_algorithm(config, a)          # every override a part of that algorithm can take
  _check(isinstance(config.report.curve_limit, int) and config.report.curve_limit >= 0, "report.curve_limit",
         f"{config.report.curve_limit!r} must be an int >= 0")
  _check(bool(config.export.model), "export.model", "name the model to export (e.g. models/sft_em)")


# The batch of each stage that the mesh splits into data x fsdp shards: (key, rows per micro-batch).
_SHARDED_BATCHES = {
    "pretrain": lambda c: [("pretrain.batch_size", c.pretrain.batch_size // c.pretrain.accum)],
    "cold_start": lambda c: [("cold_start.batch_size", c.cold_start.batch_size // c.cold_start.accum)],
    "finetune": lambda c: [("finetune.batch_size", c.finetune.batch_size // c.finetune.accum)],
    "grpo": lambda c: [("grpo.batch_size", c.grpo.batch_size // c.grpo.accum)],
    "score": lambda c: [("score.batch_size", c.score.batch_size)],
    "evaluate": lambda c: [("evaluate.batch_size", c.evaluate.batch_size)],
}


def validate_mesh(config, stages: list[str], mesh) -> None:
  """Checks every batch the stages will split over the mesh before the first stage starts (the
  stages check too, but only when they start, after the earlier ones have run)."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  kernel = {"cudnn": "gpu", "splash": "tpu"}.get(config.model.attention)
  platform = mesh_lib.platform(mesh)
  _check(kernel is None or platform == kernel or (kernel, platform) == ("gpu", "cuda"), "model.attention",
         f"{config.model.attention!r} is a {kernel} kernel and this mesh's devices are {platform}; use 'auto'")
  curves = any(stage in stages and config[stage].eval_every > 0 for stage in TRAIN_SECTIONS)
  for stage in stages + (["evaluate"] if curves and "evaluate" not in stages else []):
    for key, rows in _SHARDED_BATCHES.get(stage, lambda c: [])(config):
      section = key.split(".")[0]
      accum = config[section].accum if "accum" in config[section] else 1
      _check(rows % ways == 0, key, f"{rows} rows per micro-batch (batch_size / accum) are not divisible by the "
             f"mesh's data x fsdp = {ways} batch shards ({dict(mesh.shape)}); use a multiple of {ways * accum}, "
             f"or another --config.mesh")


def dry_run(config, known_stages) -> dict:
  """Validates `config` without touching its files, builds the model's shapes with jax.eval_shape,
  and says which data sources resolve on this machine: {spec: None (readable) or the problem}."""
  from dcsft_jax.data import sources
  validate(config, known_stages, check_files=False)
  m = config.model
  cfg = registry.model_config(m.hf_path, m.preset)
  n = params_lib.count_params(registry.of(cfg).init_params(cfg, model_options(config), abstract=True))
  d = config.data
  specs = {"data.train": d.train, "cold_start.data": config.cold_start.data,
           **{f"data.eval[{k}]": str(v) for k, v in sources.parse_sets(d.eval).items()}}
  return {"parameters": n, "sources": {k: sources.check(sources.parse(v), tfds_dir=d.tfds_dir)
                                       for k, v in specs.items()}}


def _recipe_problem(name: str) -> str | None:
  from dcsft_jax import curation
  try:
    curation.parse_recipe(name)
  except ValueError as e:
    return str(e)
  return None


def _positive(config, key: str):
  section, field = key.split(".")
  v = config[section][field]
  _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, f"{v!r} must be a positive integer")


def _validate_data(config, stages, check_files: bool = True) -> None:
  from dcsft_jax import sampling
  from dcsft_jax.data import sources
  d = config.data
  _check(isinstance(d.max_image_pixels, int) and d.max_image_pixels >= 0, "data.max_image_pixels",
         f"{d.max_image_pixels!r} must be a pixel count >= 0 (0 = PIL's limit)")
  try:
    train = sources.parse(d.train)
  except ValueError as e:
    raise ConfigError(f"config.data.train: {e}") from None
  try:
    sets = sources.parse_sets(d.eval)
  except ValueError as e:
    raise ConfigError(f"config.data.eval: {e}") from None
  for name in [x.strip() for x in d.ood.split(",") if x.strip()]:
    _check(name in sets, "data.ood", f"{name!r} is not one of the data.eval sets {list(sets)}")
  try:
    cold = sources.parse(config.cold_start.data)
  except ValueError as e:
    raise ConfigError(f"config.cold_start.data: {e}") from None
  _check("pretrain" not in stages or bool(config.pretrain.data), "pretrain.data",
         "the 'pretrain' stage needs a dataset spec (e.g. builtin:prior[2048:]), or leave it out of stages")
  pre = None
  if config.pretrain.data:
    try:
      pre = sources.parse(config.pretrain.data)
    except ValueError as e:
      raise ConfigError(f"config.pretrain.data: {e}") from None
  needs = {"score": [("data.train", train)], "curate": [("data.train", train)], "grpo": [("data.train", train)],
           "cold_start": [("cold_start.data", cold)], "pretrain": [("pretrain.data", pre)] if pre else [],
           "evaluate": [(f"data.eval[{n}]", s) for n, s in sets.items()]}
  for stage in stages if check_files else ():
    for key, spec in needs.get(stage, []):
      problem = sources.check(spec, tfds_dir=d.tfds_dir)
      _check(problem is None, key, str(problem))
  for key in ("data.max_buckets", "data.builtin_image_size", "score.batch_size", "score.num_samples",
              "score.max_new_tokens", "evaluate.batch_size", "evaluate.max_new_tokens"):
    _positive(config, key)
  _check(0.0 <= d.label_noise <= 1.0, "data.label_noise", f"{d.label_noise!r} must be in [0, 1]")
  _check(config.damaged_checkpoints in ("restart", "stop"), "damaged_checkpoints",
         f"{config.damaged_checkpoints!r} is not 'restart' or 'stop'")
  _check(d.answer_budget in ("error", "warn"), "data.answer_budget", f"{d.answer_budget!r} is not 'error' or 'warn'")
  for key in ("data.train_limit", "evaluate.limit", "report.curve_limit"):
    section, name = key.split(".")
    _check(int(config[section][name]) >= 0, key, f"{config[section][name]!r} must be >= 0 (0 = no limit)")
  s = config.score
  try:
    sampling.SamplingParams(max_new_tokens=s.max_new_tokens, num_samples=s.num_samples, temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p)
  except ValueError as e:
    raise ConfigError(f"config.score: {e}") from None
  c = config.curate
  for r in [x.strip() for x in c.recipes.split(",") if x.strip()]:
    _check(_recipe_problem(r) is None, "curate.recipes", str(_recipe_problem(r)))
  _check(0.0 <= c.hard_ratio <= 1.0, "curate.hard_ratio", f"{c.hard_ratio!r} must be in [0, 1]")
  _check(0.0 <= c.window_lo <= c.window_hi <= 1.0, "curate.window_lo",
         f"need 0 <= window_lo ({c.window_lo}) <= window_hi ({c.window_hi}) <= 1")
  _check(bool([m for m in config.evaluate.models.split(",") if m.strip()]), "evaluate.models",
         "name at least one model (NAME=DIR)")
  try:
    evaluated_models(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def rl_algorithms(config) -> tuple[str, ...]:
  """config.grpo.algorithms as names, in order."""
  return tuple(a.strip() for a in config.grpo.algorithms.split(",") if a.strip())


def rl_overrides(config, name: str) -> dict:
  """The parts config.grpo.overrides.NAME sets (the unset ones are None)."""
  section = config.grpo.get("overrides", {}).get(name, {})
  return {k: v for k, v in section.items() if v is not None}


def rl_algorithm(config, name: str):
  """The train/rl.py Algorithm the run named `name` trains with: the published one (grpo: with
  grpo.beta and grpo.clip_eps), with any part config.grpo.overrides.NAME sets."""
  from dcsft_jax.train import rl
  g, over = config.grpo, rl_overrides(config, name)
  key = f"grpo.overrides.{name}"
  if name == "grpo" and "beta" in over:
    raise ConfigError(f"{key}.beta: the paper's GRPO takes its KL weight from grpo.beta; set that instead")
  try:
    return rl.configured(name, beta=g.beta, clip_eps=g.clip_eps, **over)
  except ValueError as e:
    raise ConfigError(f"{key}: {e}") from None


def evaluated_models(config) -> list[tuple[str, str]]:
  """evaluate.models as (label, model ref) pairs; `grpo=models/grpo` stands for every RL baseline of
  grpo.algorithms (NAME=models/NAME). With config.seeds = N > 1, an entry naming a run this config
  trains per seed (models/RECIPE of finetune.recipes, models/ALGORITHM) stands for all N of them:
  LABEL, LABEL.seed1, ... (workdir.run_name); the cold start and outside paths stay one model."""
  from dcsft_jax.workdir import run_name
  root = os.path.abspath(config.workdir)
  seeded = {os.path.join("models", r.strip()) for r in config.finetune.recipes.split(",") if r.strip()}
  algorithms = rl_algorithms(config)
  seeded.update(os.path.join("models", a) for a in algorithms)
  # 'grpo=models/grpo' stands for the RL baselines of grpo.algorithms, each under its own name.
  items = []
  for m in [m.strip() for m in config.evaluate.models.split(",") if m.strip()]:
    rl_entry = algorithms != ("grpo",) and m.rpartition("=")[0].strip() in ("", "grpo") and \
        os.path.normpath(m.rpartition("=")[2].strip()) == os.path.join("models", "grpo")
    items += [f"{a}=models/{a}" for a in algorithms] if rl_entry else [m]
  out = []
  for item in items:
    label, _, ref = item.rpartition("=") if "=" in item else (item, "", item)
    label, ref = label.strip().rstrip("/"), os.path.normpath(ref.strip())
    # The workdir's own runs however spelled (models/sft, ./models/sft/, WORKDIR/models/sft).
    inside = os.path.relpath(ref, root) if os.path.isabs(ref) else ref
    n = config.seeds if inside in seeded else 1
    out += [(run_name(label, i), run_name(inside if n > 1 else ref, i)) for i in range(n)]
  labels = [label for label, _ in out]
  twice = sorted({x for x in labels if labels.count(x) > 1})
  if twice:
    raise ValueError(f"config.evaluate.models: the label(s) {', '.join(twice)} name two models (with "
                     f"seeds = {config.seeds}, LABEL stands for LABEL.seed1 ... too); give each model its own label")
  return out


def model_options(config) -> ModelOptions:
  m = config.model
  return ModelOptions(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
                                attention=m.attention, remat=bool(m.remat))


def sampling_options(config, opts: ModelOptions) -> ModelOptions:
  """The options a model is loaded with for sampling only (scoring, evaluation). Nothing there is
  trained, so under model.frozen_in_compute_dtype every weight is stored in the compute dtype, as a
  LoRA run's frozen base is: every layer casts its weights to the compute dtype before use, so the
  samples are the same, from half the bytes that each decode step reads."""
  if not config.model.frozen_in_compute_dtype:
    return opts
  return dataclasses.replace(opts, param_dtype=opts.dtype)
