"""Qwen3-VL through the project's tools and stages (issue 26): the processor is bit-identical to
transformers' (PIL backend), the sampler's greedy answers are transformers' generate token for token,
the SFT loss and every gradient match, the HF round trip is bit-identical and transformers generates from
the export as from the source, the generate CLI reads a Qwen3-VL directory, and the tiny Qwen3-VL default
pipeline reaches report.md. (Model-level parity: test_qwen3_vl_model.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from PIL import Image

import qwen3_reference as Q3
from dcsft_jax import checkpoint, hf, sampling
from dcsft_jax.data import batching
from dcsft_jax.data import tokenizer as T
from dcsft_jax.data.processor import Processor
from dcsft_jax.data.records import Record
from dcsft_jax.models import qwen3_vl as Q
from dcsft_jax.models.qwen3_vl import rope
from dcsft_jax.models.qwen3_vl.config import tiny_config
from dcsft_jax.train import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = tiny_config().pad_token_id
# (w, h): below the tiny floor (64 x 64 px), fixed points of smart_resize, rounded, wide and tall.
SIZES = [(32, 32), (64, 96), (96, 64), (128, 128), (70, 45), (32, 160), (160, 64), (100, 100)]


class HFProcessor(transformers.Qwen3VLProcessor):
  """QWEN3VL.md §7.14: without torchvision the video processor cannot load, so leave it out."""

  @classmethod
  def get_attributes(cls):
    return ["image_processor", "tokenizer"]


def _images(tmp_path, sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  paths = []
  for i, (w, h) in enumerate(sizes):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[..., 0] = a[..., 0] // 4 + np.linspace(0, 190, w).astype(np.uint8)[None, :]
    p = str(tmp_path / f"img{i}.png")
    Image.fromarray(a).save(p)
    paths.append(p)
  return paths


def _records(paths):
  qs = ["what is it?", "name the object.", "one word please", "which digit", "say it", "what", "label?", "go"]
  return [Record(f"r{i}", p, qs[i % len(qs)], "seven", "classification") for i, p in enumerate(paths)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """The tiny Qwen3-VL default, every parameter random, written by transformers with the tiny processor
  files (lm_head scaled up so greedy margins are far above float noise)."""
  cfg = tiny_config()
  model = Q3.random_hf_model(cfg, seed=3)
  with torch.no_grad():
    model.lm_head.weight.mul_(4.0)
  d = str(tmp_path_factory.mktemp("hf_qwen3"))
  model.save_pretrained(d)
  T.save_tiny_processor(d, family=Q.FAMILY)
  return d


@pytest.fixture(scope="module")
def loaded(hf_dir):
  cfg, params, _ = checkpoint.load_any(hf_dir)
  return cfg, params, Processor.from_pretrained(hf_dir, cfg=cfg)


def test_processor_outputs_are_bit_identical_to_transformers(hf_dir, loaded, tmp_path):
  cfg, _, ours = loaded
  theirs = HFProcessor.from_pretrained(hf_dir)
  assert type(theirs.image_processor).__name__ == "Qwen2VLImageProcessorPil"
  hf_model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(hf_dir).model
  for path, (w, h) in zip(_images(tmp_path), SIZES):
    for answer in (None, "seven"):
      ex = ours.encode(path, "what is it?", answer)
      msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
      if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
      text = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)
      assert not text.startswith("<|im_start|>system")          # Qwen3-VL's template: no default turn
      out = theirs(text=[text], images=[Image.open(path)], return_tensors="pt")
      what = f"{w}x{h} answer={answer}"
      assert ex["input_ids"].tolist() == out["input_ids"][0].tolist(), what
      assert ex["mm_token_type_ids"].tolist() == out["mm_token_type_ids"][0].tolist(), what
      assert ex["image_grid_thw"].tolist() == out["image_grid_thw"].tolist(), what
      assert ex["pixel_values"].dtype == np.float32
      np.testing.assert_array_equal(ex["pixel_values"], out["pixel_values"].numpy(), err_msg=what)
      pos, delta = hf_model.get_rope_index(out["input_ids"], out["mm_token_type_ids"], out["image_grid_thw"],
                                           attention_mask=out["attention_mask"])
      np.testing.assert_array_equal(ex["positions"], pos[:, 0].numpy(), err_msg=what)
      assert int(ex["rope_delta"]) == int(delta.reshape(-1)[0]), what


def _batch(processor, records):
  buckets = batching.auto_buckets(records, processor, with_answers=False, max_buckets=1)
  it = batching.BatchIterator(records, processor, batch_size=len(records), buckets=buckets, with_answers=False,
                              shuffle=False)
  b = next(iter(it))
  it.close()
  return b


def _hf_generate(model, processor, records, eos, max_new):
  """transformers' greedy generate on a left-padded batch, mm_token_type_ids given (QWEN3VL.md §7.9)."""
  exs = [processor.encode(r.image, r.prompt) for r in records]
  L = max(len(e["input_ids"]) for e in exs)
  ids = np.full((len(exs), L), PAD, np.int64)
  mask = np.zeros((len(exs), L), np.int64)
  for i, e in enumerate(exs):
    n = len(e["input_ids"])
    ids[i, L - n:], mask[i, L - n:] = e["input_ids"], 1
  pv = np.concatenate([e["pixel_values"] for e in exs])
  grid = np.concatenate([e["image_grid_thw"] for e in exs])
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         mm_token_type_ids=torch.tensor(rope.mm_token_types(ids, processor.cfg)),
                         pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid), do_sample=False,
                         max_new_tokens=max_new, eos_token_id=list(eos), pad_token_id=PAD, repetition_penalty=1.0,
                         temperature=None, top_k=None, top_p=None, output_scores=True, return_dict_in_generate=True)
  return out.sequences[:, L:].numpy(), torch.stack(out.scores, 1).numpy()


def _check_same_tokens(ours, lengths, theirs, scores):
  top2 = np.sort(scores, axis=-1)[..., -2:]
  live = np.arange(theirs.shape[1])[None] < lengths[:, None]
  assert (top2[..., 1] - top2[..., 0])[live].min() > 1e-3        # margins far above float noise
  for r in range(len(ours)):
    n = lengths[r]
    assert ours[r, :n].tolist() == theirs[r, :n].tolist(), f"row {r}"


def test_greedy_sampler_matches_transformers_generate(hf_dir, loaded, tmp_path):
  cfg, params, processor = loaded
  records = _records(_images(tmp_path))
  b = _batch(processor, records)
  assert len(set(b.arrays["lengths"].tolist())) > 3            # really different image sizes in one batch
  sampler = sampling.Sampler(cfg)
  T_ = 10
  keys = sampling.sample_keys(0, b.ids, 1)
  tok, _, _ = sampler.generate(params, b.arrays, keys, sampling.SamplingParams(max_new_tokens=T_, pad_id=PAD))
  tok = np.asarray(tok)[:, 0]
  # An end id that some rows produce midway and others never: per-row stopping is compared too.
  counts = [(int((tok[:, 1:T_ - 2] == v).any(1).sum()), int(v)) for v in np.unique(tok[:, 1:T_ - 2])]
  eos = max(v for c, v in counts if c == max(c for c, _ in counts if c < len(tok)))
  ours, lengths, _ = sampler.generate(params, b.arrays, keys,
                                      sampling.SamplingParams(max_new_tokens=T_, eos_ids=(eos,), pad_id=PAD))
  ours, lengths = np.asarray(ours)[:, 0], np.asarray(lengths)[:, 0]
  assert (lengths < T_).any()
  model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").eval()
  _check_same_tokens(ours, lengths, *_hf_generate(model, processor, records, (eos,), T_))


def test_sft_loss_and_gradients_match_transformers(hf_dir, loaded):
  cfg, params, _ = loaded
  b = Q3.make_batch(cfg, [[5, (1, 6, 10), 9], [3, (1, 14, 4), 12, (1, 4, 4), 2]], seed=1)
  ids, pos, images, am, _ = b.ours(cfg, num_images=3)
  # One image per batch row in dcsft_jax's batches; the model itself takes any number of image rows.
  rng = np.random.default_rng(1)
  loss_mask = (am * (rng.random(am.shape) < 0.6)).astype(np.int32)
  arrays = {"input_ids": ids, "positions": pos, "attention_mask": am, "loss_mask": loss_mask,
            "valid": np.ones(len(ids), bool), **images}
  hf_model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager")
  hf_model.zero_grad()
  out = hf_model(**b.hf_kwargs(cfg), labels=torch.tensor(np.where(loss_mask > 0, b.input_ids, -100)))
  out.loss.backward()
  theirs = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}
  model = Q.FAMILY.model(cfg)

  def mean_loss(p):
    s, n = sft.sft_loss(model, p, arrays, jax.random.key(0))
    return s / n

  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
  assert abs(float(loss) - out.loss.item()) <= 1e-5 * abs(out.loss.item())
  ours = dict(hf.hf_tensors(grads, cfg, np.float32))
  assert set(ours) == set(theirs)
  worst = 0.0
  for name, g in theirs.items():
    scale = np.abs(g).max()
    assert scale > 0, name
    worst = max(worst, np.abs(ours[name] - g).max() / scale)
  assert worst <= 1e-4, worst


def _tensors(d):
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith(".safetensors"):
      out.update(safetensors.numpy.load_file(os.path.join(d, f)))
  return out


def test_round_trip_is_bit_identical_and_transformers_generates_from_the_export(hf_dir, loaded, tmp_path):
  cfg, params, processor = loaded
  out = str(tmp_path / "export")
  hf.save_hf(params, cfg, out, source_dir=hf_dir, dtype="float32")
  a, b = _tensors(hf_dir), _tensors(out)
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["Qwen3VLForConditionalGeneration"]
  for f in ("generation_config.json", "preprocessor_config.json", "chat_template.json", "tokenizer.json"):
    assert open(os.path.join(out, f)).read() == open(os.path.join(hf_dir, f)).read(), f
  records = _records(_images(tmp_path, SIZES[:3]))
  gens = []
  for d in (hf_dir, out):
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    gens.append(_hf_generate(model, processor, records, (cfg.eos_token_id,), 6)[0])
  np.testing.assert_array_equal(gens[0], gens[1])
  # ...and through an Orbax model directory and back (the convert CLI's two directions).
  orbax = str(tmp_path / "orbax")
  checkpoint.save_model(orbax, params, cfg, source_dir=hf_dir)
  cfg2, params2, _ = checkpoint.load_model(orbax)
  assert cfg2 == cfg
  back = str(tmp_path / "back")
  hf.save_hf(params2, cfg2, back, source_dir=orbax, dtype="float32")
  c = _tensors(back)
  assert all(np.array_equal(a[k], c[k]) for k in a)


def test_generate_cli_reads_a_qwen3_vl_directory(hf_dir, loaded, tmp_path):
  cfg, _, processor = loaded
  image = _images(tmp_path, SIZES[1:2])[0]
  r = subprocess.run([sys.executable, "-m", "dcsft_jax.generate", f"--model={hf_dir}", f"--image={image}",
                      "--prompt=what is it?", "--max_new_tokens=5"], capture_output=True, text=True, cwd=ROOT,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").eval()
  stops = sampling.stop_ids(hf_dir, processor)
  theirs, _ = _hf_generate(model, processor, [Record("x", image, "what is it?", "-", "classification")], stops, 5)
  want = [t for t in theirs[0].tolist() if t != PAD]
  want = want[:next((i for i, t in enumerate(want) if t in stops), len(want))]
  assert got["token_ids"][0] == want
