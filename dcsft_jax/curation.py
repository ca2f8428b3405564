"""Difficulty curation (DC-SFT): bucket training prompts by how often the cold-started policy solves them.

The paper's rule (its `infer/sample.py`, NOTES.md §1.4 and §5): each training prompt gets K = 8
sampled answers, each verified 0/1. easy = all correct, hard = none correct, medium = the verdicts
differ (`len(set(verdicts)) > 1`). There are no thresholds. The recipes keep buckets:
  sft_m = medium (the paper's SFT-M), sft_em = easy + medium (SFT-EM), sft = everything.
A recipe may add back a share of the hard bucket, the paper's Fig. 5 ablation: 'sft_em+hard0.2' is
SFT-EM plus 20% of the hard prompts (`parse_recipe`), so a sweep is a list of recipes.

Two inputs are understood:
  * our scores file (JSONL, one object per prompt, written by the scoring stage):
      {"id": str, "completions": [str, ...], "verdicts": [0|1, ...], "pass_rate": float}
    other keys are ignored; `read_scores` + `select` turn it and the Records into a curated set;
  * the paper's own rollout files (K outputs of its `infer/test_dp.py`), bucketed and written
    exactly as sample.py does by `rollout_buckets` / `write_rollout_bucket`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from dcsft_jax import atomic, plots
from dcsft_jax.data.records import (
  IMAGE_TOKEN,
  BadRecord,
  Record,
  parse_box,
  write_swift_json,
)

BUCKETS = ("easy", "medium", "hard")
RECIPES: dict[str, frozenset[str]] = {
  "sft_m": frozenset({"medium"}),
  "sft_em": frozenset({"easy", "medium"}),
  "sft": frozenset(BUCKETS),
  "easy": frozenset({"easy"}),
  "medium": frozenset({"medium"}),
  "hard": frozenset({"hard"}),
  # Table 1's protocol (NOTES §1.6): each bucket alone, every one cut to the smallest bucket's size
  # (a seeded random subset, `balance`) and trained TABLE1_STEPS steps, so the three differ only in
  # difficulty. The plain 'easy' / 'medium' / 'hard' recipes train a whole bucket for the run's steps.
  "table1_easy": frozenset({"easy"}),
  "table1_medium": frozenset({"medium"}),
  "table1_hard": frozenset({"hard"}),
}
TABLE1 = ("table1_easy", "table1_medium", "table1_hard")
TABLE1_STEPS = 100           # the paper's steps for each Table 1 subset
_HARD_ADDED = re.compile(r"^(?P<base>[a-z_]+)\+hard(?P<ratio>[0-9]*\.?[0-9]+)$")


def parse_recipe(name: str) -> tuple[str, float | None]:
  """'sft_em' -> ('sft_em', None); 'sft_em+hard0.2' -> ('sft_em', 0.2), SFT-EM with 20% of the hard
  bucket added back (Fig. 5). Raises ValueError naming the recipes for anything else."""
  m = _HARD_ADDED.match(name)
  base, ratio = (m.group("base"), float(m.group("ratio"))) if m else (name, None)
  if base not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}: the recipes are {', '.join(RECIPES)}, or one without the hard "
                     f"bucket plus a share of it, e.g. sft_em+hard0.2")
  if ratio is not None and ("hard" in RECIPES[base] or base in TABLE1 or not 0.0 <= ratio <= 1.0):
    raise ValueError(f"recipe {name!r}: '+hardR' adds R in [0, 1] of the hard bucket to a recipe without it "
                     f"(sft_m, sft_em, easy, medium)")
  return base, ratio


def recipe_parts(name: str) -> tuple[str, float | None] | None:
  """parse_recipe's answer, or None for a name that is no recipe (a model label such as 'grpo')."""
  try:
    return parse_recipe(name)
  except ValueError:
    return None


# Bar colours of the pass-rate histogram: the bucket each bar falls into.
BUCKET_COLORS = {"hard": (214, 69, 65), "medium": (240, 173, 40), "easy": (60, 160, 80)}
_SCORES_FIX = ('each line must be one JSON object {"id": str, "completions": [str, ...], '
               '"verdicts": [0|1, ...], "pass_rate": float}; rerun the scoring stage to regenerate the file')

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the rule
def _verdict(v: Any) -> int:
  # bool is an int subclass; floats 0.0/1.0 and numpy scalars are accepted because scorers emit them.
  if isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)) and v in (0, 1):
    return int(v)
  raise ValueError(f"a verdict must be 0 or 1 (or a bool), got {v!r}")


def bucket_of(verdicts: Sequence[int | bool]) -> str:
  """'easy' (all correct), 'hard' (none correct) or 'medium' (mixed): the paper's sample.py rule."""
  return _bucket([_verdict(v) for v in verdicts])


def _bucket(vs: list[int]) -> str:
  """bucket_of on already validated verdicts (the rollout reader calls it 10^4 times)."""
  if not vs:
    raise ValueError("no verdicts: a prompt needs at least one verified rollout to have a difficulty")
  if len(set(vs)) > 1:
    return "medium"
  return "hard" if vs[0] == 0 else "easy"


# ----------------------------------------------------------------------------- our scores file
@dataclasses.dataclass(frozen=True)
class ScoreRow:
  """The K verified rollouts of one prompt, as the scoring stage wrote them."""
  id: str
  completions: list[str]
  verdicts: list[int]
  pass_rate: float

  @property
  def k(self) -> int:
    return len(self.verdicts)

  @property
  def n_correct(self) -> int:
    return sum(self.verdicts)

  @property
  def bucket(self) -> str:
    return _bucket(self.verdicts)


def _parse_score_line(obj: Any) -> ScoreRow:
  if not isinstance(obj, dict):
    # ValueError, not TypeError: a wrong JSON shape is bad data (BadRecord), not a caller's bug.
    raise ValueError(f"a line holds a JSON {type(obj).__name__}, not an object")  # noqa: TRY004
  missing = [k for k in ("id", "completions", "verdicts", "pass_rate") if k not in obj]
  if missing:
    raise ValueError(f"missing key(s) {missing} (keys: {sorted(obj)})")
  rid, comps, verdicts, rate = obj["id"], obj["completions"], obj["verdicts"], obj["pass_rate"]
  if not isinstance(rid, str) or not rid:
    raise ValueError(f"'id' must be a non-empty string, got {rid!r}")
  if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
    raise ValueError("'completions' must be a list of strings")
  if not isinstance(verdicts, list) or not verdicts:
    raise ValueError("'verdicts' must be a non-empty list of 0/1")
  try:
    vs = [_verdict(v) for v in verdicts]
  except ValueError as e:
    raise ValueError(f"'verdicts': {e}") from None
  if len(comps) != len(vs):
    raise ValueError(f"{len(comps)} completions but {len(vs)} verdicts")
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
    raise ValueError(f"'pass_rate' must be a number, got {rate!r}")
  if abs(rate - sum(vs) / len(vs)) > 1e-6:
    raise ValueError(f"pass_rate {rate} is inconsistent with the verdicts ({sum(vs)}/{len(vs)} correct)")
  return ScoreRow(id=rid, completions=list(comps), verdicts=vs, pass_rate=float(rate))


def read_scores(path: str | os.PathLike) -> dict[str, ScoreRow]:
  """Read a scores JSONL file into {id: ScoreRow}; blank lines are allowed, anything malformed raises
  `BadRecord` naming the file and the (1-based) line."""
  path = os.fspath(path)
  rows: dict[str, ScoreRow] = {}
  first_line: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}: line {n}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadRecord(where, None, f"not valid JSON ({e})", _SCORES_FIX) from None
      try:
        row = _parse_score_line(obj)
      except ValueError as e:
        raise BadRecord(where, None, str(e), _SCORES_FIX) from None
      if row.id in rows:
        raise BadRecord(where, None, f"duplicate id {row.id!r} (first on line {first_line[row.id]})",
                        "score each prompt once; merge or deduplicate the scoring outputs", record_id=row.id)
      rows[row.id], first_line[row.id] = row, n
  return rows


def common_k(scores: Mapping[str, ScoreRow]) -> int | None:
  """The number of rollouts per prompt shared by all rows (None for no rows); differing K raises."""
  ks: dict[int, str] = {}
  for rid, row in scores.items():
    ks.setdefault(row.k, rid)
  if len(ks) > 1:
    detail = ", ".join(f"K={k} (e.g. id {rid!r})" for k, rid in sorted(ks.items()))
    raise ValueError(f"the scores mix different numbers of rollouts per prompt: {detail}; "
                     "score every prompt with the same K")
  return next(iter(ks), None)


# ----------------------------------------------------------------------------- the paper's rollout files
def _load_rollout_file(path: str) -> list[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("results"), list):
    raise ValueError(f"{path}: expected test_dp.py's output, a JSON object with a 'results' list")  # noqa: TRY004
  for i, r in enumerate(data["results"]):
    if not isinstance(r, dict):
      raise ValueError(f"{path}: result {i} is a {type(r).__name__}, not an object")  # noqa: TRY004
    missing = [k for k in ("image", "question", "ground_truth", "correct") if k not in r]
    if missing:
      raise ValueError(f"{path}: result {i} lacks {missing}")
  return data["results"]


def read_rollout_files(paths: Sequence[str | os.PathLike]) -> list[dict]:
  """Join K test_dp.py output files index by index, as sample.py does.

  Returns one dict per prompt: {"image", "question", "ground_truth", "verdicts": [K], "bucket"}.
  The files must list the same prompts in the same order (test_dp.py shuffles with a fixed seed,
  so they do); differing lengths or a differing prompt at some index raise.
  """
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise ValueError("no rollout files given")
  all_data = [_load_rollout_file(p) for p in paths]
  lengths = [len(d) for d in all_data]
  if len(set(lengths)) > 1:
    detail = ", ".join(f"{p}: {n}" for p, n in zip(paths, lengths))
    raise ValueError(f"rollout files differ in length ({detail}); every file must hold the same prompts")
  out = []
  first = all_data[0]
  for i in range(lengths[0]):
    ref = first[i]
    for p, data in zip(paths[1:], all_data[1:]):
      if data[i]["question"] != ref["question"] or data[i]["image"] != ref["image"]:
        raise ValueError(f"{p}: result {i} is a different prompt from {paths[0]} "
                         f"(image {data[i]['image']!r} vs {ref['image']!r}); the files must share one order")
    try:
      verdicts = [_verdict(data[i]["correct"]) for data in all_data]
    except ValueError as e:
      raise ValueError(f"result {i}: {e}") from None
    out.append({"image": ref["image"], "question": ref["question"], "ground_truth": ref["ground_truth"],
                "verdicts": verdicts, "bucket": _bucket(verdicts)})
  return out


def rollout_buckets(paths: Sequence[str | os.PathLike]) -> dict[str, list[int]]:
  """{'easy', 'medium', 'hard'} -> the prompt indices in that bucket, in file order (sample.py's lists)."""
  out: dict[str, list[int]] = {b: [] for b in BUCKETS}
  for i, row in enumerate(read_rollout_files(paths)):
    out[row["bucket"]].append(i)
  return out


def _truncated_box(text: str) -> str:
  box = parse_box(text)
  if box is None:
    raise ValueError(f"ground truth {text!r} is not a box [x1, y1, x2, y2]")
  # int(), not round(): sample.py writes [int(x) for x in bbox_sol], i.e. truncation toward zero.
  return "[" + ", ".join(str(int(v)) for v in box) + "]"


def write_rollout_bucket(paths: Sequence[str | os.PathLike], bucket: str, out_path: str | os.PathLike,
                         grounding: bool | None = None) -> int:
  """Write one bucket of the rollout files as sample.py does (ms-swift JSON); returns the count.

  bucket: 'easy', 'medium' (or the paper's name 'middle') or 'hard'.
  grounding: sample.py decides by 'ref' in the file name; None here infers it from the ground
  truths (all boxes -> grounding), and grounding answers become int()-truncated boxes.
  """
  bucket = "medium" if bucket == "middle" else bucket
  if bucket not in BUCKETS:
    raise ValueError(f"unknown bucket {bucket!r} (expected one of {', '.join(BUCKETS)} or 'middle')")
  rows = read_rollout_files(paths)
  if grounding is None:
    boxes = [parse_box(str(r["ground_truth"]), strict=True) is not None for r in rows]
    if any(boxes) and not all(boxes):
      raise ValueError(f"{sum(boxes)} of {len(rows)} ground truths are boxes and the rest are not; "
                       "pass grounding=True or False explicitly")
    grounding = bool(rows) and all(boxes)
  items = []
  for r in rows:
    if r["bucket"] != bucket:
      continue
    answer = _truncated_box(str(r["ground_truth"])) if grounding else r["ground_truth"]
    items.append({"messages": [{"role": "user", "content": IMAGE_TOKEN + r["question"]},
                               {"role": "assistant", "content": answer}],
                  "images": [r["image"]]})
  atomic.write_json(out_path, items)
  return len(items)


# ----------------------------------------------------------------------------- selecting records
def _scored(records: Sequence[Record], scores: Mapping[str, ScoreRow], allow_missing: bool,
            ) -> tuple[list[tuple[int, Record, ScoreRow]], int]:
  missing = [r.id for r in records if r.id not in scores]
  if missing and not allow_missing:
    shown = ", ".join(repr(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
    raise ValueError(f"{len(missing)} of {len(records)} records have no score (e.g. id {shown}); "
                     "run the scoring stage on these records first (or pass allow_missing=True to drop them)")
  if missing:
    _log.warning("dropping %d of %d records without a score (first: %r)", len(missing), len(records), missing[0])
  return [(i, r, scores[r.id]) for i, r in enumerate(records) if r.id in scores], len(missing)


def n_hard_added(hard_ratio: float, n_hard: int) -> int:
  """How many hard records a hard_ratio adds back: round half up (not Python's banker's rounding)."""
  return math.floor(hard_ratio * n_hard + 0.5)


def select(records: Sequence[Record], scores: Mapping[str, ScoreRow], *, recipe: str, hard_ratio: float = 0.0,
           window: tuple[float, float] | None = None, seed: int = 0, allow_missing: bool = False) -> list[Record]:
  """The records a recipe keeps, in input order.

  recipe: 'sft_m' (medium), 'sft_em' (easy + medium), 'sft' (all), or one bucket ('easy', 'medium', 'hard').
  hard_ratio: the paper's Fig. 5 ablation; adds `n_hard_added(hard_ratio, n_hard)` hard records
    drawn with numpy default_rng(seed). Not allowed for a recipe that already keeps hard.
  window: (lo, hi) additionally keeps only records with lo <= pass_rate <= hi; it applies to
    the final set, hard records added back included.
  allow_missing: drop records without a score (logged with their count) instead of raising.
  """
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r} (expected one of {', '.join(RECIPES)})")
  keep = RECIPES[recipe]
  if isinstance(hard_ratio, bool) or not (0.0 <= hard_ratio <= 1.0):
    raise ValueError(f"hard_ratio must be in [0, 1], got {hard_ratio!r}")
  if hard_ratio > 0 and "hard" in keep:
    raise ValueError(f"recipe {recipe!r} already keeps every hard record; hard_ratio only applies to "
                     "recipes without the hard bucket (e.g. sft_m, sft_em)")
  if window is not None:
    lo, hi = window
    if not (0.0 <= lo <= hi <= 1.0):
      raise ValueError(f"window must be (lo, hi) with 0 <= lo <= hi <= 1, got {window!r}")
  scored, _ = _scored(records, scores, allow_missing)
  chosen = {i for i, _, s in scored if s.bucket in keep}
  if hard_ratio > 0:
    hard = [i for i, _, s in scored if s.bucket == "hard"]
    k = n_hard_added(hard_ratio, len(hard))
    if k:
      picks = np.random.default_rng(seed).choice(len(hard), size=k, replace=False)
      chosen.update(hard[j] for j in picks)
  out = []
  for i, r, s in scored:
    if i not in chosen:
      continue
    if window is not None and not (window[0] <= s.pass_rate <= window[1]):
      continue
    out.append(r)
  return out


def summary(records: Sequence[Record], scores: Mapping[str, ScoreRow]) -> dict[str, Any]:
  """Counts of the scored records: per bucket, per class within each bucket (classification only),
  a histogram over the K + 1 possible pass rates, and the mean pass rate.

  K is inferred from the scores (all rows must agree). Records without a score are only counted
  ('unscored'), never guessed.
  """
  k = common_k(scores)
  scored, n_missing = _scored(records, scores, allow_missing=True)
  buckets = {b: 0 for b in BUCKETS}
  classes: dict[str, dict[str, int]] = {b: {} for b in BUCKETS}
  hist = [0] * ((k or 0) + 1)
  # Records whose label was flipped on purpose (builtin's label_noise, meta["noisy"]), per bucket: the
  # paper's mechanism puts them in "hard", where SFT memorises them and GRPO gets no gradient.
  noisy = {b: 0 for b in BUCKETS}
  tasks: dict[str, dict[str, int]] = {}       # buckets per task, for a run that mixes tasks
  for _, r, s in scored:
    b = s.bucket
    buckets[b] += 1
    tasks.setdefault(r.task, {x: 0 for x in BUCKETS})[b] += 1
    noisy[b] += bool(r.meta.get("noisy"))
    if r.task == "classification":
      c = r.answer.strip().lower()
      classes[b][c] = classes[b].get(c, 0) + 1
    hist[s.n_correct] += 1
  for b in BUCKETS:
    classes[b] = dict(sorted(classes[b].items()))
  return {
    "n": len(scored),
    "unscored": n_missing,
    "k": k,
    "buckets": buckets,
    "tasks": dict(sorted(tasks.items())),
    "noisy_labels": noisy,
    "classes": classes,
    "pass_rate_hist": hist if k else [],
    "pass_rate_labels": [f"{j}/{k}" for j in range(k + 1)] if k else [],
    "mean_pass_rate": (sum(s.pass_rate for _, _, s in scored) / len(scored)) if scored else None,
  }


def pass_rate_histogram_png(scores: Mapping[str, ScoreRow], path: str | os.PathLike, *,
                            title: str = "Pass rate of the cold-start policy (difficulty buckets)") -> str:
  """Bars over the K + 1 pass rates of all scored prompts, coloured hard (0/K) / medium / easy (K/K)."""
  k = common_k(scores)
  if k is None:
    raise ValueError("no scores to plot")
  counts = [0] * (k + 1)
  for s in scores.values():
    counts[s.n_correct] += 1
  colors = [BUCKET_COLORS["hard" if j == 0 else "easy" if j == k else "medium"] for j in range(k + 1)]
  return plots.histogram_png(path, counts, [f"{j}/{k}" for j in range(k + 1)], title=title,
                             xlabel=f"correct rollouts out of {k}", ylabel="prompts", colors=colors)


# ----------------------------------------------------------------------------- writing curated sets
def safe_name(record_id: str) -> str:
  """A file-name-safe stem for an id; the sha1 suffix keeps ids that sanitize alike ('a/b', 'a_b') apart."""
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._")[:80] or "record"
  return f"{stem}-{hashlib.sha1(record_id.encode('utf-8')).hexdigest()[:8]}"


_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


def materialize_images(records: Sequence[Record], image_dir: str | os.PathLike) -> list[Record]:
  """Records whose image lives in memory (PIL image or encoded bytes) get it saved under image_dir
  and their `image` set to that path; path (or no) images pass through unchanged.

  PIL images become `<safe id>.png`; bytes are written as they are, with the extension of the
  format PIL detects. Existing files are kept (the name is a function of the id), so reruns are cheap.
  """
  image_dir = os.fspath(image_dir)
  out = []
  for r in records:
    if r.image is None or isinstance(r.image, str):
      out.append(r)
      continue
    if isinstance(r.image, Image.Image):
      path = os.path.join(image_dir, safe_name(r.id) + ".png")
      if not os.path.exists(path):
        img = r.image
        if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
          img = img.convert("RGB")  # PNG cannot hold e.g. CMYK or YCbCr
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic.write_bytes(path, buf.getvalue())
    else:
      try:
        with Image.open(io.BytesIO(r.image)) as probe:
          fmt = probe.format
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # undecodable, or too big
        raise ValueError(f"record {r.id!r}: its image bytes are not a readable image ({e})") from None
      path = os.path.join(image_dir, safe_name(r.id) + _EXT.get(fmt, "." + (fmt or "img").lower()))
      if not os.path.exists(path):
        atomic.write_bytes(path, r.image)
    out.append(dataclasses.replace(r, image=path))
  return out


def write_curated(records: Sequence[Record], path: str | os.PathLike, image_dir: str | os.PathLike) -> int:
  """Materialize in-memory images under image_dir, then write the ms-swift JSON; returns the count."""
  return write_swift_json(materialize_images(records, image_dir), path)


def table1_size(summary: Mapping[str, Any]) -> int:
  """The size every Table 1 subset is cut to: the smallest bucket's (curation.summary's counts)."""
  buckets = summary["buckets"]
  return min(int(buckets[b]) for b in BUCKETS)


def balance(records: Sequence[Record], n: int, seed: int) -> list[Record]:
  """A seeded random `n` of a bucket's records, in their order: Table 1's balancing to the smallest
  bucket (n >= len: all of them)."""
  if n >= len(records):
    return list(records)
  keep = sorted(int(i) for i in np.random.default_rng((seed, 0x7A1)).choice(len(records), size=n, replace=False))
  return [records[i] for i in keep]


def stratified_subset(records: Sequence[Record], n: int, seed: int) -> list[Record]:
  """A seeded random subset of `n` records, stratified by answer (classification: each label keeps its
  share, by largest remainders; other tasks: by task), in the records' order. The same records for a
  given seed, so every method and step of a curve is measured on the same images. n >= len: all."""
  if n <= 0 or n >= len(records):
    return list(records)
  groups: dict[tuple[str, str], list[int]] = {}
  for i, r in enumerate(records):
    key = (r.task, r.answer.strip().strip(".").lower() if r.task == "classification" else "")
    groups.setdefault(key, []).append(i)
  keys = sorted(groups)
  quota = {k: n * len(groups[k]) / len(records) for k in keys}
  take = {k: int(math.floor(quota[k])) for k in keys}
  # Largest remainders first (ties: the larger group, then the key), so the total is exactly n.
  for k in sorted(keys, key=lambda k: (-(quota[k] - take[k]), -len(groups[k]), k))[:n - sum(take.values())]:
    take[k] += 1
  rng = np.random.default_rng((seed, 0x5C))
  chosen = sorted(int(i) for k in keys for i in rng.permutation(groups[k])[:take[k]])
  return [records[i] for i in chosen]
