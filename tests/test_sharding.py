"""One mesh, named axes: the forward on a simulated 2x2x2 CPU mesh equals the single-device one."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_reference as R
from dcsft_jax import hf
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl.config import tiny_config


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


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}])
def test_params_and_adapters_are_made_into_their_shardings_under_the_stages_mesh(shape):
  """What the stages do (issue 25): with the mesh current and its rules active (main's mesh_lib.use),
  init_params and init_lora make their leaves straight into the rules' shardings, with the values of
  the unsharded init. On main before the fix, init_lora traced a batch-1 forward whose activation
  constraint asked the 8 devices' batch axes to split it (IndivisibleError) on every such mesh."""
  from dcsft_jax.train import trainer
  cfg = tiny_config()
  lora = M.LoraSpec(rank=4, alpha=8.0)
  mesh = mesh_lib.make_mesh(shape)
  plain = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(3)))
  plain_lora = trainer.init_lora(plain, cfg, lora, seed=5)
  with mesh_lib.use(mesh):
    params = M.init_params(cfg, rng=jax.random.PRNGKey(3), mesh=mesh)
    with_lora = trainer.init_lora(params, cfg, lora, seed=5, mesh=mesh)
  want = mesh_lib.param_shardings(M.init_params(cfg, M.ModelOptions(lora=lora), abstract=True), mesh)
  flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
  got, ref, sh = flat(with_lora), flat(plain_lora), flat(want)
  assert got.keys() == ref.keys() == sh.keys()
  adapters = [k for k in got if M.is_adapter(tuple(getattr(x, "key", x) for x in k))]
  assert adapters and len(adapters) < len(got)
  for k, x in got.items():
    assert x.sharding.is_equivalent_to(sh[k], x.ndim), (k, x.sharding, sh[k])
    # The same random bits; XLA may round the normal init's transform 1 ulp apart in one jitted
    # program from op-by-op (fp32: 1.2e-7 relative).
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref[k]), rtol=3e-7, atol=0, err_msg=str(k))
  # The base leaves are the ones given, not made again.
  assert with_lora["layers"]["q_proj"]["kernel"] is params["layers"]["q_proj"]["kernel"]
  assert any("tensor" in jax.tree.leaves(tuple(got[k].sharding.spec)) or "fsdp" in jax.tree.leaves(tuple(got[k].sharding.spec))
             for k in adapters)
