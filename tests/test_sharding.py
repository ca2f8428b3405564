"""One mesh, named axes: the forward on a simulated 2x2x2 CPU mesh equals the single-device one."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_reference as R
from dcsft_jax import hf
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.config import tiny_config


def test_mesh_from_config_fills_minus_one():
  m = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert m.axis_names == ("data", "fsdp", "tensor") and dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(mesh_lib.make_mesh({"data": -1}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 12 devices"):
    mesh_lib.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="unknown axes"):
    mesh_lib.make_mesh({"dp": 8})


def test_logical_rules_shard_weights_and_skip_indivisible_dims():
  m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert mesh_lib.logical_to_spec(("layers", "embed", "mlp"), (3, 96, 160), m) == P(None, "fsdp", "tensor")
  assert mesh_lib.logical_to_spec(("vocab", "embed"), (415, 96), m) == P(None, "fsdp")  # 415 % 2 != 0
  assert mesh_lib.logical_to_spec(("activation_batch", None), (8, 3), m) == P(("data", "fsdp"), None)
  cfg = tiny_config()
  shard = mesh_lib.param_shardings(M.init_params(cfg, abstract=True), m)
  assert shard["layers"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert shard["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
  assert shard["visual"]["blocks"]["norm1"]["scale"].spec == P(None, None)


def test_sharded_forward_equals_single_device(tmp_path):
  assert jax.device_count() >= 8, "conftest sets --xla_force_host_platform_device_count=8"
  cfg = tiny_config()
  d = tmp_path / "hf"
  R.random_hf_model(cfg, seed=11).save_pretrained(d)
  rows = R.MIXED_ROWS + [[4, (1, 4, 4), 3]]          # 4 rows and 4 images: divisible by data*fsdp
  batch = R.make_batch(cfg, rows, seed=12)
  ids, pos, images, am = batch.ours(cfg)
  model = M.Qwen25VL(cfg)
  fwd = lambda p, *a: model.apply({"params": p}, *a)

  one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  _, p1 = hf.load_hf(str(d), mesh=one)
  with mesh_lib.use(one):
    ref = np.asarray(jax.jit(fwd)(p1, ids, pos, images, am))

  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, p8 = hf.load_hf(str(d), mesh=mesh)
  kernel = p8["layers"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (3, 48, 80)   # really split, not replicated
  b = lambda nd, dim=0: mesh_lib.batch_sharding(mesh, nd, dim)
  args = (jax.device_put(ids, b(2)), jax.device_put(pos, b(3, 1)),
          {k: jax.device_put(v, b(v.ndim)) for k, v in images.items()}, jax.device_put(am, b(2)))
  with mesh_lib.use(mesh):
    out = jax.jit(fwd)(p8, *args)
  assert len(out.sharding.device_set) == 8
  out = np.asarray(out)
  m = batch.attention_mask.astype(bool)
  assert np.abs(out - ref)[m].max() <= 1e-5 * max(1.0, np.abs(ref[m]).max()), np.abs(out - ref)[m].max()
