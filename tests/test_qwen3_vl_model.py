"""Qwen3-VL (dense): the Flax port against transformers 5.25's Qwen3VLForConditionalGeneration.

Two fully random tiny models (tests/qwen3_reference.py): (a) untied, DeepStack at vision blocks 0 and 2;
(b) tied, head_dim != hidden/heads, DeepStack at one block. Logits (fp32), position ids (exact), greedy
decoding with our KV cache, the weight name table, preset sizes, config reading, the chat template.
"""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import qwen3_reference as R
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.models import attention as attn_lib
from dcsft_jax.models import qwen3_vl as Q
from dcsft_jax.models.qwen3_vl import config as C
from dcsft_jax.models.qwen3_vl import processing, rope

TOL = 1e-4
IMG1, IMG2 = (1, 6, 10), (1, 14, 4)          # 96 x 160 and 224 x 64 px
ONE_IMAGE_ROWS = [[5, IMG1, 4], [3, IMG2, 7]]
TWO_IMAGE_ROWS = [[10, IMG1, 2, IMG2, 17]]   # the layout of the spec's worked example (L = 62)


@pytest.fixture(scope="module", params=sorted(R.CONFIGS))
def pair(request):
  cfg = R.CONFIGS[request.param]()
  hf = R.random_hf_model(cfg, seed=1 if request.param == "a" else 2)
  params = jax.tree.map(jnp.asarray, R.hf_to_ours(cfg, R.hf_state(hf)))
  return cfg, hf, params


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return jax.jit(lambda p, ids, pos, images, mask: Q.Qwen3VL(cfg).apply({"params": p}, ids, pos, images, mask))


def _hf_logits(hf, cfg, batch):
  with torch.no_grad():
    return hf(**batch.hf_kwargs(cfg)).logits.numpy()


def _rel(ours, theirs, mask):
  m = mask.astype(bool)
  return float(np.max(np.abs(ours[m] - theirs[m])) / np.max(np.abs(theirs[m])))


def _check_positions(hf, cfg, batch, positions, deltas):
  kw = batch.hf_kwargs(cfg)
  with torch.no_grad():
    hp, hd = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"],
                                     attention_mask=kw["attention_mask"])
  np.testing.assert_array_equal(positions, hp.numpy())
  np.testing.assert_array_equal(deltas, hd.numpy().reshape(-1))


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("rows", [ONE_IMAGE_ROWS, TWO_IMAGE_ROWS], ids=["two_rows", "two_images_one_row"])
def test_logits_and_positions_match_transformers(pair, rows):
  cfg, hf, params = pair
  batch = R.make_batch(cfg, rows, seed=3)
  # Images padded to 64 patches and one all-padding image row more: the padding must drop out.
  ids, pos, images, mask, deltas = batch.ours(cfg, num_patches=64, num_images=len(batch.image_grid_thw) + 1)
  _check_positions(hf, cfg, batch, pos, deltas)
  ours = np.asarray(_forward(cfg)(params, ids, pos, images, mask))
  rel = _rel(ours, _hf_logits(hf, cfg, batch), mask)
  print(f"logits rel err {rel:.2e}")
  assert rel <= TOL


def test_spec_worked_example_positions():
  """QWEN3VL.md §4.4: text 0-10, img1 at 11 (H 11-13, W 11-15), text 16-19, img2 at 20, text 27-44, delta -17."""
  cfg = R.tiny_config_a()
  batch = R.make_batch(cfg, TWO_IMAGE_ROWS)
  pos, deltas = rope.get_rope_index(batch.input_ids, cfg, image_grid_thw=batch.image_grid_thw)
  assert batch.input_ids.shape[1] == 62 and deltas.tolist() == [-17]
  t, h, w = pos[:, 0]
  np.testing.assert_array_equal(pos[:, 0, :11], np.broadcast_to(np.arange(11), (3, 11)))
  np.testing.assert_array_equal(t[11:26], 11)
  np.testing.assert_array_equal(h[11:26], np.repeat([11, 12, 13], 5))
  np.testing.assert_array_equal(w[11:26], np.tile(np.arange(11, 16), 3))
  np.testing.assert_array_equal(t[26:30], np.arange(16, 20))
  np.testing.assert_array_equal(t[30:44], 20)
  np.testing.assert_array_equal(h[30:44], np.repeat(np.arange(20, 27), 2))
  np.testing.assert_array_equal(w[30:44], np.tile([20, 21], 7))
  np.testing.assert_array_equal(t[44:], np.arange(27, 45))


def test_greedy_decode_with_kv_cache_matches_generate(pair):
  cfg, hf, params = pair
  steps = 4
  batch = R.make_batch(cfg, TWO_IMAGE_ROWS, seed=5)
  ids, pos, images, _, deltas = batch.ours(cfg)
  L = ids.shape[1]
  S = L + steps
  fam = Q.FAMILY

  def prefill(p, ids, pos, images):
    def run(m):
      cache = fam.init_cache(cfg, 1, S, jnp.float32)
      mask = (jnp.arange(S)[None, :] <= jnp.arange(L)[:, None])[None, None]       # [1, 1, L, S]
      h, visual = m.embed_inputs(ids, images)
      h, cache = m.decode(h, pos, mask=mask, cache=cache, cache_index=0, visual=visual)
      return m.logits(h[:, -1]), cache
    return Q.Qwen3VL(cfg).apply({"params": p}, method=run)

  def step(p, tok, cache, t, start):
    def run(m):
      h, _ = m.embed_inputs(tok[:, None])
      mask = (jnp.arange(S) <= L + t)[None, None, None, :]
      h, new = m.decode(h, fam.decode_positions(start + t, jnp.zeros((1,), jnp.int32)), mask=mask, cache=cache,
                        cache_index=L + t)
      return m.logits(h[:, 0]), new
    return Q.Qwen3VL(cfg).apply({"params": p}, method=run)

  logits, cache = jax.jit(prefill)(params, ids, pos, images)
  step = jax.jit(step)
  start = jnp.asarray(L + deltas, jnp.int32)       # unpadded length + rope delta
  toks, step_logits = [int(jnp.argmax(logits[0]))], [np.asarray(logits[0])]
  for t in range(steps - 1):
    logits, cache = step(params, jnp.asarray([toks[-1]], jnp.int32), cache, jnp.int32(t), start)
    toks.append(int(jnp.argmax(logits[0])))
    step_logits.append(np.asarray(logits[0]))
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = cfg.pad_token_id
  with torch.no_grad():
    out = hf.generate(**batch.hf_kwargs(cfg), do_sample=False, max_new_tokens=steps, output_logits=True,
                      return_dict_in_generate=True)
  assert toks == out.sequences[0, L:].tolist()
  theirs = np.stack([x[0].numpy() for x in out.logits])
  rel = float(np.abs(np.stack(step_logits) - theirs).max() / np.abs(theirs).max())
  print(f"decode tokens {toks}, step logits rel err {rel:.2e}")
  assert rel <= TOL


def test_negative_controls_move_logits(pair):
  """Dropping DeepStack or the learned position embedding, or 1-D text positions, move the logits far beyond the tolerance."""
  cfg, hf, params = pair
  batch = R.make_batch(cfg, ONE_IMAGE_ROWS, seed=3)
  ids, pos, images, mask, _ = batch.ours(cfg)
  ref = _hf_logits(hf, cfg, batch)

  def no_deepstack(p, ids, pos, images, mask):
    def run(m):
      h, _ = m.embed_inputs(ids, images)
      h, _ = m.decode(h, pos, mask=attn_lib.RightPadding(mask.sum(-1)), visual=None)
      return m.logits(h)
    return Q.Qwen3VL(cfg).apply({"params": p}, method=run)

  rel_ds = _rel(np.asarray(jax.jit(no_deepstack)(params, ids, pos, images, mask)), ref, mask)
  no_pe = dict(images, pe_weight=np.zeros_like(images["pe_weight"]))
  rel_pe = _rel(np.asarray(_forward(cfg)(params, ids, pos, no_pe, mask)), ref, mask)
  flat = np.broadcast_to(np.cumsum(mask, -1)[None] - 1, pos.shape).astype(np.int32) * mask  # 1-D positions
  rel_1d = _rel(np.asarray(_forward(cfg)(params, ids, flat, images, mask)), ref, mask)
  print(f"controls: no deepstack {rel_ds:.3f}, no pos_embed {rel_pe:.3f}, 1-D positions {rel_1d:.3f}")
  assert min(rel_ds, rel_pe, rel_1d) > 100 * TOL


def test_vision_layout_matches_transformers_interpolation():
  from transformers import vision_utils
  cfg = R.tiny_config_b()
  v = cfg.vision
  grids = [(1, 6, 10), (1, 14, 4), (2, 4, 6), (1, 2, 2)]
  idx, wts = vision_utils.get_vision_interpolation_indices_and_weights(
      torch.tensor(grids), num_grid_per_side=v.num_grid_per_side, mode="bilinear", align_corners=True,
      spatial_merge_size=v.spatial_merge_size)
  pid = vision_utils.get_vision_position_ids(torch.tensor(grids), v.spatial_merge_size)
  lay = rope.vision_layout(grids + [None], v, 64)
  sizes = [t * h * w for t, h, w in grids]
  take = lambda a: np.concatenate([a[i, :s] for i, s in enumerate(sizes)])
  np.testing.assert_array_equal(take(lay["pe_index"]), idx.numpy())
  np.testing.assert_array_equal(take(lay["pe_weight"]), wts.numpy())
  np.testing.assert_array_equal(take(lay["pos_hw"]), pid.numpy())
  np.testing.assert_array_equal(take(lay["frame_seg"]), np.concatenate([np.repeat(np.arange(t), h * w)
                                                                         for t, h, w in grids]))
  assert (lay["frame_seg"][-1] == -1).all() and (lay["pe_weight"][-1] == 0).all()
  assert (lay["frame_seg"][0, 60:] == -1).all() and (lay["pe_weight"][0, 60:] == 0).all()


def test_rope_index_video_frames_split():
  """A 2-frame video is two single-frame runs separated by text (the processor's timestamps)."""
  cfg = R.tiny_config_a()
  V, S, E = cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
  ids = np.asarray([[1, 2, S] + [V] * 6 + [E, 3, 4, S] + [V] * 6 + [E, 5]])
  pos, deltas = rope.get_rope_index(ids, cfg, video_grid_thw=np.asarray([[2, 4, 6]]))
  np.testing.assert_array_equal(pos[:, 0, 3:9], [[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5, 3, 4, 5]])
  assert pos[0, 0, 9] == 6 and pos[0, 0, 13] == 10 and pos[0, 0, -1] == 14
  assert deltas.tolist() == [15 - ids.shape[1]]


def test_bf16_and_sharded_forward(pair):
  """bf16 compute runs and stays near fp32; on a 2x2x2 mesh (8 CPU devices) the logical axes shard the
  weights and activations and the fp32 logits equal the single-device ones."""
  cfg, hf, params = pair
  rows = ONE_IMAGE_ROWS + [[6, IMG2, 2], [2, IMG1, 8]]     # 4 rows and 4 images: divisible by data*fsdp
  batch = R.make_batch(cfg, rows, seed=7)
  ids, pos, images, mask, _ = batch.ours(cfg)
  ref = np.asarray(_forward(cfg)(params, ids, pos, images, mask))
  bf = Q.Qwen3VL(cfg, Q.ModelOptions(dtype=jnp.bfloat16))
  out = jax.jit(lambda p: bf.apply({"params": p}, ids, pos, images, mask))(params)
  assert out.dtype == jnp.bfloat16
  assert _rel(np.asarray(out, np.float32), ref, mask) < 5e-2
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = mesh_lib.param_shardings(Q.FAMILY.init_params(cfg, abstract=True), mesh)
  p8 = jax.device_put(params, shardings)
  assert p8["layers"]["gate_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  b = lambda nd, dim=0: mesh_lib.batch_sharding(mesh, nd, dim)
  args = (jax.device_put(ids, b(2)), jax.device_put(pos, b(3, 1)),
          {k: jax.device_put(v, b(v.ndim)) for k, v in images.items()}, jax.device_put(mask, b(2)))
  model = Q.Qwen3VL(cfg)
  with mesh_lib.use(mesh):
    out = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(p8, *args)
  assert len(out.sharding.device_set) == 8
  assert _rel(np.asarray(out), ref, mask) <= 1e-5


# ------------------------------------------------------------------------------------- weights
def test_name_table_covers_every_hf_tensor_once_and_round_trips(pair):
  cfg, hf, params = pair
  state = R.hf_state(hf)
  table = Q.weights.name_table(cfg)
  names = [e.hf.format(i=i) for e in table for i in (range(e.layers) if e.layers else [None])]
  assert len(names) == len(set(names))
  assert set(names) == set(state)
  assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)
  back = R.ours_to_hf(cfg, jax.tree.map(np.asarray, params))
  for k, w in state.items():
    assert back[k].shape == w.shape and back[k].dtype == w.dtype, k
    assert np.array_equal(back[k], w), k
  again = R.hf_to_ours(cfg, back)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, jax.tree.map(np.asarray, params))
  # Our parameter tree has exactly the leaves the table names, with the init's shapes.
  init = Q.unbox(Q.FAMILY.init_params(cfg, abstract=True))
  assert jax.tree.structure(init) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: a.shape == b.shape or pytest.fail(f"{a.shape} != {b.shape}"), init, params)


def test_canonical_names():
  cn = processing.canonical_name
  assert cn("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
  assert cn("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
  assert cn("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
  assert cn("model.norm.weight") == "model.language_model.norm.weight"
  for n in ("model.visual.merger.norm.bias", "model.language_model.norm.weight", "lm_head.weight"):
    assert cn(n) == n


def test_init_params_abstract_lora_and_logical_axes():
  cfg = C.tiny_config()
  rules = {name for name, _ in mesh_lib.LOGICAL_AXIS_RULES}
  for opts in (Q.ModelOptions(), Q.ModelOptions(lora=Q.LoraSpec(vision=True, merger=True), remat=True)):
    abstract = Q.FAMILY.init_params(cfg, opts, abstract=True)
    for leaf in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
      assert isinstance(leaf, nn.LogicallyPartitioned)
      assert len(leaf.names) == leaf.value.ndim and set(leaf.names) - {None} <= rules, leaf.names
  p = Q.unbox(abstract)               # the LoRA tree (the last options)
  lora = {"/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(p)[0]
          if path[-1].key == "lora_a"}
  assert {"visual/blocks/qkv", "visual/blocks/proj", "visual/blocks/linear_fc1", "visual/blocks/linear_fc2",
          "visual/merger/linear_fc1", "visual/merger/linear_fc2", "visual/deepstack_merger/linear_fc1",
          "visual/deepstack_merger/linear_fc2"} | {f"layers/{n}" for n in Q.TEXT_LORA_TARGETS} == lora
  assert p["visual"]["deepstack_merger"]["linear_fc1"]["lora_a"].shape == (2, 128, 32)
  eager = Q.unbox(Q.FAMILY.init_params(cfg, Q.ModelOptions(), jax.random.PRNGKey(0)))   # not traced
  assert Q.count_params(eager) == Q.count_params(Q.FAMILY.init_params(cfg, abstract=True))


def test_remat_and_lora_keep_the_forward_and_deepstack_gradients_reach_every_block():
  """remat (the vision block's method-level checkpoint, the DeepStack buffer outside it) and zero-initialised
  LoRA leave the logits alone; the adapters' gradients reach every vision block through the buffer."""
  cfg = R.tiny_config_a()
  batch = R.make_batch(cfg, ONE_IMAGE_ROWS, seed=3)
  ids, pos, images, mask, _ = batch.ours(cfg)
  opts = Q.ModelOptions(remat=True, lora=Q.LoraSpec(rank=4, vision=True, merger=True))
  full = jax.jit(lambda r: Q.unbox(Q.init_params(cfg, opts, r)))(jax.random.PRNGKey(1))
  model = Q.Qwen3VL(cfg, opts)

  def split(node, adapter):
    out = {k: split(v, adapter) if isinstance(v, dict) else v for k, v in node.items()
           if isinstance(v, dict) or Q.is_adapter((k,)) == adapter}
    return {k: v for k, v in out.items() if not isinstance(v, dict) or v}

  def merge(a, b):
    return {k: merge(a[k], b[k]) if isinstance(a.get(k), dict) and k in b else b.get(k, a.get(k))
            for k in set(a) | set(b)}
  base, adapters = split(full, False), split(full, True)
  fwd = lambda ad: model.apply({"params": merge(base, ad)}, ids, pos, images, mask)
  np.testing.assert_allclose(np.asarray(jax.jit(fwd)(adapters)), np.asarray(_forward(cfg)(base, ids, pos, images, mask)),
                             rtol=0, atol=1e-5)
  g = jax.jit(jax.grad(lambda ad: jnp.sum(fwd(ad)[..., :4])))(adapters)
  gv = g["visual"]["blocks"]["linear_fc1"]["lora_b"]                            # [depth, r, I]
  assert all(float(jnp.abs(gv[i]).max()) > 0 for i in range(cfg.vision.depth))
  assert all(float(jnp.abs(g["visual"]["deepstack_merger"]["linear_fc2"]["lora_b"][j]).max()) > 0 for j in range(2))


# ------------------------------------------------------------------------------------- config
def _count_hf(cfg) -> int:
  with torch.device("meta"):
    model = transformers.Qwen3VLForConditionalGeneration(R.hf_config(cfg))
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,billions", [("2b", 2.128), ("4b", 4.438), ("8b", 8.767), ("32b", 33.357)])
def test_preset_parameter_counts_match_transformers(name, billions):
  cfg = Q.FAMILY.presets[name]()
  ours = Q.count_params(Q.FAMILY.init_params(cfg, abstract=True))
  assert ours == _count_hf(cfg)
  assert round(ours / 1e9, 3) == billions


def test_from_hf_dict_refuses_flat_and_reads_hub_rope():
  flat = {"model_type": "qwen3_vl", "hidden_size": 2560, "num_hidden_layers": 36, "rope_theta": 5e6}
  with pytest.raises(ValueError) as e:
    C.Qwen3VLConfig.from_hf_dict(flat)
  assert "text_config" in str(e.value) and "\n" not in str(e.value)
  ref = C.preset("4b")
  hub = ref.to_hf_dict()
  t = hub["text_config"]
  t.pop("rope_parameters")
  t["rope_scaling"] = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}
  t["rope_theta"] = 5000000
  hub["vision_config"].pop("rope_parameters")
  hub["vision_config"]["model_type"] = "qwen3_vl"          # what the Hub files say
  got = C.Qwen3VLConfig.from_hf_dict(hub)
  assert got == ref and got.text.rope_theta == 5e6 and got.text.mrope_section == (24, 20, 20)
  rp = transformers.Qwen3VLConfig(**hub).text_config.rope_parameters      # transformers reads it the same
  assert rp["rope_theta"] == 5e6 and list(rp["mrope_section"]) == [24, 20, 20]
  # Only the top-level tie_word_embeddings ties.
  inner = json.loads(json.dumps(hub))
  inner["tie_word_embeddings"] = False
  assert not C.Qwen3VLConfig.from_hf_dict(inner).tie_word_embeddings
  # Missing rope fields fall back as transformers' do (theta 5e5, [24, 20, 20]).
  bare = json.loads(json.dumps(hub))
  bare["text_config"].pop("rope_scaling"), bare["text_config"].pop("rope_theta")
  assert C.Qwen3VLConfig.from_hf_dict(bare).text.rope_theta == 500000.0
  with pytest.raises(ValueError, match="perfect square"):
    C.tiny_config(num_position_embeddings=20)


@pytest.mark.parametrize("make", [R.tiny_config_a, R.tiny_config_b, lambda: C.preset("4b")])
def test_to_hf_dict_round_trips_through_transformers(make):
  cfg = make()
  back = C.Qwen3VLConfig.from_hf_dict(R.hf_config(cfg).to_dict())
  assert back == cfg
  assert C.Qwen3VLConfig.from_hf_dict(cfg.to_hf_dict()).to_hf_dict() == cfg.to_hf_dict()   # raw verbatim


# ------------------------------------------------------------------------------------- processing
def test_chat_template_renders_the_spec_examples():
  from transformers.utils.chat_template_utils import _compile_jinja_template
  tpl = _compile_jinja_template(processing.QWEN3_VL_CHAT_TEMPLATE)
  user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
  out = tpl.render(messages=[user, {"role": "assistant", "content": "A cat."}])
  assert out == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
                 "<|im_start|>assistant\nA cat.<|im_end|>\n")
  out = tpl.render(messages=[{"role": "system", "content": "Be brief."}, user], add_generation_prompt=True,
                   add_vision_id=True)
  assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: "
                 "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n")
  assert Q.FAMILY.default_system_prompt is None


def test_preprocessor_config_is_the_hub_form():
  d = processing.preprocessor_config()
  assert d["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
  assert (d["patch_size"], d["merge_size"], d["temporal_patch_size"]) == (16, 2, 2)
  assert d["image_mean"] == d["image_std"] == [0.5] * 3 and d["processor_class"] == "Qwen3VLProcessor"
  assert Q.FAMILY.pixels_per_token(C.tiny_config()) == 32 * 32
