"""The model-family seam: what a family (one package under dcsft_jax/models/) provides, and the
family-free machinery built on it (parameter init into shardings, KV caches, decode positions).

Everything above `models/` (data, sampling, training, stages, hf, aot, generate, convert) holds a
`Family` (from dcsft_jax.models.registry) and asks it; none of it names a family.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dcsft_jax.models import params as params_lib
from dcsft_jax.models.layers import ModelOptions

CACHE_AXES = ("layers", "cache_batch", "cache_sequence", "cache_kv_heads", "cache_head_dim")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter in a family's HF name table."""
  path: tuple[str, ...]   # leaf path in our param tree
  hf: str                 # on-disk HF name; '{i}' marks the layer index of a stacked leaf
  kind: str               # 'linear' (transpose), 'conv' (Conv3d -> matmul kernel) or 'copy'
  layers: int = 0         # > 0: the leaf is stacked over this many layers


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """A model family. Its config objects have `.text` (vocab_size, hidden_size, num_hidden_layers,
  num_key_value_heads, head_dim), `.vision` (patch_size, temporal_patch_size, spatial_merge_size,
  patch_dim, merge_unit), the special token ids, `tie_word_embeddings`, `eos_token_id`, `torch_dtype`,
  `raw`, `to_hf_dict()`, `replace(**kw)` and `validate()`.

  Its Flax module `module(cfg, opts)` has `embed(input_ids, images) -> (h, visual)` (visual: what the
  decoder adds at the image positions later, or None), `decode(h, positions, *, mask, cache,
  cache_index, prefix, visual=None) -> (hidden, cache)`, `logits(h)`, and
  `__call__(input_ids, positions, images, attention_mask, return_hidden)`.
  """
  name: str                                   # the package under dcsft_jax/models/
  title: str                                  # for people: "Qwen2.5-VL"
  model_types: tuple[str, ...]                # config.json model_type values it reads
  architecture: str                           # transformers' class, written into exported configs
  module: Any                                 # the Flax module class: module(cfg, opts)
  config_class: Any                           # has from_hf_dict(d) and from_pretrained(path)
  presets: Mapping[str, Callable[[], Any]]    # preset name -> config of the released shapes
  tiny: Callable[..., Any]                    # tiny(**kw) -> a random-weight test config
  with_tiny_tokenizer: Callable[[Any], Any]   # cfg -> cfg with the tiny tokenizer's special ids
  image_keys: tuple[str, ...]                 # the batch's image arrays (pixel_values first)
  vision_layout: Callable[..., dict]          # (grids [(t, h, w) or None], vision cfg, P) -> arrays [n, P, ...]
  patch_room: Callable[..., int]              # ((t, h, w), vision cfg) -> the patches the image needs in a batch
  rope_index: Callable[..., tuple]            # get_rope_index(ids [B, L], cfg, image_grid_thw=, ...) -> (positions, deltas)
  mm_token_types: Callable[..., np.ndarray]   # (ids, cfg) -> 0 text / 1 image / 2 video
  name_table: Callable[[Any], list]           # cfg -> [Entry]: every parameter's HF name
  lora_targets: Mapping[str, tuple[str, ...]]  # part ('language', 'vision', 'merger') -> linear layer names
  tiny_chat_template: str                     # the tiny processor's chat template
  tiny_preprocessor: Callable[..., dict]      # (min_pixels=, max_pixels=) -> preprocessor_config.json
  default_system_prompt: str | None           # what the chat template inserts when no system turn is given
  generation_defaults: Mapping[str, Any]      # the Instruct model's generation_config.json sampling fields
  canonical_name: Callable[[str], str]        # any spelling of a checkpoint tensor name -> the name table's

  def __repr__(self):
    return f"Family({self.name})"

  # ------------------------------------------------------------------ model and parameters
  def model(self, cfg, opts: ModelOptions = ModelOptions()):
    return self.module(cfg, opts)

  def dummy_images(self, cfg, dtype):
    """A one-image batch of the smallest grid (2 x 2 merged tokens), made inside a trace."""
    v = cfg.vision
    side = 2 * v.spatial_merge_size
    lay = self.vision_layout([(1, side, side)], v, side * side)
    out = {k: jnp.asarray(a) for k, a in lay.items()}
    out["pixel_values"] = jnp.zeros((1, side * side, v.patch_dim), dtype)
    return out

  def _init_fn(self, cfg, opts: ModelOptions, keep=None):
    """rng -> the boxed parameter tree (only the leaves `keep` accepts, if given), traced from a batch-1
    dummy forward. The logical-axis rules are cleared while it traces: the dummy's activation
    constraints would otherwise ask the ambient mesh to split its batch of 1 over the batch axes (an
    IndivisibleError on any mesh of more than one device). Only the parameters' shapes and initial
    values come from it; their placement comes from the rules applied to the result."""
    model = self.model(cfg, opts)

    def fn(rng):
      # The dummies are made while tracing: an eager array would run on the ambient mesh's devices,
      # which dcsft_jax.aot's compile-only accelerators cannot.
      ids = jnp.zeros((1, 8), jnp.int32).at[0, :4].set(cfg.image_token_id)
      pos = jnp.zeros((3, 1, 8), jnp.int32)
      with nn.logical_axis_rules(()):
        params = model.init({"params": rng}, ids, pos, self.dummy_images(cfg, opts.dtype))["params"]
      return params if keep is None else params_lib.select(params, keep)
    return fn

  def init_params(self, cfg, opts: ModelOptions = ModelOptions(), rng=None, *, abstract: bool = False,
                  mesh=None, keep=None):
    """Random (or, with abstract=True, shape-only) parameters; leaves are nn.LogicallyPartitioned.

    With a mesh, the random parameters are made by `init_program` straight into their shardings
    (unboxed). `keep` (a path predicate, e.g. params.is_adapter) returns only those leaves."""
    fn = self._init_fn(cfg, opts, keep)
    if abstract:
      return jax.eval_shape(fn, params_lib.abstract_key() if rng is None else rng)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if mesh is None:
      # Kept leaves (fresh LoRA adapters) come from one jitted program per (model, options) in a
      # process, the same values as op by op: a test or tool that makes several adapters in a row then
      # never reads the op-by-op programs back from the persistent compilation cache, which crashed a
      # test worker (the full init stays op by op: its values are what every test's model is).
      return fn(rng) if keep is None else _local_init(self, cfg, opts, keep)(rng)
    return self.init_program(cfg, opts, mesh, keep)(rng)

  def init_program(self, cfg, opts: ModelOptions, mesh, keep=None):
    """The jitted rng -> unboxed parameters program: one program that writes every leaf (or every kept
    leaf; the others are never computed) straight into the sharding the logical rules give it on
    `mesh`, the same on every process of a multi-host run, so no leaf is ever whole on one device.
    What the stages run (init, LoRA adapters), and what dcsft_jax.aot compiles for a target. One per
    (model, options, mesh, leaves) in a process: the pipeline's LoRA runs share one compiled program."""
    return _init_program(self, cfg, opts, mesh, keep)

  # ------------------------------------------------------------------ generation
  def init_cache(self, cfg, rows: int, length: int, dtype):
    """An empty KV cache {'k', 'v'} [layers, rows, length, kv_heads, head_dim], logically constrained."""
    t = cfg.text
    shape = (t.num_hidden_layers, rows, length, t.num_key_value_heads, t.head_dim)
    return {n: nn.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES) for n in ("k", "v")}

  @staticmethod
  def constrain_cache(tree):
    return jax.tree.map(lambda x: nn.with_logical_constraint(x, CACHE_AXES), tree)

  @staticmethod
  def decode_positions(start, steps):
    """M-RoPE positions [3, R, T] of generated tokens: start [R] (a row's unpadded prompt length plus its
    rope delta) + steps [T], on all three axes (transformers' decoding positions)."""
    pos = jnp.asarray(start)[:, None] + jnp.asarray(steps)[None, :]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)

  def pixels_per_token(self, cfg) -> int:
    """Image pixels per merged visual token ((patch x merge)^2: 28^2 or 32^2)."""
    v = cfg.vision
    return (v.patch_size * v.spatial_merge_size) ** 2

  def images(self, arrays: dict) -> dict:
    """The image arrays of a batch, by this family's keys."""
    return {k: arrays[k] for k in self.image_keys}


@functools.lru_cache(maxsize=32)
def _init_program(family: Family, cfg, opts: ModelOptions, mesh, keep=None):
  from dcsft_jax import mesh as mesh_lib
  fn = family._init_fn(cfg, opts, keep)
  abstract = jax.eval_shape(fn, params_lib.abstract_key())
  return jax.jit(lambda r: params_lib.unbox(fn(r)), out_shardings=mesh_lib.param_shardings(abstract, mesh))


@functools.lru_cache(maxsize=None)
def _local_init(family: Family, cfg, opts: ModelOptions, keep):
  return jax.jit(family._init_fn(cfg, opts, keep))
