"""Compile-only checks (dcsft_jax.aot): every program of the default run compiles for an H100 (with cuDNN
attention where the resolver picks it) and for a Cloud TPU v5e 2x2 on a mesh that really shards; the
CLI's exit status and JSON; the largest-batch search; the kernel choice follows the target platform.

The compilers come from the aot extra (the test extra includes it): the CUDA PJRT plugin
with cuDNN, and libtpu. Without them these tests fail, saying so (they are not skipped)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from dcsft_jax import aot, config_base, targets
from dcsft_jax.models import attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDNN = "cudnn"


def _default_config(**overrides):
  c = config_base.load_config_file(os.path.join(REPO, "configs", "dcsft.py")).get_config()
  c.model.dtype = "bfloat16"            # cuDNN's attention needs bf16/fp16
  c.data.train_limit = 64               # planning reads image headers only; keep it short
  c.evaluate.limit = 64
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def _needs_plugins(platform: str):
  name = {"gpu": "jax_cuda12_plugin", "tpu": "libtpu"}[platform]
  assert importlib.util.find_spec(name) is not None, (
      f"{name} is not installed: pip install '.[aot]' (the test extra includes it)")


# Every RL baseline's step (issue 30): each algorithm's loss is its own program.
ALGORITHMS = "grpo,dr_grpo,dapo,gspo,rloo"


@pytest.fixture(scope="module")
def h100():
  _needs_plugins("gpu")
  return aot.run(_default_config(**{"grpo.algorithms": ALGORITHMS}), "h100x1", log=lambda *_: None)


@pytest.fixture(scope="module")
def v5e():
  _needs_plugins("tpu")
  return aot.run(_default_config(**{"mesh.fsdp": 2, "mesh.tensor": 2, "grpo.algorithms": ALGORITHMS}), "v5e-4",
                 log=lambda *_: None)


# The init programs write parameters straight into their shardings on the target's mesh (issue 25: an
# init traced under the mesh's rules crashed every mesh of more than one device, and aot never ran it).
INIT_PROGRAMS = {"init params", "finetune adapters init", "grpo adapters init"}
EVERY_PROGRAM = {"cold_start step", "score prefill", "score decode", "finetune step", "grpo rollout prefill",
                 "grpo rollout decode", "grpo step", "evaluate prefill", "evaluate decode"} | INIT_PROGRAMS


RL_STEPS = {f"{a} step" for a in ALGORITHMS.split(",")}


def test_every_program_compiles_for_an_h100_with_cudnn_attention(h100):
  progs = {p["name"]: p for p in h100["programs"]}
  assert set(progs) == EVERY_PROGRAM | RL_STEPS
  for name, p in progs.items():
    assert p["compiled"] and p["fits"], (name, p["error"])
    assert 0 < p["bytes"]["total"] <= p["budget_bytes"] < p["device_bytes"] == 84942979072
  # The training steps and the prefills run the decoder (and its backward) through cuDNN's fused
  # attention; decoding reads the shared prompt cache with XLA's attention.
  for name in ("cold_start step", "finetune step", "score prefill", "grpo rollout prefill",
               "evaluate prefill", *RL_STEPS):
    assert progs[name]["attention"].startswith(CUDNN), (name, progs[name]["attention"])
  # Forward and backward: the steps hold more fused-attention calls than a forward-only prefill.
  count = lambda n: int(progs[n]["attention"].split("(")[1].split()[0])
  assert count("cold_start step") > count("score prefill")
  assert progs["score decode"]["attention"] == "xla"
  assert h100["platform"] == "gpu" and not h100["attached"]


def test_every_program_compiles_for_a_sharded_tpu_v5e(v5e):
  assert v5e["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  progs = {p["name"]: p for p in v5e["programs"]}
  assert set(progs) == EVERY_PROGRAM | RL_STEPS
  for name, p in progs.items():
    assert p["compiled"] and p["fits"], (name, p["error"])
    # The batch really splits over fsdp: each device holds its share of the rows.
    assert p["rows_per_device"] * 2 == p["rows"], name
  # Issue 31: the training steps and the prefills run Splash attention (Mosaic kernels in the compiled
  # TPU program: the decoder's causal attention and the vision tower's full blocks, forward and
  # backward); decoding reads the shared prompt cache with XLA's attention.
  for name in ("cold_start step", "finetune step", "score prefill", "grpo rollout prefill", "evaluate prefill",
               *RL_STEPS):
    assert progs[name]["attention"].startswith("splash ("), (name, progs[name]["attention"])
  calls = lambda n: int(progs[n]["attention"].split("(")[1].split()[0])
  assert calls("cold_start step") > calls("score prefill") >= 2
  assert progs["score decode"]["attention"] == "xla" and progs["evaluate decode"]["attention"] == "xla"
  # An init program's outputs are the parameters in the rules' shardings over the 2 x 2 chips: per chip,
  # at least the bytes of each leaf's shard (what the same rules give on 4 CPU devices of that shape;
  # XLA:TPU pads each array to its tiled layout, a lot for the tiny model's 48-wide dims), and less than
  # the whole model (measured: 0.99 MB against 0.55 MB of shards and 1.96 MB whole).
  import jax
  import numpy as np

  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  cpu = mesh_lib.make_mesh(v5e["mesh"], devices=jax.devices()[:4])
  shapes = M.init_params(tiny_config(), abstract=True)
  shard_bytes = lambda x, s: int(np.prod(s.shard_shape(x.value.shape))) * x.value.dtype.itemsize
  want = sum(jax.tree.leaves(jax.tree.map(shard_bytes, shapes, mesh_lib.param_shardings(shapes, cpu),
                                          is_leaf=lambda x: hasattr(x, "names"))))
  whole = v5e["model"]["parameters"] * 4
  got = progs["init params"]["bytes"]["outputs"]
  assert whole / 4 <= want <= got < whole, (want, got, whole)
  for name in ("finetune adapters init", "grpo adapters init"):
    assert 0 < progs[name]["bytes"]["outputs"] < got / 2 and progs[name]["rows"] == 0, name
  assert v5e["budget_bytes"] == targets.TARGETS["v5e-4"].tpu_hbm_bytes


@pytest.mark.parametrize("target", ["h100x1", "v5e-4"])
def test_every_qwen3_vl_program_compiles_for_an_h100_and_a_sharded_tpu_v5e(target):
  """Issue 26: the other family's programs (DeepStack in the scanned decoder, the vision scan's level
  buffer, interleaved M-RoPE) compile for both kinds of target, on a mesh that splits its heads."""
  _needs_plugins("gpu" if target.startswith("h100") else "tpu")
  mesh = {} if target.startswith("h100") else {"mesh.fsdp": 2, "mesh.tensor": 2}
  r = aot.run(_default_config(**{"model.preset": "qwen3_vl_tiny"}, **mesh), target, log=lambda *_: None)
  progs = {p["name"]: p for p in r["programs"]}
  assert set(progs) == EVERY_PROGRAM
  for name, p in progs.items():
    assert p["compiled"] and p["fits"], (name, p["error"])
  if target.startswith("h100"):
    for name in ("cold_start step", "finetune step", "grpo step", "score prefill", "evaluate prefill"):
      assert progs[name]["attention"].startswith(CUDNN), (name, progs[name]["attention"])
  else:
    assert all(p["rows_per_device"] * 2 == p["rows"] for p in progs.values())
    for name in ("cold_start step", "finetune step", "grpo step", "score prefill", "evaluate prefill"):
      assert progs[name]["attention"].startswith("splash ("), (name, progs[name]["attention"])


def test_cli_exit_status_names_the_program_that_does_not_fit(tmp_path):
  """A budget no program meets: exit 1, the message names each program, the JSON has every field."""
  _needs_plugins("gpu")
  out = tmp_path / "out.json"
  env = dict(os.environ, PYTHONPATH=REPO, XLA_PYTHON_CLIENT_MEM_FRACTION="1e-9", XLA_FLAGS="")
  env.pop("JAX_PLATFORMS", None)
  r = subprocess.run([sys.executable, "-m", "dcsft_jax.aot", "--config=configs/dcsft.py", "--target=h100x1",
                      "--programs=score", "--config.model.dtype=bfloat16", "--config.data.train_limit=16",
                      f"--json={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-2000:]
  assert "score prefill does not fit" in r.stderr and "score decode does not fit" in r.stderr, r.stderr[-2000:]
  assert "| score prefill |" in r.stdout
  got = json.loads(out.read_text())
  assert got["target"] == "h100x1" and [p["name"] for p in got["programs"]] == ["score prefill", "score decode"]
  for p in got["programs"]:
    assert p["compiled"] and not p["fits"] and p["attention"]
    assert set(p["bytes"]) >= {"arguments", "outputs", "temporaries", "aliased", "total"}
    assert p["device_bytes"] == 84942979072


def test_largest_batch_search_finds_the_crossing(monkeypatch):
  """Memory linear in the rows (a + b * rows): the search returns the last per-device batch under the
  budget, in a few compiles; with compiles that fail when too big (XLA:TPU) it bisects."""
  dev = targets.Devices(targets.TARGETS["h100x1"], [], False, 100, 1000, "")
  mesh = type("M", (), {"shape": {"data": 1, "fsdp": 2, "tensor": 1}})()
  calls = []

  def fake(p, devices, mesh, rows=None):
    per = rows // 2
    calls.append(per)
    total = 100 + 7 * per
    fits = total <= devices.budget_bytes
    tpu_like = p == "tpu"
    return aot.Result(name="x", stage="x", compiled=fits or not tpu_like, fits=fits, attention="xla",
                      bytes={} if (tpu_like and not fits) else {"total": total}, device_bytes=100,
                      budget_bytes=devices.budget_bytes, seconds=0.0, rows=rows, rows_per_device=per, shape="")

  monkeypatch.setattr(aot, "compile_program", fake)
  for kind, start in (("gpu", 4), ("tpu", 4), ("gpu", 300), ("tpu", 300)):
    calls.clear()
    first = fake(kind, dev, mesh, rows=2 * start)
    assert aot.max_rows(kind, dev, mesh, first) == (128, False), (kind, start)   # 100 + 7 * 128 = 996 <= 1000 < 1003
    assert len(calls) <= (6 if kind == "gpu" else 14), (kind, start, calls)
    # Capped below the answer: no probe above the cap (or above the config's own batch, compiled
    # already, where that is bigger), and the answer is "at least" the cap.
    calls.clear()
    got = aot.max_rows(kind, dev, mesh, first, limit_per_device=100)
    assert got == ((100, True) if start < 100 else (128, False)), (kind, start, got)
    assert all(c <= max(100, start) for c in calls), (kind, start, calls)
    # A cap above the answer changes nothing.
    calls.clear()
    assert aot.max_rows(kind, dev, mesh, first, limit_per_device=129) == (128, False), (kind, start, calls)
    assert all(c <= max(129, start) for c in calls), calls
  first = fake("gpu", dev, mesh, rows=2 * 110)
  assert aot.max_rows("gpu", dev, mesh, first, limit_per_device=100) == (110, True)    # fits above the cap


def test_attention_kernel_follows_the_target_platform():
  assert attention.resolve("auto", jnp.bfloat16, 128, "gpu") == "cudnn"
  assert attention.resolve("auto", jnp.bfloat16, 80, "gpu") == "cudnn"
  assert attention.resolve("auto", jnp.bfloat16, 12, "gpu") == "xla"      # head_dim not a multiple of 8
  assert attention.resolve("auto", jnp.float32, 128, "gpu") == "xla"
  assert attention.resolve("auto", jnp.bfloat16, 128, "tpu") == "splash"      # issue 31: the fused TPU kernel
  assert attention.resolve("auto", jnp.bfloat16, 128, "cpu") == "xla"
  with pytest.raises(ValueError, match="cuDNN"):
    attention.resolve("cudnn", jnp.bfloat16, 128, "tpu")


@pytest.mark.parametrize("frozen_in_compute_dtype", [False, True])
def test_sampling_programs_take_the_weights_the_stages_load(frozen_in_compute_dtype):
  """Scoring and evaluation load their model through run_config.sampling_options; the programs the
  aot check compiles take weights of the same dtype (bf16 under model.frozen_in_compute_dtype),
  LoRA adapters of the evaluated models included, so their memory is what the run will need."""
  import jax
  from dcsft_jax import mesh as mesh_lib
  config = _default_config(**{"model.frozen_in_compute_dtype": frozen_in_compute_dtype})
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  progs, _ = aot.programs(config, mesh, only={"score", "evaluate"})
  assert {p.name for p in progs} == {"score prefill", "score decode", "evaluate prefill", "evaluate decode"}
  want = jnp.dtype(jnp.bfloat16 if frozen_in_compute_dtype else jnp.float32)
  for p in progs:
    params = p.build(p.rows)[1][0]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert {x.dtype for _, x in leaves} == {want}, p.name
    if p.stage == "evaluate":    # the evaluated models carry LoRA adapters
      assert any("lora_a" in jax.tree_util.keystr(k) for k, _ in leaves)


def test_programs_at_thousands_of_rows_per_device_build_from_shapes_not_host_arrays():
  """The largest-batch search builds each program at up to thousands of rows per device. Its arguments
  are shapes: a host batch that big (pixels alone are rows x patches x 1176 fp32) once exhausted this
  host's memory in a 3B search on h100x8. Built for the CPU mesh here; the shapes must match what the
  batcher really fills (batching.empty_arrays), and no host array may grow with the rows."""
  import tracemalloc

  import jax
  import numpy as np

  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax.data import batching

  config = _default_config()
  mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices=jax.devices())
  progs, _ = aot.programs(config, mesh)
  step = mesh.shape["data"] * mesh.shape["fsdp"]
  small = {}
  for p in progs:
    if p.name.endswith("decode") or not p.rows:  # a decode builds by compiling its prefill (covered by the
      continue                                    # prefill's build); an init program has no batch
    _, args = p.build(2 * step)
    small[p.name] = args
  cfg, _ = aot.model_and_processor(config)
  # The shapes and dtypes of the real host batch at the same rows.
  pre = small["score prefill"]
  real = batching.empty_arrays(next(p for p in progs if p.name == "score prefill").shape.bucket, 2 * step, cfg)
  assert (pre[1].shape, pre[1].dtype) == (real["input_ids"].shape, real["input_ids"].dtype)
  assert (pre[2].shape, pre[2].dtype) == (real["positions"].shape, real["positions"].dtype)
  for k, v in pre[5].items():
    assert (v.shape, v.dtype) == (real[k].shape, np.dtype(real[k].dtype)), k
  sft_batch = small["cold_start step"][1]
  assert sft_batch["pixel_values"].shape[1:] == real["pixel_values"].shape and sft_batch["loss_index"].ndim == 3

  rows = 4096 * step
  tracemalloc.start()
  try:
    for p in progs:
      if not p.name.endswith("decode") and p.rows:
        _, args = p.build(rows)
        assert any(getattr(a, "shape", (0,))[:1] == (rows,) for a in jax.tree.leaves(args)) or \
            any(rows in getattr(a, "shape", ()) for a in jax.tree.leaves(args)), p.name
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  pixels = rows * real["pixel_values"].shape[1] * real["pixel_values"].shape[2] * 4
  # The SFT steps' loss positions come from a real (rows x length) mask: small beside the pixels.
  assert peak < pixels / 8, (peak, pixels)


def test_a_decode_whose_prefill_is_refused_says_the_refusal_is_the_prefills(monkeypatch):
  """A decode is built from its compiled prefill's outputs. Where XLA:TPU refuses that prefill (out of
  HBM), the decode's result must say so: a 3B v5e-8 search once read the prefill's refusal as the
  decode's own, in 1 s, at a size where the decode alone needs half the chip."""
  import jax

  from dcsft_jax import mesh as mesh_lib
  config = _default_config()
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  progs, _ = aot.programs(config, mesh, only={"score"})
  decode = next(p for p in progs if p.name == "score decode")
  oom = "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (16.93G)"

  def refuse(lowered, attached):
    raise RuntimeError(oom)

  monkeypatch.setattr(aot, "compile_lowered", refuse)
  devices = targets.devices("v5e-4", attached=False)
  r = aot.compile_program(decode, devices, mesh)
  assert not r.compiled and not r.fits
  assert "the prefill whose outputs this decode reads does not compile" in r.error and "16.93G" in r.error
