"""Orbax model directories: `config.json` (the HF config) + `params/` (an Orbax checkpoint) +
the tokenizer/processor files, so a directory describes itself and converts back to HF alone.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from dcsft_jax import atomic, errors, hf
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.models import registry
from dcsft_jax.models.layers import LoraSpec, ModelOptions
from dcsft_jax.models.params import unbox

PARAMS = "params"
LORA = "lora.json"
BASE = "base.json"          # adapters-only directory: the frozen base lives in the directory it names
ADAPTER_LEAVES = ("lora_a", "lora_b")


def is_model_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, PARAMS)) and os.path.exists(os.path.join(path, "config.json"))


def _lora_tree(params):
  if isinstance(params, dict):
    out = {}
    for k, v in params.items():
      if k in ADAPTER_LEAVES:
        out[k] = v
      elif isinstance(v, dict):
        sub = _lora_tree(v)
        if sub:
          out[k] = sub
    return out
  return {}


def _merge_trees(base, extra):
  out = dict(base)
  for k, v in extra.items():
    out[k] = _merge_trees(base[k], v) if (k in base and isinstance(v, dict)) else v
  return out


def save_model(directory: str, params, cfg, *, source_dir: str | None = None,
               lora: LoraSpec | None = None, base_dir: str | None = None) -> str:
  """Writes params (LoRA adapters included, unmerged) and what it takes to read them back.

  With `lora` and `base_dir` (a model directory holding the same frozen base weights) only the
  adapters are written, and base.json names the base: a LoRA run of a 7B model then takes megabytes
  on disk, not another copy of the model.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, PARAMS)
  tree = unbox(params)
  if lora is not None and base_dir is not None:
    tree = _lora_tree(tree)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, tree, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    base_file = os.path.join(directory, BASE)
    if lora is not None and base_dir is not None:
      atomic.write_json(base_file, {"base": os.path.relpath(os.path.abspath(base_dir), directory)})
    elif os.path.exists(base_file):
      os.remove(base_file)
    if lora is not None:
      atomic.write_json(os.path.join(directory, LORA), dataclasses.asdict(lora))
    hf.copy_processor_files(source_dir, directory)
    # Last: config.json's presence marks a complete directory.
    atomic.write_json(os.path.join(directory, "config.json"), cfg.to_hf_dict())
  return directory


def base_of(directory: str) -> str | None:
  """The base model directory of an adapters-only directory (None for a full one)."""
  f = os.path.join(directory, BASE)
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    return os.path.normpath(os.path.join(directory, json.load(fh)["base"]))


def read_lora(directory: str) -> LoraSpec | None:
  f = os.path.join(directory, LORA)
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    return LoraSpec(**json.load(fh))


class DamagedModel(errors.UserError):
  """A model directory whose params/ cannot be read (a truncated copy, a full disk during a write)."""


def _read(what, directory: str, fix: str):
  """Orbax's read of `directory`'s params, its failure said in one line (TensorStore's are hundreds)."""
  try:
    # A failed read's other TensorStore reads still finish into Orbax's closed event loop, each printing
    # a traceback, before and after the failure reaches a handler: held, they go to the error log.
    with errors.stderr_held():
      return what()
  except Exception as e:  # pylint: disable=broad-except  (TensorStore, OSError, ValueError: all mean damage)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise DamagedModel(f"{directory}/{PARAMS} cannot be read ({type(e).__name__}: {first}); the model directory "
                       f"is damaged: {fix}") from e


def load_model(directory: str, *, mesh=None, opts: ModelOptions = ModelOptions(),
               fix: str = "re-create it (convert it again, or rerun the stage that wrote it)"):
  """-> (cfg, params, lora) restored straight into the shardings the logical rules give on `mesh`.

  `lora` is the LoraSpec of adapters stored with the params (None when there are none). `fix`: what a
  damaged directory's error tells the user to do."""
  directory = os.path.abspath(directory)
  if not is_model_dir(directory):
    raise FileNotFoundError(f"{directory} is not a dcsft_jax model directory (it needs config.json and params/). "
                            f"Create one with `python -m dcsft_jax.convert --from_hf=DIR --to_orbax={directory}`.")
  cfg = registry.from_pretrained(directory)
  lora = read_lora(directory)
  abstract = registry.of(cfg).init_params(cfg, dataclasses.replace(opts, lora=lora), abstract=True)
  if mesh is None:
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  target = mesh_lib.abstract_params(abstract, mesh)
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(directory, PARAMS)
  stored = _read(lambda: ckptr.metadata(path), directory, fix)
  stored = getattr(stored, "item_metadata", stored)
  base = base_of(directory)
  if base is None:
    _check_matches(stored, target, directory)
    return cfg, _read(lambda: ckptr.restore(path, target), directory, fix), lora
  if not is_model_dir(base):
    raise FileNotFoundError(f"{directory}/{BASE} names the base model {base}, which is not a model directory; "
                            f"restore it there or re-save {directory} with the full params")
  base_cfg, base_params, base_lora = load_model(base, mesh=mesh, opts=dataclasses.replace(opts, lora=None))
  if base_lora is not None or base_cfg != cfg:
    raise ValueError(f"{directory}: its base {base} is not the plain model its adapters were trained on")
  adapters = _lora_tree(target)
  _check_matches(stored, adapters, directory)
  return cfg, _merge_trees(base_params, _read(lambda: ckptr.restore(path, adapters), directory, fix)), lora


def _check_matches(stored, target, directory):
  flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(flat_t) - set(flat_s))
  extra = sorted(set(flat_s) - set(flat_t))
  if missing or extra:
    raise ValueError(f"{directory}/params does not match its config.json: missing {missing[:3]}, "
                     f"unexpected {extra[:3]}")
  for k, t in flat_t.items():
    shape = tuple(getattr(flat_s[k], "shape", ()))
    if shape != tuple(t.shape):
      raise ValueError(f"{directory}/params: parameter {k} has shape {shape}, but config.json implies {tuple(t.shape)}")


def load_any(directory: str, *, mesh=None, opts: ModelOptions = ModelOptions(), fix: str | None = None):
  """A dcsft_jax model directory or a Hugging Face one -> (cfg, params, lora)."""
  if is_model_dir(directory):
    return load_model(directory, mesh=mesh, opts=opts, **({"fix": fix} if fix else {}))
  if os.path.isfile(os.path.join(directory, "config.json")):
    cfg, params = hf.load_hf(directory, mesh=mesh, opts=opts)
    return cfg, params, None
  raise FileNotFoundError(f"{directory} is neither a dcsft_jax model directory (config.json + params/) nor a "
                          f"Hugging Face one (config.json + *.safetensors)")
