"""An embedded default dataset that needs no download: ImageNet (ID) -> ImageNet-R / ImageNet-A (OOD) in miniature.

The paper trains on ImageNet and reports out-of-distribution accuracy on ImageNet-R (renditions) and
ImageNet-A (natural adversarial examples). This module mirrors that setup with data that ships inside
installed packages, so tests, smoke runs and examples work offline:

  'train', 'test'   handwritten digits from scikit-learn's bundled `load_digits()` (1797 8x8 images,
                    gray 0..16), upscaled to RGB, stratified split with a seeded RNG;
  'rendition'       the ID *test* digits redrawn in another style: bold strokes in a bright colour on a
                    dark one (the ImageNet-R role: same classes, a different style);
  'adversarial'     the ID *test* digits (never train, so nothing leaks) rotated 10-25 degrees,
                    occluded and noised (the ImageNet-A role: same style, hard corruptions).

The two shifts were calibrated on the default run's cold-started model alone, before any method ran,
so that it sits well above chance (10%) and well below its ID accuracy on both: about 49% on the
renditions and 36% on the adversarial set against 66% ID. The first design (typeset digits in
Pillow's font; 20-50 degree rotations and contrast inversion) put every model at chance, so it could
not show any method generalising better than another.

Every example is a one-word classification with the paper's prompt; the answer is the digit's English
name. Everything is a pure function of `seed` and the index: each image draws from its own
`np.random.default_rng((seed, stream, index))`, so pixels are identical across calls and processes and
`limit` returns a prefix of the full split.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dcsft_jax.data.records import Record

PROMPT = "Please provide the object name in the image. Output the answer using one word."
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test", "rendition", "adversarial")    # the paper's roles: training, ID and OOD evaluation
PRIOR = "prior"                                          # pretraining (README "A miniature with a prior")
TASK = "classification"
TEST_FRACTION = 0.2  # per class, so both ID splits hold all 10 digits

# Separate RNG streams per purpose: changing one split's recipe must not shift another split's draws.
_STREAM_SPLIT, _STREAM_NOISE, _STREAM_RENDITION, _STREAM_ADVERSARIAL, _STREAM_PRIOR = 1, 2, 3, 4, 5


def _make(id_: str, image: Image.Image, label: int, meta: dict[str, Any]) -> Record:
  return Record(id=id_, image=image, prompt=PROMPT, answer=DIGIT_NAMES[label], task=TASK, meta=meta)


# ----------------------------------------------------------------------------- ID: sklearn digits
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 8, 8] in 0..255, labels int64 [N]); cached because the CSV parse dominates."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  # 0..16 -> 0..255 with integer rounding, so pixels do not depend on float formatting.
  images = (d.images.astype(np.int64) * 255 + 8) // 16
  return images.astype(np.uint8), d.target.astype(np.int64)


def _split_indices(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified train/test source indices (sorted), drawn per class so each class keeps TEST_FRACTION."""
  _, labels = _digits()
  rng = np.random.default_rng((seed, _STREAM_SPLIT))
  train, test = [], []
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    perm = rng.permutation(idx)
    n_test = int(round(TEST_FRACTION * len(idx)))
    test.append(perm[:n_test])
    train.append(perm[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _upscale(gray8: np.ndarray, size: int) -> Image.Image:
  # Bicubic on uint8 is deterministic in Pillow and gives smooth strokes rather than 7x7 blocks,
  # which is closer to what a vision tower sees on natural photos.
  img = Image.fromarray(gray8, mode="L").resize((size, size), Image.Resampling.BICUBIC)
  return img.convert("RGB")


def _id_records(split: str, seed: int, image_size: int) -> list[Record]:
  images, labels = _digits()
  train_idx, test_idx = _split_indices(seed)
  out = []
  for src in (train_idx if split == "train" else test_idx):
    label = int(labels[src])
    meta = {"label": label, "split": split, "source_index": int(src), "noisy": False}
    out.append(_make(f"digits-{split}-{int(src):05d}", _upscale(images[src], image_size), label, meta))
  return out


# ----------------------------------------------------------------------------- OOD: renditions
def _rendition(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
  """The same handwritten digit drawn in another style: bolder strokes in a random bright colour on a
  random dark one (ID digits are thin, gray on black), as ImageNet-R renders ImageNet's classes as
  paintings and cartoons."""
  size = img.size[0]
  k = 2 * max(1, round(size / 40)) + 1                     # 3 px at 56: strokes about twice as thick
  gray = np.asarray(img.convert("L").filter(ImageFilter.MaxFilter(k)), np.float64) / 255
  while True:
    bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    lum = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    if lum(fg) - lum(bg) >= 100:                           # the stroke stays the bright part, legible
      break
  rgb = bg[None, None] * (1 - gray[..., None]) + fg[None, None] * gray[..., None]
  img = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")
  return img, {"background": [int(v) for v in bg], "foreground": [int(v) for v in fg], "dilate": k}


def _shifted_records(split: str, stream: int, shift, key: str, seed: int, image_size: int) -> list[Record]:
  """The ID *test* digits through `shift(image, rng) -> (image, what)`, each with its own RNG stream,
  `what` kept in meta[key]: both OOD sets are built this way, so neither holds a training digit."""
  images, labels = _digits()
  _, test_idx = _split_indices(seed)
  out = []
  for src in test_idx:
    label = int(labels[src])
    rng = np.random.default_rng((seed, stream, int(src)))
    img, what = shift(_upscale(images[src], image_size), rng)
    meta = {"label": label, "split": split, "source_index": int(src), "noisy": False, key: what}
    out.append(_make(f"digits-{split}-{int(src):05d}", img, label, meta))
  return out


# ----------------------------------------------------------------------------- OOD: adversarial
def _corrupt(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
  """Rotate, occlude and add noise; returns the image and which corruptions were applied. Calibrated on
  the default run's cold-started model alone (README): rotations of 20-50 degrees or a contrast
  inversion put it at chance (15%, 7%), which measures nothing; 10-25 degrees with the occluder and
  light noise leave it well above chance and well below its ID accuracy."""
  size = img.size[0]
  ops = []
  angle = float(rng.uniform(10, 25)) * (1 if rng.random() < 0.5 else -1)
  img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
  ops.append(f"rotate{angle:+.0f}")
  # A small occluder (15-25% of each side) somewhere over the digit, in a random gray so it is not
  # background; small enough that a person still reads the digit, as with ImageNet-A's real images.
  w = int(rng.integers(int(0.15 * size), int(0.25 * size) + 1))
  h = int(rng.integers(int(0.15 * size), int(0.25 * size) + 1))
  x0 = int(rng.integers(int(0.2 * size), size - w - int(0.2 * size) + 1))
  y0 = int(rng.integers(int(0.2 * size), size - h - int(0.2 * size) + 1))
  gray = int(rng.integers(64, 256))
  ImageDraw.Draw(img).rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=(gray, gray, gray))
  ops.append("occlude")
  arr = np.asarray(img, dtype=np.float64)
  arr = arr + rng.normal(0.0, float(rng.uniform(5, 20)), arr.shape)
  ops.append("noise")
  arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
  return Image.fromarray(arr, mode="RGB"), ops


# ----------------------------------------------------------------------------- the prior
# The styles every prior digit is drawn in, in this order: the ID look, the two OOD families (as a
# pretrained VLM has seen paintings and odd photos of ImageNet's classes), and other looks.
PRIOR_STYLES = ("plain", "rendition", "corrupted", "other")


def _other_look(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
  """One of three looks that no evaluation set uses: blurred, inverted, or shrunk off-centre."""
  kind = ("blur", "invert", "shrink")[int(rng.integers(3))]
  if kind == "blur":
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 2.0)))), kind
  if kind == "invert":
    return Image.fromarray(255 - np.asarray(img), mode="RGB"), kind
  size = img.size[0]
  side = int(rng.integers(size // 2, 3 * size // 4 + 1))
  out = Image.new("RGB", (size, size))
  out.paste(img.resize((side, side), Image.Resampling.BICUBIC),
            (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))))
  return out, kind


def _prior_records(seed: int, image_size: int) -> list[Record]:
  images, labels = _digits()
  train_idx, _ = _split_indices(seed)
  out = []
  for src in train_idx:
    label = int(labels[src])
    plain = _upscale(images[src], image_size)
    for k, style in enumerate(PRIOR_STYLES):
      rng = np.random.default_rng((seed, _STREAM_PRIOR, int(src), k))
      if style == "plain":
        img, what = plain, style
      elif style == "rendition":
        img, what = _rendition(plain, rng)[0], style
      elif style == "corrupted":
        img, what = _corrupt(plain, rng)[0], style
      else:
        img, what = _other_look(plain, rng)
      meta = {"label": label, "split": "prior", "source_index": int(src), "noisy": False, "style": what}
      out.append(_make(f"digits-prior-{int(src):05d}-{style}", img, label, meta))
  return out


# ----------------------------------------------------------------------------- label noise
def _apply_label_noise(records: list[Record], rate: float, seed: int) -> list[Record]:
  """Flip exactly round(rate * n) answers to a different digit, chosen with a seeded RNG."""
  n_flip = int(round(rate * len(records)))
  if n_flip == 0:
    return records
  rng = np.random.default_rng((seed, _STREAM_NOISE))
  flip = set(int(i) for i in rng.choice(len(records), size=n_flip, replace=False))
  out = []
  for i, r in enumerate(records):
    if i in flip:
      true = r.meta["label"]
      # Adding 1..9 mod 10 guarantees a different label, uniformly over the other nine.
      new = (true + int(rng.integers(1, 10))) % 10
      meta = dict(r.meta, label=new, true_label=true, noisy=True)
      r = _make(r.id, r.image, new, meta)
    out.append(r)
  return out


# ----------------------------------------------------------------------------- entry point
def load_builtin(split: str, *, seed: int = 0, label_noise: float = 0.0, image_size: int = 56,
                 limit: int | None = None) -> list[Record]:
  """Records of one builtin split: 'train', 'test' (ID), 'rendition' or 'adversarial' (OOD), or 'prior'
  (pretraining: every train digit in each of PRIOR_STYLES).

  Each record has id ('digits-{split}-{index:05d}', stable for a given seed), image (RGB PIL image,
  image_size x image_size), prompt (PROMPT), answer (a DIGIT_NAMES entry), task ('classification') and
  meta ({'label', 'split', 'source_index', 'noisy', ...}). `seed` fixes the train/test split and every
  augmentation; the same seed gives identical records in any process.

  label_noise: fraction of *training* answers replaced by a different random digit name (exactly
  round(label_noise * n) of the returned records, meta['noisy']=True and meta['true_label'] kept).
  Real datasets carry such noise, and it is what fills the paper's 'hard' bucket: prompts the model
  never gets right because the reference answer is wrong. Only valid for split='train'.

  limit: return only the first `limit` records (label noise is applied after, so the count is exact).
  """
  if split not in SPLITS + (PRIOR,):
    raise ValueError(f"unknown builtin split {split!r}; expected one of {SPLITS + (PRIOR,)}")
  if not 0.0 <= label_noise <= 1.0:
    raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
  if label_noise and split != "train":
    raise ValueError(f"label_noise applies to the 'train' split only, got split={split!r}")
  if image_size < 8:
    raise ValueError(f"image_size must be >= 8, got {image_size}")
  if split in ("train", "test"):
    records = _id_records(split, seed, image_size)
  elif split == "prior":
    records = _prior_records(seed, image_size)
  elif split == "rendition":
    records = _shifted_records("rendition", _STREAM_RENDITION, _rendition, "style", seed, image_size)
  else:
    records = _shifted_records("adversarial", _STREAM_ADVERSARIAL, _corrupt, "corruptions", seed, image_size)
  if limit is not None:
    records = records[:limit]
  return _apply_label_noise(records, label_noise, seed)


def load_synthetic(n: int, split: str = "train", *, seed: int = 0, label_noise: float = 0.0,
                   min_side: int = 250, max_side: int = 500) -> list[Record]:
  """`n` records of a builtin split at ImageNet-like sizes, for speed runs at the paper's scale.

  The split's digits are cycled to `n` records, each resized to a random width and height in
  [min_side, max_side] (ImageNet's images average about 400 x 350) and kept as JPEG bytes, as TFDS
  keeps ImageNet: decoding is part of the batch cost, and 10k records hold ~0.3 GB, not 5 GB of
  pixels. Ids are 'synthetic-{split}-{i:06d}'.
  """
  import io
  if n < 1:
    raise ValueError(f"synthetic record count must be >= 1, got {n}")
  base = load_builtin(split, seed=seed, label_noise=label_noise if split == "train" else 0.0, image_size=64)
  rng = np.random.default_rng([seed, 7919])
  sizes = rng.integers(min_side, max_side + 1, size=(n, 2))
  out = []
  for i in range(n):
    src = base[i % len(base)]
    buf = io.BytesIO()
    src.image.resize((int(sizes[i, 0]), int(sizes[i, 1])), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    out.append(Record(f"synthetic-{split}-{i:06d}", buf.getvalue(), src.prompt, src.answer, src.task,
                      {**src.meta, "synthetic_of": src.id}))
  return out
