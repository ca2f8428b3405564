"""Parameter trees, whatever the family: unboxing, counting, selecting leaves by path."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def unbox(tree):
  """Drops the logical-partitioning boxes, leaving plain arrays (no sharding constraint applied)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(unbox(params))))


def select(tree, keep):
  """The leaves of a nested dict whose path (a tuple of keys) `keep` accepts, empty branches dropped."""
  def walk(node, path):
    if not isinstance(node, dict):
      return node if keep(path) else None
    out = {k: walk(v, path + (k,)) for k, v in node.items()}
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
  return walk(tree, ())


def is_adapter(path) -> bool:
  """Whether a parameter path names a LoRA adapter leaf."""
  return path[-1] in ("lora_a", "lora_b")


def abstract_key():
  """The shape of jax.random.PRNGKey's key, without running it (nothing runs on a compile-only mesh)."""
  return jax.eval_shape(lambda: jax.random.PRNGKey(0))


@jax.jit
def _fold(kernel, a, b, scale):
  delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge_lora(params, scale: float):
  """Every {kernel, lora_a, lora_b} folded into one kernel, kernel + a @ b * scale, computed in fp32 on
  the devices (each merged kernel keeps its own sharding) and cast back to the kernel's dtype: what
  PEFT's merge_and_unload and `swift export --merge_lora` write, the model the authors evaluate.
  Stacked (scanned) layers broadcast over their leading layer axis. One compiled fold per shape,
  shared by every model an evaluation loads."""
  params = unbox(params)

  def walk(node):
    if not isinstance(node, dict):
      return node
    if "lora_a" in node and "lora_b" in node:
      out = {k: v for k, v in node.items() if k not in ("lora_a", "lora_b")}
      sharding = getattr(node["kernel"], "sharding", None)
      merged = _fold(node["kernel"], node["lora_a"], node["lora_b"], jnp.float32(scale))
      out["kernel"] = jax.device_put(merged, sharding) if sharding is not None else merged
      return out
    return {k: walk(v) for k, v in node.items()}
  return walk(params)
