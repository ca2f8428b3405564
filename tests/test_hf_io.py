"""HF checkpoints in and out: bit-identical round trip, loud errors, LoRA merge, real sizes, CLI."""
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_reference as R
from dcsft_jax import checkpoint, hf
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(d):
  idx = hf.CheckpointIndex(d)
  return {n: np.asarray(idx.get(n)) for n in idx.where}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = tiny_config()
  model = R.random_hf_model(cfg, seed=7)
  d = tmp_path_factory.mktemp("hf")
  model.save_pretrained(d)
  (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))  # a processor file to carry
  return cfg, model, str(d)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_dir, tmp_path, dtype):
  cfg, model, src = hf_dir
  if dtype == "bfloat16":  # a bf16 checkpoint goes through fp32 master weights and back unchanged
    bf = tmp_path / "bf16_src"
    model.to(torch.bfloat16).save_pretrained(bf)
    model.to(torch.float32)
    shutil.copy(os.path.join(src, "tokenizer_config.json"), bf)
    src = str(bf)
  _, params = hf.load_hf(src, opts=M.ModelOptions(param_dtype=jnp.float32))
  out = str(tmp_path / "out")
  hf.save_hf(params, Qwen25VLConfig.from_pretrained(src), out, source_dir=src, dtype=dtype,
             max_shard_bytes=200_000)  # force several shards and an index
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert os.path.exists(os.path.join(out, "generation_config.json"))
  assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
  a, b = _tensors(src), _tensors(out)
  assert sorted(a) == sorted(b)
  for n in a:
    assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
    assert a[n].tobytes() == b[n].tobytes(), n

  reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                                             dtype=torch.float32).eval()
  batch = R.make_batch(cfg, R.MIXED_ROWS, seed=5)
  ref_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      src, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(**batch.hf_kwargs(cfg)).logits.numpy(),
                                  ref_model(**batch.hf_kwargs(cfg)).logits.numpy())


def test_transformers_in_memory_names_are_accepted(hf_dir, tmp_path):
  """transformers 5.x in-memory names (model.language_model.*, model.visual.*) load too."""
  cfg, model, src = hf_dir
  renamed = {("model.language_model." + n[len("model."):] if n.startswith("model.") else
              "model." + n if n.startswith("visual.") else n): v for n, v in _tensors(src).items()}
  d = tmp_path / "renamed"
  d.mkdir()
  shutil.copy(os.path.join(src, "config.json"), d)
  safetensors.numpy.save_file(renamed, str(d / "model.safetensors"))
  _, p1 = hf.load_hf(src)
  _, p2 = hf.load_hf(str(d))
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _broken_copy(src, dst, edit):
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  t = _tensors(src)
  edit(t)
  safetensors.numpy.save_file(t, os.path.join(dst, "model.safetensors"))
  return dst


def test_mismatched_checkpoints_fail_naming_the_tensor(hf_dir, tmp_path):
  _, _, src = hf_dir
  name = "model.layers.1.mlp.up_proj.weight"
  d = _broken_copy(src, str(tmp_path / "missing"), lambda t: t.pop(name))
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    hf.load_hf(d)
  d = _broken_copy(src, str(tmp_path / "shape"), lambda t: t.__setitem__(name, t[name][:-1]))
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(159, 96\)"):
    hf.load_hf(d)
  d = _broken_copy(src, str(tmp_path / "extra"), lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight",
                                                                          t[name]))
  with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
    hf.load_hf(d)
  d = tmp_path / "truncated"
  shutil.copytree(src, d)
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-1000])
  with pytest.raises(ValueError, match="truncated"):
    hf.load_hf(str(d))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(str(tmp_path))


def _with_trained_adapters(cfg, base, lora, seed):
  """`base` with every LoRA adapter of `lora` added, each with non-zero weights, as after training."""
  full = M.unbox(M.init_params(cfg, M.ModelOptions(lora=lora), jax.random.PRNGKey(1)))
  key = iter(jax.random.split(jax.random.PRNGKey(seed), 1000))

  def graft(b, f):
    if isinstance(f, dict):
      return {k: (graft(b[k], v) if k in b else jax.random.normal(next(key), v.shape) * 0.1) for k, v in f.items()}
    return b
  return graft(base, full)


def test_lora_is_merged_on_export(hf_dir, tmp_path):
  cfg, _, src = hf_dir
  lora = M.LoraSpec(rank=4, alpha=8.0, vision=True, merger=True)
  _, base = hf.load_hf(src)
  params = _with_trained_adapters(cfg, base, lora, seed=2)
  n_adapters = sum("lora_a" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  assert n_adapters == 7 + 5 + 2
  out = str(tmp_path / "merged")
  hf.save_hf(params, cfg, out, lora=lora, dtype="float32")
  t = _tensors(out)
  q = params["layers"]["q_proj"]
  want = (np.asarray(q["kernel"][1]) + np.asarray(q["lora_a"][1]) @ np.asarray(q["lora_b"][1]) * 2.0).T
  # The same fp32 rank-4 product and add on both sides (numpy's and XLA's summation order).
  np.testing.assert_allclose(t["model.layers.1.self_attn.q_proj.weight"], want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(t["model.layers.1.self_attn.q_proj.weight"], np.asarray(q["kernel"][1]).T)
  # The merged model is what transformers runs: same logits as ours with adapters on.
  batch = R.make_batch(cfg, R.MIXED_ROWS[:2], seed=6)
  ids, pos, images, am = batch.ours(cfg)
  ours = np.asarray(M.Qwen25VL(cfg, M.ModelOptions(lora=lora)).apply({"params": params}, ids, pos, images, am))
  theirs_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
  with torch.no_grad():
    theirs = theirs_model.eval()(**batch.hf_kwargs(cfg)).logits.numpy()
  m = batch.attention_mask.astype(bool)
  assert np.abs(ours - theirs)[m].max() / np.abs(theirs[m]).max() < 1e-4


def test_evaluation_merges_lora_on_the_devices_as_the_export_does(hf_dir):
  """Issue 29: LoRA models are evaluated merged (the authors evaluate `swift export --merge_lora`
  checkpoints). The on-device merge equals the export's host merge, keeps each kernel's sharding, and
  the merged model's logits equal the unmerged model's (the same sum, rounded once or twice in fp32)."""
  from dcsft_jax import config_base
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax.models import params as params_lib
  assert config_base.base().evaluate.merge_lora is True
  cfg, _, src = hf_dir
  lora = M.LoraSpec(rank=4, alpha=8.0)
  _, base = hf.load_hf(src)
  params = _with_trained_adapters(cfg, base, lora, seed=3)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", None))
  q = params["layers"]["q_proj"]
  params["layers"]["q_proj"] = {**q, "kernel": jax.device_put(q["kernel"], sharding)}
  merged = params_lib.merge_lora(params, lora.scale)
  host = hf.merge_lora(params, lora)
  assert "lora_a" not in merged["layers"]["q_proj"] and merged["layers"]["q_proj"]["kernel"].sharding == sharding
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(host)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  batch = R.make_batch(cfg, R.MIXED_ROWS[:2], seed=6)
  ids, pos, images, am = batch.ours(cfg)
  on_host = lambda t: jax.tree.map(np.asarray, t)
  on_the_fly = np.asarray(M.Qwen25VL(cfg, M.ModelOptions(lora=lora)).apply({"params": on_host(params)}, ids, pos,
                                                                          images, am))
  folded = np.asarray(M.Qwen25VL(cfg, M.ModelOptions()).apply({"params": on_host(merged)}, ids, pos, images, am))
  m = batch.attention_mask.astype(bool)
  assert np.abs(on_the_fly - folded)[m].max() / np.abs(on_the_fly[m]).max() < 1e-5


HUB = {  # the released sizes' Hub config.json (flat form), shapes from QWEN25VL.md §1.2
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, out=2048),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, out=3584),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, out=5120),
    "72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, out=8192),
}


def hub_config(size):
  h = dict(HUB[size])
  out = h.pop("out")
  return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
          "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
          "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
          "video_token_id": 151656, "hidden_act": "silu", "max_position_embeddings": 128000,
          "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "use_sliding_window": False,
          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
          "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                            "num_heads": 16, "in_chans": 3, "out_hidden_size": out, "patch_size": 14,
                            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                            "temporal_patch_size": 2}, **h}


@pytest.mark.parametrize("size", sorted(HUB))
def test_released_sizes_build_with_transformers_parameter_counts(size):
  cfg = Qwen25VLConfig.from_hf_dict(hub_config(size))
  abstract = M.init_params(cfg, abstract=True)
  with torch.device("meta"):
    ref = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**hub_config(size)))
  n_ref = sum(p.numel() for p in ref.parameters())  # tied weights count once
  assert M.count_params(abstract) == n_ref
  if size == "3B":
    assert abs(n_ref - 3.755e9) < 5e6  # ANCHORS.md


def test_convert_cli_round_trip(hf_dir, tmp_path):
  _, _, src = hf_dir
  orbax_dir, back = str(tmp_path / "orbax"), str(tmp_path / "back")
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  for args in (["--from_hf", src, "--to_orbax", orbax_dir], ["--from_orbax", orbax_dir, "--to_hf", back]):
    r = subprocess.run([sys.executable, "-m", "dcsft_jax.convert", *[f"{a}={b}" for a, b in zip(args[::2], args[1::2])]],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
  assert checkpoint.is_model_dir(orbax_dir)
  a, b = _tensors(src), _tensors(back)
  assert sorted(a) == sorted(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)
  assert os.path.exists(os.path.join(back, "tokenizer_config.json"))


def test_convert_refuses_to_destroy_data(hf_dir, tmp_path):
  """convert never writes over its input or a folder of the user's; a model directory only with --overwrite."""
  from dcsft_jax import convert
  _, _, src = hf_dir
  user = tmp_path / "mine"
  (user / "sub").mkdir(parents=True)
  (user / "notes.txt").write_text("keep")
  (user / "sub" / "data.bin").write_bytes(b"keep")
  with pytest.raises(convert.ConvertError, match="not a hf model directory.*notes.txt"):
    convert.convert(from_orbax=src, to_hf=str(user), overwrite=True)
  with pytest.raises(convert.ConvertError, match="is the input"):
    convert.convert(from_hf=src, to_orbax=src, overwrite=True)
  with pytest.raises(convert.ConvertError, match="is the input"):
    convert.convert(from_hf=src, to_orbax=os.path.join(src, "inside"), overwrite=True)
  with pytest.raises(convert.ConvertError, match="existing hf model directory; pass --overwrite"):
    convert.convert(from_orbax=str(tmp_path / "x"), to_hf=src)
  assert (user / "notes.txt").read_text() == "keep" and (user / "sub" / "data.bin").read_bytes() == b"keep"
  # An HF export with a user's file added is no longer only ours: refused even with --overwrite.
  exported = tmp_path / "exported"
  shutil.copytree(src, exported)
  (exported / "notes.txt").write_text("keep")
  with pytest.raises(convert.ConvertError, match="notes.txt"):
    convert.check_output(str(exported), [str(tmp_path / "x")], "hf", True)
  convert.check_output(src, [str(tmp_path / "x")], "hf", True)          # ours alone: allowed with --overwrite


def test_convert_killed_at_any_moment_leaves_the_old_or_the_new_model(hf_dir, tmp_path):
  """kill -9 at many offsets into `convert --from_hf --to_orbax=OUT --overwrite` over an existing model:
  OUT always loads, as the old model or the new one, never a mix or nothing."""
  cfg, model, src = hf_dir
  out = str(tmp_path / "model")
  _, new_params = hf.load_hf(src)
  old_params = jax.tree.map(lambda x: x + 1.0, new_params)
  checkpoint.save_model(out, old_params, cfg, source_dir=src)
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  cmd = [sys.executable, "-m", "dcsft_jax.convert", f"--from_hf={src}", f"--to_orbax={out}", "--overwrite"]

  def which() -> str:
    _, got, _ = checkpoint.load_model(out)
    for name, ref in (("old", old_params), ("new", new_params)):
      if all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))):
        return name
    raise AssertionError(f"{out} loads, but as neither the old model nor the new one")

  t0 = time.time()
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  full = time.time() - t0
  assert which() == "new"
  checkpoint.save_model(out, old_params, cfg, source_dir=src)
  seen = []
  for frac in (0.3, 0.5, 0.65, 0.75, 0.82, 0.88, 0.93, 0.97, 1.0):
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(frac * full)
    p.kill()
    p.wait()
    seen.append(which())
    if seen[-1] == "new":                       # back to the old model for the next offset
      checkpoint.save_model(out, old_params, cfg, source_dir=src)
  assert "old" in seen, seen                    # some kills landed before the swap
  # What the killed writers left beside the target goes with the next conversion.
  assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
  assert sorted(os.listdir(tmp_path)) == ["model"] and which() == "new"


def test_orbax_dir_that_does_not_match_its_config_fails(hf_dir, tmp_path):
  cfg, _, src = hf_dir
  _, params = hf.load_hf(src)
  d = str(tmp_path / "m")
  checkpoint.save_model(d, params, cfg)
  conf = json.load(open(os.path.join(d, "config.json")))
  conf["text_config"]["intermediate_size"] = 170
  json.dump(conf, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"has shape \(3, (96, 160|160, 96)\), but config.json implies \(3, (96, 170|170, 96)\)"):
    checkpoint.load_model(d)


def test_lora_model_dir_keeps_only_adapters_and_reads_its_base(tmp_path):
  """A LoRA run's model directory holds the adapters and names its base: it reads back to the same
  full tree (bit-equal), is a fraction of the base's size, and a missing base is named."""
  cfg = tiny_config()
  lora = M.LoraSpec(rank=4, alpha=8.0)
  base = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
  base_dir = str(tmp_path / "cold_start_model")
  checkpoint.save_model(base_dir, base, cfg)
  full = M.unbox(M.init_params(cfg, M.ModelOptions(lora=lora), jax.random.PRNGKey(1)))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "lora_b" in jax.tree_util.keystr(p) else x, full)
  params = {**params, **{k: v for k, v in base.items() if k not in ("layers",)}}
  params["layers"] = {k: ({**v, **base["layers"][k]} if isinstance(v, dict) else base["layers"][k])
                      for k, v in params["layers"].items()}
  d = str(tmp_path / "models" / "sft_em")
  checkpoint.save_model(d, params, cfg, lora=lora, base_dir=base_dir)
  assert checkpoint.base_of(d) == os.path.abspath(base_dir)
  size = lambda p: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(p) for f in fs)
  assert size(os.path.join(d, "params")) < 0.5 * size(os.path.join(base_dir, "params"))
  cfg2, back, lora2 = checkpoint.load_model(d)
  assert lora2 == lora and cfg2 == cfg
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(params), flat(back)
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  # Scoring and evaluation load in the compute dtype (run_config.sampling_options): Orbax casts the
  # stored fp32 base and adapters while restoring, to exactly what a cast after loading gives.
  _, back16, _ = checkpoint.load_model(d, opts=M.ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
  c = flat(back16)
  assert sorted(c) == sorted(a) and {v.dtype for v in c.values()} == {np.dtype(jnp.bfloat16)}
  assert all(np.array_equal(c[k], a[k].astype(jnp.bfloat16)) for k in a)
  shutil.rmtree(base_dir)
  with pytest.raises(FileNotFoundError, match="cold_start_model"):
    checkpoint.load_model(d)
