"""The paper's other two tasks in miniature, built from the same scikit-learn digits, with no download.

Visual grounding (the paper: RefCOCO -> Ref-L4 and LISA, right when IoU >= 0.5):
  'grounding_train', 'grounding_test'   two digits of different values and maybe a shape that is no
                    digit, each 24 px in the middle of a cell of a 3 x 3 grid on an 84 x 84 canvas whose
                    cells are tinted by column and row (`tint`); the prompt names one digit and asks
                    for its box, the answer is the box "[x1, y1, x2, y2]" in pixels of the canvas (the
                    frame Qwen2.5-VL sees: 84 is a multiple of its 28 px, inside its pixel bounds, so
                    the processor does not resize). The training split shows each training digit in
                    SCENES_PER_TRAIN_DIGIT scenes;
  'grounding_clutter'   the Ref-L4 role, busier scenes: four or five digits and a shape, gray strokes
                    across the canvas and pixel noise;
  'grounding_style'     the LISA role, another look: the objects drawn as the classification set's
                    renditions are (bold strokes in a random bright colour).

Visual reasoning (the paper: MMK12 -> multiple-choice math benchmarks, a thought then the answer):
  'reasoning_train', 'reasoning_test'   one digit (as the classification set draws it) and a
                    multiple-choice question about its value: even or odd; smaller than, equal to or
                    larger than five; a multiple of three or not. The options are in the prompt
                    ("A. even"), the prompt asks for a thought and the letter in \\boxed{}, and the
                    reference answer is a short thought and the letter: "The digit is seven, which is
                    odd. \\boxed{B}". The verifier reads the last \\boxed{} (math-verify's form too).
  'reasoning_rendition', 'reasoning_adversarial'   the same questions on the two shifted styles of
                    the classification set.

Every target digit of the ID training split is a digit of the classification training split, and
every test and OOD one a test digit: nothing leaks. Each record draws from its own
`np.random.default_rng((seed, stream, index))`, so records are identical across calls and processes.
Label noise (training only) points the answer at another digit: a distractor's box, or the thought
and letter for another value; these fill the hard bucket as wrong ImageNet labels do.

Calibration (cold start alone, before any method ran) is recorded in README.md ("The other two tasks").
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dcsft_jax.data import builtin
from dcsft_jax.data.records import Record, format_box

GROUNDING_SPLITS = ("grounding_train", "grounding_test", "grounding_clutter", "grounding_style")
REASONING_SPLITS = ("reasoning_train", "reasoning_test", "reasoning_rendition", "reasoning_adversarial")
SPLITS = GROUNDING_SPLITS + REASONING_SPLITS

CELL, GRID, DIGIT = 28, 3, 24            # the canvas is GRID x CELL = 84 px square; digits centred in cells
CANVAS = CELL * GRID
# The training split places each training digit in this many scenes (other cells, other distractors).
SCENES_PER_TRAIN_DIGIT = 3
# The wording of the REC prompts the paper's grounding recipe comes from (VLM-R1), naming the box form.
GROUNDING_PROMPT = ("Please provide the bounding box coordinate of the region this sentence describes: "
                    "the digit {name}. Output the box as [x1, y1, x2, y2].")
REASONING_SUFFIX = "Think first, then give the letter of your answer in \\boxed{}."

_STREAM = {"grounding_train": 11, "grounding_test": 12, "grounding_clutter": 13, "grounding_style": 14,
           "reasoning_train": 21, "reasoning_test": 22, "reasoning_rendition": 23, "reasoning_adversarial": 24,
           "noise": 30}


# ----------------------------------------------------------------------------- reasoning questions
def _parity(d: int) -> tuple[int, str]:
  return d % 2, "even" if d % 2 == 0 else "odd"


def _five(d: int) -> tuple[int, str]:
  k = 0 if d < 5 else 1 if d == 5 else 2
  return k, ("smaller than", "equal to", "larger than")[k] + " five"


def _three(d: int) -> tuple[int, str]:
  return (0, "a multiple of three") if d % 3 == 0 else (1, "not a multiple of three")


# (question, options, value -> (option index, what the thought says))
QUESTIONS: tuple[tuple[str, tuple[str, ...], Callable[[int], tuple[int, str]]], ...] = (
    ("Is the number in the image even or odd?", ("even", "odd"), _parity),
    ("Is the number in the image smaller than, equal to, or larger than five?", ("smaller", "equal", "larger"), _five),
    ("Is the number in the image a multiple of three?", ("yes", "no"), _three),
)
LETTERS = "ABCDEFGH"


def reasoning_prompt(q: int) -> str:
  question, options, _ = QUESTIONS[q]
  return "\n".join([question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [REASONING_SUFFIX])


def reasoning_answer(q: int, digit: int) -> str:
  k, said = QUESTIONS[q][2](digit)
  return f"The digit is {builtin.DIGIT_NAMES[digit]}, which is {said}. \\boxed{{{LETTERS[k]}}}"


def _reasoning(split: str, seed: int, image_size: int, noise: set[int]) -> list[Record]:
  shift = {"reasoning_rendition": builtin._rendition, "reasoning_adversarial": builtin._corrupt}.get(split)
  images, labels = builtin._digits()
  train_idx, test_idx = builtin._split_indices(seed)
  out = []
  for i, src in enumerate(train_idx if split == "reasoning_train" else test_idx):
    rng = np.random.default_rng((seed, _STREAM[split], int(src)))
    q = int(rng.integers(len(QUESTIONS)))
    img = builtin._upscale(images[src], image_size)
    meta: dict[str, Any] = {"label": int(labels[src]), "question": q, "split": split, "source_index": int(src),
                            "noisy": False}
    if shift is not None:
      img, what = shift(img, rng)
      meta["shift"] = what
    said = int(labels[src])
    if i in noise:
      said = (said + int(np.random.default_rng((seed, _STREAM["noise"], i)).integers(1, 10))) % 10
      meta.update(noisy=True, noisy_digit=said)
    out.append(Record(f"digits-{split}-{int(src):05d}", img, reasoning_prompt(q), reasoning_answer(q, said),
                      "reasoning", meta))
  return out


# ----------------------------------------------------------------------------- grounding scenes
def _digit_tile(gray8: np.ndarray) -> Image.Image:
  return Image.fromarray(gray8, mode="L").resize((DIGIT, DIGIT), Image.Resampling.BICUBIC)


def tint(cell: int) -> np.ndarray:
  """The background colour of a cell: red grows with the column, green with the row. A map's grid
  of this kind is what lets a model this small read where a digit is (its vision tower has no
  absolute position, only relative rotary ones); Qwen2.5-VL-3B reads it from the scene itself."""
  return np.array([20 + 40 * (cell % GRID), 20 + 40 * (cell // GRID), 24], np.float64)


def _shape(rng: np.random.Generator) -> Image.Image:
  """A distractor that is not a digit: a triangle, a box outline or a filled blob, 12-22 px, in a DIGIT tile."""
  tile = Image.new("L", (DIGIT, DIGIT), 0)
  w, h = (int(v) for v in rng.integers(12, 23, 2))
  x0, y0 = (DIGIT - w) // 2, (DIGIT - h) // 2
  kind = int(rng.integers(3))
  draw = ImageDraw.Draw(tile)
  if kind == 0:
    draw.polygon(((x0, y0 + h - 1), (x0 + w - 1, y0 + h - 1), (x0 + w // 2, y0)), outline=255, width=3)
  elif kind == 1:
    draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), outline=255, width=3)
  else:
    draw.ellipse((x0 + 3, y0 + 3, x0 + w - 4, y0 + h - 4), fill=200)
  return tile


def _scene(target: int, pool: np.ndarray, labels: np.ndarray, images: np.ndarray, n_others: int, n_shapes: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[tuple[int, list[int]]]]:
  """The tinted grid with the target digit, `n_others` digits of other values (each value once) and
  `n_shapes` shapes that are not digits, in distinct cells: (background RGB [84, 84, 3], stroke mask
  [84, 84] in 0..1, [(label or -1 for a shape, box)] with the target first)."""
  others: list[int] = []
  seen = {int(labels[target])}
  for j in rng.permutation(len(pool)):
    if len(others) == n_others:
      break
    if int(labels[pool[j]]) not in seen:
      seen.add(int(labels[pool[j]]))
      others.append(int(pool[j]))
  cells = rng.choice(GRID * GRID, size=1 + n_others + n_shapes, replace=False)
  background = np.zeros((CANVAS, CANVAS, 3), np.float64)
  for cell in range(GRID * GRID):
    r, c = divmod(cell, GRID)
    background[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = tint(cell)
  mask = Image.new("L", (CANVAS, CANVAS), 0)
  placed = []
  tiles = [(int(labels[src]), _digit_tile(images[src])) for src in [target] + others]
  tiles += [(-1, _shape(rng)) for _ in range(n_shapes)]
  for (label, tile), cell in zip(tiles, cells):
    x, y = int(cell % GRID) * CELL + (CELL - DIGIT) // 2, int(cell // GRID) * CELL + (CELL - DIGIT) // 2
    mask.paste(tile, (x, y))
    placed.append((label, [x, y, x + DIGIT, y + DIGIT]))
  return background, np.asarray(mask, np.float64) / 255, placed


def _compose(background: np.ndarray, mask: np.ndarray, ink: np.ndarray) -> Image.Image:
  rgb = background * (1 - mask[..., None]) + ink[None, None] * mask[..., None]
  return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")


def _clutter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Gray strokes across the scene and pixel noise (the digits stay readable)."""
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(3, 6))):
    x0, y0, x1, y1 = (int(v) for v in rng.integers(0, CANVAS, 4))
    g = int(rng.integers(60, 140))
    draw.line((x0, y0, x1, y1), fill=(g, g, g), width=int(rng.integers(1, 3)))
  arr = np.asarray(img, np.float64) + rng.normal(0.0, 12.0, (CANVAS, CANVAS, 1))
  return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")


def _grounding(split: str, seed: int, noise: set[int]) -> list[Record]:
  images, labels = builtin._digits()
  train_idx, test_idx = builtin._split_indices(seed)
  pool = train_idx if split == "grounding_train" else test_idx
  scenes = SCENES_PER_TRAIN_DIGIT if split == "grounding_train" else 1
  out = []
  for i, (k, src) in enumerate((k, src) for k in range(scenes) for src in pool):
    rng = np.random.default_rng((seed, _STREAM[split], int(src), k))
    clutter = split == "grounding_clutter"
    # ID and style: one other digit (and maybe a shape): where the digits are and which one is meant;
    # clutter: three or four other digits.
    n_others = int(rng.integers(3, 5)) if clutter else 1
    n_shapes = 1 if clutter else int(rng.integers(0, 2))
    background, mask, placed = _scene(int(src), pool, labels, images, n_others, n_shapes, rng)
    meta: dict[str, Any] = {"label": int(labels[src]), "split": split, "source_index": int(src), "noisy": False,
                            "objects": [[label, box] for label, box in placed]}
    ink = np.full(3, 255.0)
    if split == "grounding_style":
      # The classification renditions' look on the digits: bold strokes in a random bright colour.
      width = 2 * max(1, round(CANVAS / 40)) + 1
      mask = np.asarray(Image.fromarray(np.uint8(np.rint(mask * 255))).filter(ImageFilter.MaxFilter(width)),
                        np.float64) / 255
      ink = rng.integers(150, 256, 3).astype(np.float64)
      meta["style"] = {"ink": [int(v) for v in ink], "dilate": width}
    img = _compose(background, mask, ink)
    if split == "grounding_clutter":
      img = _clutter(img, rng)
    box = placed[0][1]
    if i in noise:                               # a distractor's box: the answer names the wrong digit
      box = placed[1 + int(np.random.default_rng((seed, _STREAM["noise"], i)).integers(len(placed) - 1))][1]
      meta.update(noisy=True, true_box=placed[0][1])
    out.append(Record(f"digits-{split}-{int(src):05d}" + (f"-{k}" if k else ""), img,
                      GROUNDING_PROMPT.format(name=builtin.DIGIT_NAMES[int(labels[src])]), format_box(box),
                      "grounding", meta))
  return out


# ----------------------------------------------------------------------------- entry point
def load(split: str, *, seed: int = 0, label_noise: float = 0.0, image_size: int = 56,
         limit: int | None = None) -> list[Record]:
  """Records of one split of SPLITS (see the module docstring); `label_noise` applies to the two
  training splits only: exactly round(label_noise * n) of the returned records, chosen by `seed`."""
  if split not in SPLITS:
    raise ValueError(f"unknown builtin split {split!r}; expected one of {SPLITS}")
  if label_noise and not split.endswith("_train"):
    raise ValueError(f"label_noise applies to the training splits only, got split={split!r}")
  n = len(builtin._split_indices(seed)[0 if split.endswith("_train") else 1])
  n *= SCENES_PER_TRAIN_DIGIT if split == "grounding_train" else 1
  n = min(n, limit) if limit is not None else n
  k = int(round(label_noise * n))
  noise = set(int(i) for i in np.random.default_rng((seed, _STREAM["noise"])).choice(n, size=k, replace=False)) \
      if k else set()
  records = _grounding(split, seed, noise) if split in GROUNDING_SPLITS else _reasoning(split, seed, image_size, noise)
  return records[:limit] if limit is not None else records
