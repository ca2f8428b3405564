"""The families this project ports, and how a run's model is chosen: a Hugging Face directory
(its config.json's model_type), or a preset name. The only module that lists the families.

Presets: each family's released shapes under `<family>_<size>` (e.g. qwen3_vl_8b) and its tiny test
model `<family>_tiny`; Qwen2.5-VL's are also reachable as 'tiny', '3b' and '7b' (the names the
project started with). A preset other than a tiny one builds the real shapes with random weights and
the tiny tokenizer's special ids: a speed run or an `aot` compile without a checkpoint.
"""
from __future__ import annotations

import json
import os

from dcsft_jax.models import qwen2_5_vl, qwen3_vl
from dcsft_jax.models.family import Family

FAMILIES: tuple[Family, ...] = (qwen2_5_vl.FAMILY, qwen3_vl.FAMILY)
DEFAULT = qwen2_5_vl.FAMILY
_ALIASES = {"tiny": (DEFAULT, "tiny"), "3b": (DEFAULT, "3b"), "7b": (DEFAULT, "7b")}


def by_name(name: str) -> Family:
  for f in FAMILIES:
    if f.name == name:
      return f
  raise ValueError(f"unknown model family {name!r}; the families are {[f.name for f in FAMILIES]}")


def of(cfg) -> Family:
  """The family of a model config object."""
  return by_name(type(cfg).family)


def for_model_type(model_type: str, *, source: str = "config.json") -> Family:
  for f in FAMILIES:
    if model_type in f.model_types:
      return f
  known = sorted(t for f in FAMILIES for t in f.model_types)
  raise ValueError(f"{source} has model_type={model_type!r}; dcsft_jax ports {known}")


def preset_names() -> tuple[str, ...]:
  names = list(_ALIASES)
  for f in FAMILIES:
    names += [f"{f.name}_tiny"] + [f"{f.name}_{size}" for size in f.presets]
  return tuple(names)


def _split_preset(name: str) -> tuple[Family, str]:
  if name in _ALIASES:
    return _ALIASES[name]
  for f in FAMILIES:
    if name.startswith(f.name + "_"):
      size = name[len(f.name) + 1:]
      if size == "tiny" or size in f.presets:
        return f, size
  raise ValueError(f"unknown model preset {name!r}; the presets are {', '.join(preset_names())}")


def family_of_preset(name: str) -> Family:
  return _split_preset(name or "tiny")[0]


def preset(name: str):
  """The config of a preset, as its family defines it (the released special ids)."""
  family, size = _split_preset(name or "tiny")
  return family.tiny() if size == "tiny" else family.presets[size]()


def is_tiny(name: str) -> bool:
  return _split_preset(name or "tiny")[1] == "tiny"


def run_config(name: str):
  """What a run without a checkpoint builds for a preset: the tiny model, or the real shapes with the
  tiny tokenizer's special ids (so the embedded processor feeds it)."""
  family, size = _split_preset(name or "tiny")
  return family.tiny() if size == "tiny" else family.with_tiny_tokenizer(family.presets[size]())


def read_config_json(path: str) -> dict:
  f = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(f):
    raise FileNotFoundError(f"No config.json at {f}: point --hf_path at a Hugging Face model directory.")
  try:
    with open(f) as fh:
      return json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"{f} is not valid JSON ({e}).") from e


DTYPES = ("float32", "bfloat16", "float16")


def from_hf_dict(d: dict, *, source: str = "config.json"):
  for key in ("torch_dtype", "dtype"):
    for where in (d, d.get("text_config") or {}):
      value = str(where.get(key) or "float32").replace("torch.", "")
      if value not in DTYPES:
        raise ValueError(f"{source}: {key} {value!r} is not one of {', '.join(DTYPES)}; dcsft_jax reads and writes "
                         f"floating-point weights only (a quantised checkpoint needs dequantising first)")
  return for_model_type(d.get("model_type", DEFAULT.model_types[0]), source=source).config_class.from_hf_dict(d)


def from_pretrained(path: str):
  """A model directory's config, read by the family its config.json's model_type names."""
  f = os.path.join(path, "config.json") if os.path.isdir(path) else path
  return from_hf_dict(read_config_json(path), source=f)


def model_config(hf_path: str, preset_name: str):
  """The run's model config: hf_path's config.json when it is on this machine, else the preset's
  run_config. The one place that chooses (model stage, aot, run_config's dry run and planning)."""
  if hf_path and os.path.isfile(os.path.join(hf_path, "config.json")):
    return from_pretrained(hf_path)
  return run_config(preset_name)
