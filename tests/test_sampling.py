"""The sampler: greedy parity with transformers' generate, sampling statistics, one prefill per
prompt, shared prefix == independent copies, sharding, EOS handling, the CLI."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import hf_reference
from dcsft_jax import checkpoint, hf, sampling
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.data import batching
from dcsft_jax.data.processor import Processor
from dcsft_jax.data.records import Record
from dcsft_jax.data.tokenizer import save_tiny_processor
from dcsft_jax.models import qwen2_5_vl as model_lib
from dcsft_jax.models.qwen2_5_vl import rope
from dcsft_jax.models.qwen2_5_vl.config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(28, 28), (56, 84), (84, 56), (112, 112), (56, 56), (28, 112), (140, 56), (84, 84)]


def _images(tmp_path, sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  paths = []
  for i, (w, h) in enumerate(sizes):
    p = str(tmp_path / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    paths.append(p)
  return paths


def _records(paths):
  qs = ["what is it?", "name the object.", "one word please", "which digit", "say it", "what",
        "describe in one word", "label?"]
  return [Record(f"r{i}", p, qs[i % len(qs)], "x", "classification") for i, p in enumerate(paths)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A fully random tiny model written by transformers (lm_head scaled up so logits are peaked)."""
  cfg = tiny_config()
  model = hf_reference.random_hf_model(cfg, seed=3)
  with torch.no_grad():
    model.lm_head.weight.mul_(4.0)
  d = str(tmp_path_factory.mktemp("hf_tiny"))
  model.save_pretrained(d)
  save_tiny_processor(d)
  return d


def _batch(processor, records, batch_size=None):
  buckets = batching.auto_buckets(records, processor, with_answers=False, max_buckets=1)
  it = batching.BatchIterator(records, processor, batch_size=batch_size or len(records), buckets=buckets,
                              with_answers=False, shuffle=False)
  b = next(iter(it))
  it.close()
  return b


def _hf_generate(model, processor, records, eos, max_new):
  """transformers' greedy generate on a left-padded batch (what HF needs for batched generation)."""
  cfg = processor.cfg
  exs = [processor.encode(r.image, r.prompt) for r in records]
  L = max(len(e["input_ids"]) for e in exs)
  ids = np.full((len(exs), L), 400, np.int64)
  mask = np.zeros((len(exs), L), np.int64)
  for i, e in enumerate(exs):
    n = len(e["input_ids"])
    ids[i, L - n:], mask[i, L - n:] = e["input_ids"], 1
  pv = np.concatenate([e["pixel_values"] for e in exs])
  grid = np.concatenate([e["image_grid_thw"] for e in exs])
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         mm_token_type_ids=torch.tensor(rope.mm_token_types(ids, cfg)),
                         pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=list(eos), pad_token_id=400,
                         repetition_penalty=1.0,
                         temperature=None, top_k=None, top_p=None, output_scores=True,
                         return_dict_in_generate=True)
  return out.sequences[:, L:].numpy(), torch.stack(out.scores, 1).numpy()


def test_greedy_matches_transformers_generate(hf_dir, tmp_path):
  cfg, params, _ = checkpoint.load_any(hf_dir)
  processor = Processor.from_pretrained(hf_dir, cfg=cfg)
  records = _records(_images(tmp_path))
  b = _batch(processor, records)
  assert len(set(b.arrays["lengths"].tolist())) > 3     # really different image sizes in one batch
  sampler = sampling.Sampler(cfg)
  T = 12
  keys = sampling.sample_keys(0, b.ids, 1)
  free = sampling.SamplingParams(max_new_tokens=T, pad_id=400)
  tok, _, _ = sampler.generate(params, b.arrays, keys, free)
  tok = np.asarray(tok)[:, 0]
  # An end-of-sequence id that some rows produce midway and others never: per-row stopping is tested.
  counts = [(int((tok[:, 1:T - 2] == v).any(1).sum()), int(v)) for v in np.unique(tok[:, 1:T - 2])]
  eos = max(v for c, v in counts if c == max(c for c, _ in counts if c < len(tok)))
  sp = sampling.SamplingParams(max_new_tokens=T, eos_ids=(eos,), pad_id=400)
  ours, lengths, _ = sampler.generate(params, b.arrays, keys, sp)
  ours, lengths = np.asarray(ours)[:, 0], np.asarray(lengths)[:, 0]
  assert (lengths < T).any() and (lengths == T).any()

  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").eval()
  theirs, scores = _hf_generate(model, processor, records, (eos,), T)
  # Peaked logits: the top-1 margin at every compared step is far above float noise.
  top2 = np.sort(scores, axis=-1)[..., -2:]
  margin = top2[..., 1] - top2[..., 0]
  live = np.arange(theirs.shape[1])[None] < lengths[:, None]
  assert margin[live].min() > 1e-3, margin[live].min()
  for r in range(len(records)):
    n = lengths[r]
    assert ours[r, :n].tolist() == theirs[r, :n].tolist(), f"row {r}"
    assert (ours[r, n:] == 400).all()
    if n < theirs.shape[1]:
      assert (theirs[r, n:] == 400).all()


@pytest.mark.parametrize("penalty", [1.05, 1.5])
def test_repetition_penalty_matches_transformers_generate(hf_dir, tmp_path, penalty):
  """Greedy decoding with transformers' RepetitionPenaltyLogitsProcessor (over the prompt's ids and the
  answer's, before temperature) equals HF generate token for token. One prompt per HF call: HF also
  penalises the pad tokens of a left-padded row, which our right-padded batches leave out."""
  cfg, params, _ = checkpoint.load_any(hf_dir)
  processor = Processor.from_pretrained(hf_dir, cfg=cfg)
  records = _records(_images(tmp_path))
  b = _batch(processor, records)
  T = 12
  keys = sampling.sample_keys(0, b.ids, 1)
  sampler = sampling.Sampler(cfg)
  sp = sampling.SamplingParams(max_new_tokens=T, pad_id=400, repetition_penalty=penalty)
  ours = np.asarray(sampler.generate(params, b.arrays, keys, sp)[0])[:, 0]
  plain = np.asarray(sampler.generate(params, b.arrays, keys, dataclasses.replace(sp, repetition_penalty=1.0))[0])
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").eval()
  for r, rec in enumerate(records):
    e = processor.encode(rec.image, rec.prompt)
    ids = np.asarray(e["input_ids"], np.int64)[None]
    with torch.no_grad():
      out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                           mm_token_type_ids=torch.tensor(rope.mm_token_types(ids, cfg)),
                           pixel_values=torch.tensor(e["pixel_values"]),
                           image_grid_thw=torch.tensor(np.asarray(e["image_grid_thw"], np.int64)), do_sample=False,
                           max_new_tokens=T,
                           repetition_penalty=penalty, eos_token_id=None, pad_token_id=400,
                           temperature=None, top_k=None, top_p=None, output_scores=True,
                           return_dict_in_generate=True)
    theirs = out.sequences[0, ids.shape[1]:].numpy()
    scores = torch.stack(out.scores, 1)[0].numpy()          # after the penalty
    top2 = np.sort(scores, axis=-1)[..., -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3           # no near-ties: float noise cannot flip a token
    assert ours[r].tolist() == theirs.tolist(), f"row {r}"
  if penalty == 1.5:
    # The penalty really changed the answers: the test would catch it being ignored.
    assert (ours != plain[:, 0]).any()


def _target_probs(logits, temperature, top_k, top_p):
  """Independent NumPy restatement of transformers' Temperature -> TopK -> TopP warpers."""
  x = logits / temperature
  if top_k:
    kth = np.sort(x)[-min(top_k, len(x))]
    x = np.where(x < kth, -np.inf, x)
  if top_p < 1:
    order = np.argsort(x, kind="stable")       # ascending, as TopPLogitsWarper sorts
    p = np.exp(x[order] - x.max())
    p /= p.sum()
    remove = np.cumsum(p) <= 1 - top_p
    remove[-1] = False
    x[order[remove]] = -np.inf
  p = np.exp(x - x.max())
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0),
                                                     (1.0, 0, 0.8), (1.3, 6, 0.9), (0.9, 50, 1.0)])
def test_sampling_frequencies_match_targets(temperature, top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 1.5, 12).astype(np.float32)
  target = _target_probs(logits.astype(np.float64), temperature, top_k, top_p)
  N = 40_000
  sp = sampling.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
  keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(1), N)))
  draws = jax.jit(lambda k: sampling.choose_tokens(jnp.broadcast_to(jnp.asarray(logits), (N, 12)), k, 3, sp))(keys)
  freq = np.bincount(np.asarray(draws), minlength=12) / N
  # Filtered tokens never appear; the rest within 5 binomial standard deviations (per token).
  assert (freq[target == 0] == 0).all()
  sd = np.sqrt(target * (1 - target) / N)
  assert np.all(np.abs(freq - target) <= 5 * sd + 1e-12), (freq, target)
  if 0 < top_k < len(logits) or top_p < 1:
    assert (target == 0).any()                # the filter really removed something


def test_filter_agrees_with_transformers_warpers():
  from transformers.generation import logits_process as lp
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (16, 300)).astype(np.float32)
  for t, k, p in [(0.9, 50, 1.0), (1.0, 0, 0.7), (0.5, 20, 0.9)]:
    x = torch.tensor(logits)
    x = lp.TemperatureLogitsWarper(t)(None, x)
    if k:
      x = lp.TopKLogitsWarper(k)(None, x)
    if p < 1:
      x = lp.TopPLogitsWarper(p)(None, x)
    ours = np.asarray(sampling.filter_logits(jnp.asarray(logits), sampling.SamplingParams(temperature=t, top_k=k,
                                                                                         top_p=p)))
    assert (np.isinf(ours) == np.isinf(x.numpy())).all()
    # One fp32 division by the temperature on each side (a multiply by 1/t may differ by an ulp).
    np.testing.assert_allclose(ours[~np.isinf(ours)], x.numpy()[~np.isinf(ours)], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  cfg = tiny_config()
  params = model_lib.unbox(model_lib.init_params(cfg, rng=jax.random.PRNGKey(7)))
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)   # livelier than init's 0.02
  processor = Processor.tiny(cfg=cfg)
  tmp = tmp_path_factory.mktemp("imgs")
  return cfg, params, processor, _records(_images(tmp, SIZES[:4], seed=1))


def test_one_prefill_per_prompt_and_shared_prefix_equals_copies(tiny, monkeypatch):
  cfg, params, processor, records = tiny
  seen = {"vision_rows": 0, "prefill_rows": 0, "prefill_calls": 0, "decode_rows": []}

  def count(kind, n):
    if kind == "decode":
      seen["decode_rows"].append(int(n))
    else:
      seen[kind] += int(n)

  orig_embed, orig_decode = model_lib.Qwen25VL.embed, model_lib.Qwen25VL.decode

  def embed(self, input_ids, images=None):
    if images is not None:
      jax.debug.callback(count, "vision_rows", images["pixel_values"].shape[0])
    return orig_embed(self, input_ids, images)

  def decode(self, h, positions, **kw):
    if h.shape[1] > 1:
      jax.debug.callback(count, "prefill_rows", h.shape[0])
      jax.debug.callback(count, "prefill_calls", 1)
    else:
      jax.debug.callback(count, "decode", h.shape[0])
    return orig_decode(self, h, positions, **kw)

  monkeypatch.setattr(model_lib.Qwen25VL, "embed", embed)
  monkeypatch.setattr(model_lib.Qwen25VL, "decode", decode)
  b = _batch(processor, records)
  B, K, T = len(records), 4, 6
  keys = sampling.sample_keys(5, b.ids, K)
  sp = sampling.SamplingParams(max_new_tokens=T, num_samples=K, temperature=1.0, top_k=50, pad_id=400)
  shared, shared_len, _ = sampling.Sampler(cfg).generate(params, b.arrays, keys, sp)
  jax.effects_barrier()
  assert seen["prefill_calls"] == 1 and seen["prefill_rows"] == B and seen["vision_rows"] == B
  assert seen["decode_rows"] == [B * K] * (T - 1)

  # The same K samples from K independent copies of each prompt, run with the same keys.
  copies = [r for r in records for _ in range(K)]
  bc = _batch(processor, copies)
  sp1 = sampling.SamplingParams(max_new_tokens=T, num_samples=1, temperature=1.0, top_k=50, pad_id=400)
  indep, indep_len, _ = sampling.Sampler(cfg).generate(params, bc.arrays, keys.reshape(B * K, 1, 2), sp1)
  np.testing.assert_array_equal(np.asarray(shared).reshape(B * K, T), np.asarray(indep)[:, 0])
  # Samples of one prompt differ from each other (the keys really are per sample).
  assert len({tuple(x) for x in np.asarray(shared)[0]}) > 1


def test_eos_stops_rows_and_loop_exits_early(tiny):
  cfg, params, processor, records = tiny
  b = _batch(processor, records)
  keys = sampling.sample_keys(0, b.ids, 2)
  everything = tuple(range(cfg.text.vocab_size))
  sp = sampling.SamplingParams(max_new_tokens=16, num_samples=2, temperature=1.0, eos_ids=everything, pad_id=400)
  tok, lengths, steps = sampling.Sampler(cfg).generate(params, b.arrays, keys, sp)
  assert int(steps) == 1 and (np.asarray(lengths) == 1).all()
  assert (np.asarray(tok)[..., 1:] == 400).all()
  assert sampling.completions(tok, lengths, everything) == [[[], []]] * len(records)


def test_sampling_is_deterministic_and_seeded(tiny):
  cfg, params, processor, records = tiny
  b = _batch(processor, records)
  sp = sampling.SamplingParams(max_new_tokens=5, num_samples=3, temperature=0.9, top_k=50, pad_id=400)
  s = sampling.Sampler(cfg)
  a1 = np.asarray(s.generate(params, b.arrays, sampling.sample_keys(1, b.ids, 3), sp)[0])
  a2 = np.asarray(s.generate(params, b.arrays, sampling.sample_keys(1, b.ids, 3), sp)[0])
  a3 = np.asarray(s.generate(params, b.arrays, sampling.sample_keys(2, b.ids, 3), sp)[0])
  np.testing.assert_array_equal(a1, a2)
  assert (a1 != a3).any()
  # A record's samples do not depend on its batch: the same record alone gives the same answers.
  b0 = _batch(processor, records[2:3])
  alone = np.asarray(s.generate(params, b0.arrays, sampling.sample_keys(1, b0.ids, 3), sp)[0])
  np.testing.assert_array_equal(alone[0], a1[2])


def test_remat_samples_the_same(tiny):
  """With remat the scanned layers see a traced cache index: the prefill (a RightPadding mask over a
  cache of the prompt's length) must take it, and sample what the plain model samples."""
  cfg, params, processor, records = tiny
  b = _batch(processor, records)
  sp = sampling.SamplingParams(max_new_tokens=4, num_samples=2, temperature=0.9, top_k=50, pad_id=400)
  keys = sampling.sample_keys(3, b.ids, 2)
  plain = np.asarray(sampling.Sampler(cfg).generate(params, b.arrays, keys, sp)[0])
  remat = np.asarray(sampling.Sampler(cfg, model_lib.ModelOptions(remat=True)).generate(params, b.arrays, keys, sp)[0])
  np.testing.assert_array_equal(remat, plain)


def test_sharded_sampler_equals_single_device(tiny):
  cfg, params, processor, records = tiny
  b = _batch(processor, records)
  sp = sampling.SamplingParams(max_new_tokens=6, num_samples=2, temperature=1.0, top_k=20, pad_id=400)
  keys = sampling.sample_keys(0, b.ids, 2)
  single = np.asarray(sampling.Sampler(cfg).generate(params, b.arrays, keys, sp)[0])
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with mesh_lib.use(mesh):
    sharded_params = jax.device_put(params, mesh_lib.param_shardings(
        model_lib.init_params(cfg, abstract=True), mesh))
    arrays = batching.to_global(dict(b.arrays, keys=keys), mesh)
    tok = sampling.Sampler(cfg).generate(sharded_params, arrays, arrays.pop("keys"), sp)[0]
    assert len(tok.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(tok), single)


def test_generate_cli(tiny, tmp_path):
  cfg, params, processor, records = tiny
  model_dir = str(tmp_path / "model")
  save_tiny_processor(model_dir)
  checkpoint.save_model(model_dir, params, cfg)
  hf_dir = str(tmp_path / "hf")
  hf.save_hf(params, cfg, hf_dir, source_dir=model_dir)
  image = records[1].image
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  outs = []
  for d in (model_dir, hf_dir):
    cmd = [sys.executable, "-m", "dcsft_jax.generate", f"--model={d}", f"--image={image}",
           f"--prompt={records[1].prompt}", "--max_new_tokens=5", "--num_samples=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
  assert outs[0] == outs[1]
  out = outs[0]
  assert set(out) == {"texts", "token_ids"} and len(out["texts"]) == 2
  # Greedy: both samples are the argmax path, equal to the in-process sampler's answer.
  assert out["token_ids"][0] == out["token_ids"][1]
  b = _batch(processor, records[1:2])
  sp = sampling.SamplingParams(max_new_tokens=5, eos_ids=sampling.stop_ids(model_dir, processor), pad_id=400)
  tok, ln, _ = sampling.Sampler(cfg).generate(params, b.arrays, sampling.sample_keys(0, b.ids, 1), sp)
  assert out["token_ids"][0] == sampling.completions(tok, ln, sp.eos_ids)[0][0]
  assert out["texts"][0] == processor.decode(out["token_ids"][0])
  # A missing directory is named.
  p = subprocess.run([sys.executable, "-m", "dcsft_jax.generate", "--model=/nonexistent", "--prompt=hi"],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert p.returncode != 0 and "/nonexistent" in p.stderr


def test_kth_largest_equals_top_k_threshold():
  """The sort-free top-k threshold equals lax.top_k's k-th value, ties and -inf included."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 300)).astype(np.float32) * 5
  x[1, :40] = 2.5                      # a tie that straddles k
  x[2] = np.round(x[2])                # many ties
  x[3, 10:] = -np.inf                  # fewer finite values than k
  x[4] = -np.abs(x[4])                 # all negative
  x[5, :] = 0.0
  x[5, :3] = -0.0
  for k in (1, 7, 50, 299, 300):
    want = np.asarray(jax.lax.top_k(jnp.asarray(x), k)[0][:, -1])
    got = np.asarray(jax.jit(lambda v: sampling.kth_largest(v, k))(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)


def test_sampling_only_models_in_the_compute_dtype_sample_the_same(hf_dir, tmp_path):
  """model.frozen_in_compute_dtype: scoring and evaluation load every weight in the compute dtype
  (run_config.sampling_options, through common.load_model(sampling_only=True)). Every layer casts
  its weights to the compute dtype before use, so in a bf16 run the samples and their log-probs are
  bit-identical to the fp32-weight model's, from half the weight bytes."""
  from types import SimpleNamespace
  from dcsft_jax import config_base, run_config
  from dcsft_jax.stages import common
  from dcsft_jax.workdir import Workdir
  config = config_base.base()
  config.model.dtype = "bfloat16"
  ctx = SimpleNamespace(wd=Workdir(str(tmp_path / "wd")), mesh=mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]),
                        model_options=run_config.model_options(config))
  loaded = {}
  for flag in (False, True):
    config.model.frozen_in_compute_dtype = flag
    loaded[flag] = common.load_model(config, ctx, hf_dir, sampling_only=True)
  dtypes = {flag: {x.dtype for x in jax.tree.leaves(m.params)} for flag, m in loaded.items()}
  assert dtypes == {False: {jnp.dtype(jnp.float32)}, True: {jnp.dtype(jnp.bfloat16)}}
  nbytes = {flag: sum(x.nbytes for x in jax.tree.leaves(m.params)) for flag, m in loaded.items()}
  assert nbytes[True] * 2 == nbytes[False]
  # Training loads keep param_dtype whatever the flag says (master weights).
  assert {x.dtype for x in jax.tree.leaves(common.load_model(config, ctx, hf_dir).params)} == {jnp.dtype(jnp.float32)}

  records = _records(_images(tmp_path))
  b = _batch(loaded[True].processor, records)
  sp = sampling.SamplingParams(max_new_tokens=6, num_samples=2, temperature=0.9, top_k=50, pad_id=400)
  keys = sampling.sample_keys(0, b.ids, 2)
  out = {flag: [np.asarray(x) for x in sampling.Sampler(m.cfg, m.opts).generate(m.params, b.arrays, keys, sp)]
         for flag, m in loaded.items()}
  for a, c in zip(out[False], out[True]):
    np.testing.assert_array_equal(a, c)
