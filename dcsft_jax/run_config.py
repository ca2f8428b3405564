"""Checks a run config before any work starts, naming the key that is wrong."""
from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections

from dcsft_jax import mesh as mesh_lib
from dcsft_jax.models import attention
from dcsft_jax.models import qwen2_5_vl as model_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  pass


def _check(ok: bool, key: str, msg: str):
  if not ok:
    raise ConfigError(f"config.{key}: {msg}")


def validate(config: ml_collections.ConfigDict, known_stages) -> list[str]:
  """Returns the stage names to run; raises ConfigError naming the first bad key."""
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  _check(bool(stages), "stages", "is empty; pick from " + ",".join(known_stages))
  for s in stages:
    _check(s in known_stages, "stages", f"unknown stage {s!r}; the stages are {','.join(known_stages)}")
  _check(bool(config.workdir), "workdir", "must be a directory path")
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
  if m.hf_path:
    _check(os.path.isfile(os.path.join(m.hf_path, "config.json")), "model.hf_path",
           f"{m.hf_path!r} has no config.json; point it at a local Hugging Face Qwen2.5-VL directory")
  _check(config.export.dtype in ("",) + tuple(DTYPES), "export.dtype",
         f"{config.export.dtype!r} is not '' or one of {sorted(DTYPES)}")
  _validate_data(config, stages)
  return stages


def _positive(config, key: str):
  section, field = key.split(".")
  v = config[section][field]
  _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, f"{v!r} must be a positive integer")


def _validate_data(config, stages) -> None:
  from dcsft_jax import curation, sampling
  from dcsft_jax.data import sources
  d = config.data
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
  needs = {"score": [("data.train", train)], "curate": [("data.train", train)],
           "evaluate": [(f"data.eval[{n}]", s) for n, s in sets.items()]}
  for stage in stages:
    for key, spec in needs.get(stage, []):
      problem = sources.check(spec, tfds_dir=d.tfds_dir)
      _check(problem is None, key, str(problem))
  for key in ("data.max_buckets", "data.builtin_image_size", "score.batch_size", "score.num_samples",
              "score.max_new_tokens", "evaluate.batch_size", "evaluate.max_new_tokens"):
    _positive(config, key)
  _check(0.0 <= d.label_noise <= 1.0, "data.label_noise", f"{d.label_noise!r} must be in [0, 1]")
  s = config.score
  try:
    sampling.SamplingParams(max_new_tokens=s.max_new_tokens, num_samples=s.num_samples, temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p)
  except ValueError as e:
    raise ConfigError(f"config.score: {e}") from None
  c = config.curate
  for r in [x.strip() for x in c.recipes.split(",") if x.strip()]:
    _check(r in curation.RECIPES, "curate.recipes", f"unknown recipe {r!r}; the recipes are {list(curation.RECIPES)}")
  _check(0.0 <= c.hard_ratio <= 1.0, "curate.hard_ratio", f"{c.hard_ratio!r} must be in [0, 1]")
  _check(0.0 <= c.window_lo <= c.window_hi <= 1.0, "curate.window_lo",
         f"need 0 <= window_lo ({c.window_lo}) <= window_hi ({c.window_hi}) <= 1")
  _check(bool([m for m in config.evaluate.models.split(",") if m.strip()]), "evaluate.models",
         "name at least one model (NAME=DIR)")


def model_options(config) -> model_lib.ModelOptions:
  m = config.model
  return model_lib.ModelOptions(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
                                attention=m.attention, remat=bool(m.remat))
