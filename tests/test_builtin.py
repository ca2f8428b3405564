"""dcsft_jax.data.builtin: the embedded digits dataset (ID train/test, OOD rendition/adversarial)."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import RidgeClassifier

from dcsft_jax.data import builtin as B

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def splits():
  return {s: B.load_builtin(s) for s in B.SPLITS}


def _pixels(records):
  return np.stack([np.asarray(r.image) for r in records])


def _labels(records):
  return np.array([B.DIGIT_NAMES.index(r.answer) for r in records])


def _digest(records):
  """A hash of everything a record holds; the subprocess below imports this same function."""
  h = hashlib.sha256()
  for r in records:
    h.update(f"{r.id}|{r.prompt}|{r.answer}|{r.task}|{sorted(r.meta.items())}".encode())
    h.update(np.asarray(r.image).tobytes())
  return h.hexdigest()


def test_constants():
  assert B.PROMPT == "Please provide the object name in the image. Output the answer using one word."
  assert B.DIGIT_NAMES == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
  assert B.SPLITS == ("train", "test", "rendition", "adversarial")


@pytest.mark.parametrize("split", B.SPLITS)
def test_record_fields(splits, split):
  recs = splits[split]
  assert len(recs) > 300
  ids = [r.id for r in recs]
  assert len(set(ids)) == len(ids)
  for r in recs:
    assert r.id.startswith(f"digits-{split}-") and len(r.id) == len(f"digits-{split}-00000")
    assert isinstance(r.image, Image.Image) and r.image.mode == "RGB" and r.image.size == (56, 56)
    assert r.prompt == B.PROMPT
    assert r.answer in B.DIGIT_NAMES and " " not in r.answer
    assert r.task == "classification"
    assert r.meta["split"] == split and r.meta["noisy"] is False
    assert B.DIGIT_NAMES[r.meta["label"]] == r.answer
  assert set(_labels(recs)) == set(range(10))


@pytest.mark.parametrize("split", B.SPLITS)
def test_deterministic(splits, split):
  again = B.load_builtin(split)
  assert [r.id for r in again] == [r.id for r in splits[split]]
  assert [r.answer for r in again] == [r.answer for r in splits[split]]
  np.testing.assert_array_equal(_pixels(again), _pixels(splits[split]))
  # limit is a prefix of the full split, not a different draw.
  assert _digest(B.load_builtin(split, limit=7)) == _digest(splits[split][:7])


def test_deterministic_across_processes():
  code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
          "from test_builtin import _digest\nfrom dcsft_jax.data import builtin as B\n"
          "print(_digest(sum((B.load_builtin(s, seed=3, limit=15, image_size=32) for s in B.SPLITS), [])))\n")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONHASHSEED="123")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, capture_output=True, text=True)
  here = _digest(sum((B.load_builtin(s, seed=3, limit=15, image_size=32) for s in B.SPLITS), []))
  assert out.stdout.strip() == here


def test_seed_changes_split_and_augmentations(splits):
  other = {s: B.load_builtin(s, seed=1, limit=50) for s in ("train", "rendition", "adversarial")}
  assert [r.id for r in other["train"]] != [r.id for r in splits["train"][:50]]
  for s in ("rendition", "adversarial"):
    assert not np.array_equal(_pixels(other[s]), _pixels(splits[s][:50]))


def test_train_test_disjoint_and_stratified(splits):
  train = {r.meta["source_index"] for r in splits["train"]}
  test = {r.meta["source_index"] for r in splits["test"]}
  assert not train & test
  assert len(train) + len(test) == 1797
  ytr, yte = _labels(splits["train"]), _labels(splits["test"])
  for c in range(10):
    frac = (yte == c).sum() / ((yte == c).sum() + (ytr == c).sum())
    assert abs(frac - B.TEST_FRACTION) < 0.02
  # The adversarial set is built from ID *test* digits only: nothing the model trained on.
  adv = {r.meta["source_index"] for r in splits["adversarial"]}
  assert adv == test


def test_image_size():
  for s in B.SPLITS:
    for r in B.load_builtin(s, image_size=28, limit=5):
      assert r.image.mode == "RGB" and r.image.size == (28, 28)


def test_ood_pixel_statistics_differ(splits):
  def stats(recs):
    px = _pixels(recs).astype(np.float64)
    chroma = np.abs(px - px.mean(axis=-1, keepdims=True)).mean()  # ID digits are pure gray
    return px.mean(), chroma, np.abs(np.diff(px, axis=2)).mean()  # brightness, colour, edge energy
  id_mean, id_chroma, id_edges = stats(splits["test"])
  r_mean, r_chroma, _ = stats(splits["rendition"])
  a_mean, _, a_edges = stats(splits["adversarial"])
  assert id_chroma == 0 and r_chroma > 10
  assert a_edges > 1.4 * id_edges   # noise, the occluder and rotated strokes: more edge energy


def test_label_noise():
  clean = B.load_builtin("train")
  noisy = B.load_builtin("train", label_noise=0.1)
  n = len(clean)
  flipped = [(c, z) for c, z in zip(clean, noisy) if c.answer != z.answer]
  assert len(flipped) == round(0.1 * n)
  assert sum(z.meta["noisy"] for z in noisy) == round(0.1 * n)
  for c, z in zip(clean, noisy):
    assert c.id == z.id
    np.testing.assert_array_equal(np.asarray(c.image), np.asarray(z.image))
    if z.meta["noisy"]:
      assert z.answer != c.answer and z.answer in B.DIGIT_NAMES
      assert z.meta["true_label"] == c.meta["label"] and B.DIGIT_NAMES[z.meta["label"]] == z.answer
    else:
      assert z.answer == c.answer
  # Seeded: the same rate and seed flip the same records to the same labels.
  assert [r.answer for r in B.load_builtin("train", label_noise=0.1)] == [r.answer for r in noisy]
  # With limit the count is exact for what is returned.
  assert sum(r.meta["noisy"] for r in B.load_builtin("train", label_noise=0.25, limit=33)) == round(0.25 * 33)


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown builtin split"):
    B.load_builtin("val")
  with pytest.raises(ValueError, match="train"):
    B.load_builtin("test", label_noise=0.1)
  with pytest.raises(ValueError):
    B.load_builtin("train", label_noise=1.5)


def test_ood_shift_is_real(splits):
  """A pixel classifier fit on ID train does well on ID test and clearly worse on each OOD set."""
  def feats(recs):
    return np.stack([np.asarray(r.image.convert("L").resize((8, 8), Image.Resampling.BILINEAR),
                                dtype=np.float64).ravel() / 255 for r in recs])
  # A linear (ridge) classifier on 8x8 gray pixels: closed-form, so fast and deterministic.
  clf = RidgeClassifier(alpha=1.0).fit(feats(splits["train"]), _labels(splits["train"]))
  acc = {s: float((clf.predict(feats(splits[s])) == _labels(splits[s])).mean()) for s in B.SPLITS[1:]}
  assert acc["test"] > 0.85, acc
  assert acc["rendition"] < acc["test"] - 0.1, acc
  assert acc["adversarial"] < acc["test"] - 0.1, acc


def test_synthetic_records_have_imagenet_like_sizes_and_are_deterministic():
  import io
  from PIL import Image
  from dcsft_jax.data import sources
  a = sources.load("synthetic:40:rendition", seed=3)
  b = sources.load("synthetic:40:rendition", seed=3)
  assert len(a) == 40 and [r.id for r in a] == [r.id for r in b] and all(x.image == y.image for x, y in zip(a, b))
  sizes = [Image.open(io.BytesIO(r.image)).size for r in a]
  assert all(250 <= w <= 500 and 250 <= h <= 500 for w, h in sizes) and len(set(sizes)) > 30
  assert {r.answer for r in a} <= set(B.DIGIT_NAMES) and a[0].id == "synthetic-rendition-000000"
  head, tail = sources.load("synthetic:40[:10]"), sources.load("synthetic:40[10:]")
  assert len(head) == 10 and len(tail) == 30 and not {r.id for r in head} & {r.id for r in tail}
  with pytest.raises(ValueError, match="synthetic:N"):
    sources.parse("synthetic:many")
