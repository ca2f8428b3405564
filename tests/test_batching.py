"""Static-shape batching: few compiled shapes, padding that changes nothing, per-host rows,
bad records named (or skipped and counted), and exact resume."""
import collections

import jax
import numpy as np
import pytest
from PIL import Image

from dcsft_jax.data import batching
from dcsft_jax.data.processor import Processor
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl.config import tiny_config

Rec = collections.namedtuple("Rec", "id image prompt answer task")
PROMPT = "Please provide the object name in the image. Output the answer using one word."


@pytest.fixture(scope="module")
def processor():
  return Processor.tiny(cfg=tiny_config(), max_pixels=64 * 28 * 28)


def _images(tmp_path, sizes, seed=0, prefix="img"):
  rng = np.random.default_rng(seed)
  paths = []
  for i, (w, h) in enumerate(sizes):
    p = tmp_path / f"{prefix}{i}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    paths.append(str(p))
  return paths


def _records(paths, answers=("seven", "three", "nine", "one")):
  return [Rec(f"r{i}", p, PROMPT, answers[i % len(answers)], "classification") for i, p in enumerate(paths)]


BUCKETS = batching.make_buckets([16, 64, 256], text_tokens=80)


def test_imagenet_like_sizes_compile_few_shapes(tmp_path):
  """A synthetic ImageNet-like spread of sizes (at max_pixels=802816) lands in <= #buckets shapes."""
  rng = np.random.default_rng(1)
  sizes = [(int(w), int(h)) for w, h in zip(rng.integers(150, 1200, 300), rng.integers(150, 1000, 300))]
  # Headers only are read when planning, so tiny files with the right sizes stand in for photos.
  paths = []
  for i, (w, h) in enumerate(sizes):
    p = tmp_path / f"s{i}.png"
    Image.new("RGB", (w, h)).save(p)
    paths.append(str(p))
  proc = Processor.tiny(cfg=tiny_config(), max_pixels=802816)
  buckets = batching.make_buckets([256, 576, 1024, 2048, 4096], text_tokens=96)
  it = batching.BatchIterator(_records(paths), proc, batch_size=16, buckets=buckets, shuffle=True)
  plan = it.plan(0)
  assert sum((rows >= 0).sum() for _, rows in plan) == len(sizes)  # nothing lost
  used = {b for b, _ in plan}
  assert 2 <= len(used) <= len(buckets)
  it.close()


def test_batches_have_static_shapes_and_padding_changes_nothing(tmp_path, processor):
  paths = _images(tmp_path, [(56, 56), (90, 40), (40, 120), (200, 150), (70, 70)])
  recs = _records(paths)
  it = batching.BatchIterator(recs, processor, batch_size=4, buckets=BUCKETS, shuffle=False, num_workers=2)
  batches = list(it)
  shapes = {tuple((k, v.shape) for k, v in sorted(b.arrays.items())) for b in batches}
  assert len(shapes) <= len(BUCKETS)
  assert sum(b.arrays["valid"].sum() for b in batches) == len(recs)
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
  fwd = jax.jit(lambda p, *a: M.Qwen25VL(cfg).apply({"params": p}, *a))
  for b in batches:
    logits = np.asarray(fwd(params, *batching.model_inputs(b.arrays)))
    for r, rid in enumerate(b.ids):
      if rid is None:
        continue
      rec = recs[int(rid[1:])]
      ex = processor.encode(rec.image, rec.prompt, rec.answer)
      n = len(ex["input_ids"])
      assert (b.arrays["input_ids"][r, :n] == ex["input_ids"]).all()
      assert (b.arrays["loss_mask"][r, :n] == ex["loss_mask"]).all() and b.arrays["loss_mask"][r, n:].sum() == 0
      grid = tuple(ex["image_grid_thw"][0])
      from dcsft_jax.models.qwen2_5_vl import rope
      alone = fwd(params, ex["input_ids"][None], ex["positions"][:, None],
                  {"pixel_values": ex["pixel_values"][None], **rope.vision_layout([grid], cfg.vision)},
                  np.ones((1, n), np.int32))
      alone = np.asarray(alone)[0]
      assert np.abs(logits[r, :n] - alone).max() <= 1e-5 * np.abs(alone).max()
  it.close()


def test_exact_resume_mid_epoch_and_across_epochs(tmp_path, processor):
  paths = _images(tmp_path, [(56 + 7 * i, 56 + 3 * (i % 5)) for i in range(22)])
  make = lambda: batching.BatchIterator(_records(paths), processor, batch_size=3, buckets=BUCKETS, seed=5,
                                        epochs=2, num_workers=3, prefetch=3)
  full = [(b.epoch, b.index, b.ids, b.arrays) for b in make()]
  assert full[0][0] == 0 and full[-1][0] == 1
  for stop in (2, len(full) // 2 + 1):
    it = make()
    seen = []
    for b in it:
      seen.append(b)
      if len(seen) == stop:
        break
    state = it.state()
    resumed = make()
    resumed.restore(state)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(full)
    for (e, k, ids, arrays), b in zip(full[stop:], rest):
      assert (e, k, ids) == (b.epoch, b.index, b.ids)
      for key in arrays:
        np.testing.assert_array_equal(arrays[key], b.arrays[key])
  it = make()
  with pytest.raises(ValueError, match="another dataset or seed"):
    it.restore({"epoch": 0, "batch": 1, "seed": 6, "records": 22})


def test_hosts_split_each_global_batch(tmp_path, processor):
  paths = _images(tmp_path, [(56, 56)] * 9)
  one = list(batching.BatchIterator(_records(paths), processor, batch_size=4, buckets=BUCKETS, seed=3))
  hosts = [list(batching.BatchIterator(_records(paths), processor, batch_size=4, buckets=BUCKETS, seed=3,
                                       process_index=h, process_count=2)) for h in (0, 1)]
  assert len(one) == len(hosts[0]) == len(hosts[1]) == 3
  for g, h0, h1 in zip(one, *hosts):
    assert g.ids == h0.ids + h1.ids
    np.testing.assert_array_equal(g.arrays["input_ids"], np.concatenate([h0.arrays["input_ids"],
                                                                         h1.arrays["input_ids"]]))
  with pytest.raises(ValueError, match="not divisible"):
    batching.BatchIterator(_records(paths), processor, batch_size=3, buckets=BUCKETS, process_count=2)


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, processor):
  good = _images(tmp_path, [(56, 56)] * 4)
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(open(good[0], "rb").read()[:200])  # header intact, pixels truncated
  cases = {
      "missing": (Rec("missing", str(tmp_path / "nope.jpg"), PROMPT, "one", "classification"), "not found"),
      "corrupt": (Rec("corrupt", str(corrupt), PROMPT, "one", "classification"), "corrupt.png"),
      "empty": (Rec("empty", good[0], PROMPT, "  ", "classification"), "answer is empty"),
      "huge": (Rec("huge", good[0], PROMPT + " word" * 200, "one", "classification"), "largest bucket"),
      "aspect": (Rec("aspect", _images(tmp_path, [(1000, 4)], 1, "wide")[0], PROMPT, "one", "classification"), "aspect"),
  }
  # An image whose resized size still exceeds what the configured buckets hold.
  cases["big_image"] = (Rec("big_image", _images(tmp_path, [(400, 300)], 2, "big")[0], PROMPT, "one",
                            "classification"), "216 patches .* largest bucket \\(64 patches")
  small_buckets = batching.make_buckets([16, 64], text_tokens=80)
  for name, (bad, reason) in cases.items():
    recs = _records(good) + [bad]
    buckets = small_buckets if name == "big_image" else BUCKETS
    with pytest.raises(batching.BadRecord, match=f"record 4 \\(id '{name}'\\): .*{reason}"):
      list(batching.BatchIterator(recs, processor, batch_size=2, buckets=buckets, shuffle=False))
    it = batching.BatchIterator(recs, processor, batch_size=2, buckets=buckets, shuffle=False,
                                skip_bad_records=True)
    batches = list(it)
    assert [s.record for s in it.skipped] == [name]
    assert sum(b.arrays["valid"].sum() for b in batches) == len(good)


def test_default_dataset_epoch_compiles_at_most_the_bucket_count():
  """An epoch of the embedded default dataset, through the real processor, in few static shapes."""
  from dcsft_jax.data import builtin
  recs = builtin.load_builtin("train", limit=96) + builtin.load_builtin("rendition", limit=32)
  proc = Processor.tiny(cfg=tiny_config())
  buckets = batching.make_buckets([16, 64], text_tokens=80)
  it = batching.BatchIterator(recs, proc, batch_size=8, buckets=buckets, seed=0)
  shapes = set()
  n = 0
  for b in it:
    shapes.add(tuple(sorted((k, v.shape) for k, v in b.arrays.items())))
    n += int(b.arrays["valid"].sum())
  assert n == len(recs) and not it.skipped
  assert 1 <= len(shapes) <= len(buckets)
