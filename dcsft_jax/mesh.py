"""The one device mesh (`data`, `fsdp`, `tensor`) and the only table of logical-axis rules.

Model code names its axes logically ('embed', 'mlp', 'activation_batch', ...). This module maps
those names onto mesh axes, so changing the parallelism is a config change, never a model change.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). FSDP shards the weights' model
# dimension over `fsdp`; tensor parallelism splits heads, MLP and vocabulary over `tensor`;
# batches are split over every data-parallel axis.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("patch", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache [layers, batch, length, kv_heads, head_dim]
    ("cache_batch", ("data", "fsdp")),
    ("cache_sequence", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
  """Builds the mesh from {'data': d, 'fsdp': f, 'tensor': t}; one size may be -1 (fill the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = {"data": 1, "fsdp": -1, "tensor": 1}
  if not isinstance(shape, dict):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available")
  try:  # Topology-aware placement on TPU/GPU slices; a plain reshape elsewhere.
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for logical axis names; a dimension a mesh axis doesn't divide stays replicated."""
  if names is None:
    return P()
  table = dict(rules)
  spec, used = [], set()
  for i, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        logging.debug("dim %d (%s, size %d) not divisible by %s: replicated", i, name, shape[i], axes)
        axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def param_shardings(abstract_params, mesh: Mesh):
  """NamedShardings for a Flax param tree whose leaves carry logical names (nn.LogicallyPartitioned)."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ('cpu', 'gpu', 'tpu'): what its programs are compiled for,
  which on a CPU host compiling for accelerators (dcsft_jax.aot) is not jax.default_backend()."""
  return mesh.devices.flat[0].platform


def abstract_params(abstract_params, mesh: Mesh):
  """ShapeDtypeStructs with the shardings the rules give on `mesh`, boxes dropped: what a model's
  parameters look like there, without allocating them."""
  shardings = param_shardings(abstract_params, mesh)
  unbox = lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x
  values = jax.tree.map(unbox, abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), values, shardings)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_dim] = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  return NamedSharding(mesh, P(*spec))


@contextlib.contextmanager
def use(mesh: Mesh):
  """Makes `mesh` current and activates the rules, so `nn.with_logical_constraint` in model code
  becomes a real sharding constraint while tracing (and stays a no-op without a mesh)."""
  setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
  with setter(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield mesh
