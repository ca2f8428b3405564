"""Hugging Face checkpoints in and out: one name table, read both ways.

In: a local directory (`config.json`, `*.safetensors` with or without an index) is streamed tensor
by tensor, and each parameter is placed on the mesh shard by shard with
`jax.make_array_from_callback`, so no host ever holds a second copy of the model.
Out: a directory that transformers' class of the model's family (`Family.architecture`) loads
with `from_pretrained`, with LoRA adapters merged, written atomically. The names, and which
spellings of them a checkpoint may use, are the family's (`Family.name_table`, `canonical_name`).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import contextlib
import shutil
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from dcsft_jax import atomic
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.models import registry
from dcsft_jax.models.family import Entry
from dcsft_jax.models.layers import LoraSpec, ModelOptions
from dcsft_jax.models.params import unbox

log = logging.getLogger(__name__)

# Files of a processor/tokenizer that travel with the weights, unchanged, from the source checkpoint
# through every model directory to the HF export. generation_config.json among them: it holds the end
# tokens (the Qwen-VL Instruct models have two) and the repetition penalty that HF generate applies.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
)


def name_table(cfg) -> list[Entry]:
  """Every parameter of `cfg`'s model with its on-disk HF name (the family's table)."""
  return registry.of(cfg).name_table(cfg)


def canonical_name(name: str, family=None) -> str:
  """A checkpoint's spelling of a tensor name -> the family's name table's (the default family's)."""
  return (family or registry.DEFAULT).canonical_name(name)


def _to_ours(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return w.T
  if kind == "conv":
    return w.reshape(w.shape[0], -1).T
  return w


def _to_hf(kind: str, x: np.ndarray, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.T.reshape(hf_shape)
  return x


def _hf_shape(e: Entry, cfg, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  s = leaf_shape[1:] if e.layers else leaf_shape
  if e.kind == "linear":
    return tuple(reversed(s))
  if e.kind == "conv":
    v = cfg.vision
    return (s[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  return tuple(s)


class CheckpointIndex:
  """Name -> file over the safetensors files of a directory (sharded or not)."""

  def __init__(self, path: str, family=None):
    self.path = path
    canonical = (family or registry.DEFAULT).canonical_name
    index = os.path.join(path, "model.safetensors.index.json")
    files: list[str]
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
      for fn in files:
        if not os.path.exists(os.path.join(path, fn)):
          raise FileNotFoundError(f"{index} lists {fn}, which is not in {path}: the download is incomplete.")
    else:
      files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      if os.path.isdir(os.path.join(path, "params")):
        raise FileNotFoundError(f"{path} is a dcsft_jax model directory (Orbax params/), not a Hugging Face one: "
                                f"read it with --from_orbax={path}")
      raise FileNotFoundError(f"No *.safetensors in {path}. dcsft_jax reads safetensors checkpoints; convert "
                              f"a .bin one with transformers' save_pretrained(safe_serialization=True).")
    self.files = {fn: _open_safetensors(os.path.join(path, fn)) for fn in files}
    self.where: dict[str, tuple[str, str]] = {}   # canonical name -> (file, name in file)
    for fn, st in self.files.items():
      for name in st.keys():
        canon = canonical(name)
        if canon in self.where:
          raise ValueError(f"tensor {canon!r} appears twice in {path} ({self.where[canon][0]} and {fn})")
        self.where[canon] = (fn, name)
    # make_array_from_callback asks for one device's shard at a time; the tensor read for the first
    # shard serves the others (one tensor in host memory, never the whole model).
    self._last: tuple[str, np.ndarray] | None = None

  def shape(self, name) -> tuple[int, ...]:
    fn, n = self.where[name]
    return tuple(self.files[fn].get_slice(n).get_shape())

  def get(self, name) -> np.ndarray:
    if self._last is None or self._last[0] != name:
      fn, n = self.where[name]
      try:
        self._last = (name, self.files[fn].get_tensor(n))
      except Exception as e:  # safetensors' own error types differ across versions
        raise ValueError(f"{os.path.join(self.path, fn)}: cannot read tensor {n!r} ({e}); the file is damaged: "
                         f"re-download or re-export it.") from e
    return self._last[1]


def _open_safetensors(path: str):
  """A memory-mapped safetensors file (the safetensors library), its errors naming the file."""
  try:
    return safetensors.safe_open(path, framework="numpy")
  except Exception as e:  # SafetensorError, OSError, or a header JSON error, depending on the version
    raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged. "
                     f"Re-download or re-export it.") from e


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def load_hf(path: str, *, mesh=None, opts: ModelOptions = ModelOptions(), cfg=None):
  """Loads a local HF directory of any family -> (cfg, params placed on `mesh` by the logical rules).

  Parameters are created in `opts.param_dtype`. A tensor that is missing, unexpected or of the
  wrong shape fails with its name before any weight is read.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory; expected a Hugging Face model directory.")
  cfg = cfg or registry.from_pretrained(path)
  family = registry.of(cfg)
  index = CheckpointIndex(path, family)
  base_opts = dataclasses.replace(opts, lora=None)
  abstract = family.init_params(cfg, base_opts, abstract=True)
  if mesh is None:
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  shardings = mesh_lib.param_shardings(abstract, mesh)
  abstract = unbox(abstract)
  table = name_table(cfg)

  # Check names and shapes first, so a mismatched checkpoint fails fast and by name.
  expected = set()
  for e in table:
    leaf = _get(abstract, e.path)
    want = _hf_shape(e, cfg, leaf.shape)
    for i in range(e.layers or 1):
      name = e.hf.format(i=i)
      expected.add(name)
      if name not in index.where:
        raise ValueError(f"checkpoint {path} is missing tensor {name!r}, which config.json implies "
                         f"(vision depth {cfg.vision.depth}, {cfg.text.num_hidden_layers} text layers, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings}). Do config.json and the weights match?")
      got = index.shape(name)
      if tuple(got) != tuple(want):
        raise ValueError(f"checkpoint {path}: tensor {name!r} has shape {tuple(got)}, but config.json implies "
                         f"{tuple(want)}. Do config.json and the weights belong together?")
  unexpected = sorted(set(index.where) - expected - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
  if unexpected:
    raise ValueError(f"checkpoint {path} has {len(unexpected)} tensor(s) this {family.title} config does not use, "
                     f"e.g. {unexpected[:3]}. Is it a {family.title} checkpoint, and does config.json match it?")

  params: dict = {}
  for e in table:
    leaf = _get(abstract, e.path)
    sharding = _get(shardings, e.path)
    dtype = np.dtype(leaf.dtype)

    def callback(idx, e=e, dtype=dtype):
      if e.layers:
        layers = range(*idx[0].indices(e.layers))
        parts = [np.asarray(_to_ours(e.kind, index.get(e.hf.format(i=i)))[idx[1:]]) for i in layers]
        return np.stack(parts).astype(dtype)
      return np.asarray(_to_ours(e.kind, index.get(e.hf))[idx]).astype(dtype)

    _set(params, e.path, jax.make_array_from_callback(leaf.shape, sharding, callback))
  log.info("loaded %s (%d tensors) onto mesh %s", path, len(expected), dict(mesh.shape))
  return cfg, params


# ------------------------------------------------------------------------------------------ export
def merge_lora(params: dict, lora: LoraSpec | None) -> dict:
  """Folds every {kernel, lora_a, lora_b} into kernel + a @ b * alpha/r (in fp32)."""
  params = unbox(params)

  def walk(node):
    if not isinstance(node, dict):
      return node
    if "lora_a" in node and "lora_b" in node:
      if lora is None:
        raise ValueError("params hold LoRA adapters; pass the LoraSpec (rank/alpha) they were trained with")
      # (every process gathers: leaves may be sharded over other hosts' devices)
      k = _host(node["kernel"])
      a = _host(node["lora_a"]).astype(np.float32)
      b = _host(node["lora_b"]).astype(np.float32)
      delta = np.matmul(a, b) * np.float32(lora.scale)
      out = {k2: v for k2, v in node.items() if k2 not in ("lora_a", "lora_b")}
      out["kernel"] = (k.astype(np.float32) + delta).astype(k.dtype)
      return out
    return {k2: walk(v) for k2, v in node.items()}
  return walk(params)


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _np_dtype(name: str) -> np.dtype:
  name = name.replace("torch.", "")
  table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
  if name not in table:
    raise ValueError(f"export dtype {name!r} is not one of {sorted(table)}")
  return np.dtype(table[name])


def hf_tensors(params: dict, cfg, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) one parameter at a time, in transformers' order."""
  for e in name_table(cfg):
    x = _host(_get(params, e.path))
    for i in range(e.layers or 1):
      y = x[i] if e.layers else x
      hf_shape = _hf_shape(e, cfg, x.shape)
      yield e.hf.format(i=i), np.ascontiguousarray(_to_hf(e.kind, y, hf_shape)).astype(dtype)


def copy_processor_files(src: str | None, dst: str) -> list[str]:
  copied = []
  if src and os.path.isdir(src):
    for fn in PROCESSOR_FILES:
      if os.path.exists(os.path.join(src, fn)):
        shutil.copy2(os.path.join(src, fn), os.path.join(dst, fn))
        copied.append(fn)
  return copied


def _write_hf(tmp: str | None, params, cfg, np_dtype, dtype_name: str, source_dir, max_shard_bytes: int):
  """save_hf's files into `tmp` (None on the processes that do not write): (shards, bytes)."""
  # Plan the shards from shapes alone, then stream tensors into them one at a time.
  plan, cur, size = [], [], 0
  for e in name_table(cfg):
    shape = _get(params, e.path).shape
    n = int(np.prod(shape[1:] if e.layers else shape)) * np_dtype.itemsize
    for i in range(e.layers or 1):
      if cur and size + n > max_shard_bytes:
        plan.append(cur)
        cur, size = [], 0
      cur.append(e.hf.format(i=i))
      size += n
  plan.append(cur)
  nshards = len(plan)
  fname = (lambda k: "model.safetensors") if nshards == 1 else (
      lambda k: f"model-{k + 1:05d}-of-{nshards:05d}.safetensors")
  shard_of = {name: k for k, names in enumerate(plan) for name in names}
  pending: dict[int, list] = {}
  total = 0
  for name, arr in hf_tensors(params, cfg, np_dtype):
    k = shard_of[name]
    pending.setdefault(k, []).append((name, arr))
    total += arr.nbytes
    if len(pending[k]) == len(plan[k]):
      shard = dict(pending.pop(k))
      if tmp is not None:
        safetensors.numpy.save_file(shard, os.path.join(tmp, fname(k)), {"format": "pt"})
  if tmp is None:
    return nshards, total
  if nshards > 1:
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": {n: fname(k) for n, k in shard_of.items()}},
                f, indent=2)
  conf = cfg.to_hf_dict()
  conf["torch_dtype"] = dtype_name
  conf.pop("dtype", None)
  conf.setdefault("architectures", [registry.of(cfg).architecture])
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(conf, f, indent=2)
  if "generation_config.json" not in copy_processor_files(source_dir, tmp):
    # No source file to carry: the end tokens from config.json, greedy.
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
                 "do_sample": False}, f, indent=2)
  return nshards, total


def save_hf(params: dict, cfg, out_dir: str, *, source_dir: str | None = None,
            dtype: str | None = None, lora: LoraSpec | None = None,
            max_shard_bytes: int = 4 * 2 ** 30) -> str:
  """Writes an HF directory: config.json, safetensors shards (+ index), generation_config.json,
  and the tokenizer/processor files of `source_dir` when it has them. LoRA is merged first."""
  params = merge_lora(params, lora)
  dtype_name = (dtype or cfg.torch_dtype or "bfloat16").replace("torch.", "")
  np_dtype = _np_dtype(dtype_name)
  is_writer = jax.process_index() == 0
  # Every process streams the tensors (they may be sharded across hosts); process 0 writes them into
  # a directory beside out_dir that replaces it whole at the end.
  with atomic.directory(out_dir) if is_writer else contextlib.nullcontext() as tmp:
    nshards, total = _write_hf(tmp, params, cfg, np_dtype, dtype_name, source_dir, max_shard_bytes)
  if is_writer:
    log.info("wrote %s (%d shard(s), %.1f MB, %s)", out_dir, nshards, total / 1e6, dtype_name)
  return out_dir
