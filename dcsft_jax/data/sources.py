"""Dataset specs in configs -> Records. One string names a source, so configs stay flat:

  builtin:SPLIT            the embedded digits datasets: classification (train | test | rendition |
                           adversarial | prior), grounding_* and reasoning_* (data/digit_tasks.py)
  synthetic:N[:SPLIT]      N records of a builtin split at ImageNet-like sizes (JPEG bytes), for speed runs
  json:PATH  (or PATH.json) one of the paper's JSON files (ms-swift messages, or problem/solution)
  tfds:NAME[:SPLIT]        a prepared TFDS dataset under data.tfds_dir (ImageNet variants, RefCOCO)
  hf:PATH[:SPLIT]          a local Hugging Face dataset (save_to_disk dir, image folder, json/parquet)

Any spec may end in a record range [START:STOP] (Python slice bounds, either may be empty):
"builtin:train[:400]" and "builtin:train[400:]" split one source into a cold-start set and the rest.

Specs joined by '+' are one mixed source ("builtin:train[:100]+builtin:grounding_train[:100]"): its
records interleave the parts' in turn (a limit keeps every part's share), each with its own task.

Evaluation sets are a comma list of NAME=SPEC pairs ("id=builtin:test,rendition=builtin:rendition").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from dcsft_jax.data import builtin, digit_tasks
from dcsft_jax.data.records import read_hf_dataset, read_paper_json

KINDS = ("builtin", "synthetic", "json", "tfds", "hf")
BUILTIN_SPLITS = builtin.SPLITS + (builtin.PRIOR,) + digit_tasks.SPLITS


@dataclasses.dataclass(frozen=True)
class Spec:
  kind: str
  path: str
  split: str | None = None
  start: int | None = None         # record range [start:stop], applied after reading
  stop: int | None = None

  @property
  def sliced(self) -> bool:
    return self.start is not None or self.stop is not None

  @property
  def parts(self) -> list["Spec"]:
    """The sources of a mixed spec (kind 'mix'), else [self]."""
    return [parse(p) for p in self.path.split("+")] if self.kind == "mix" else [self]

  def __str__(self) -> str:
    if self.kind == "mix":
      return self.path
    rng = f"[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]" if self.sliced else ""
    return f"{self.kind}:{self.path}" + (f":{self.split}" if self.split else "") + rng


def _range(s: str) -> tuple[str, int | None, int | None]:
  """'SPEC[a:b]' -> ('SPEC', a, b)."""
  if not s.endswith("]") or "[" not in s:
    return s, None, None
  head, _, body = s[:-1].rpartition("[")
  lo, sep, hi = body.partition(":")
  try:
    if not sep:
      raise ValueError
    a, b = (int(lo) if lo.strip() else None), (int(hi) if hi.strip() else None)
  except ValueError:
    raise ValueError(f"dataset spec {s!r}: the record range must be [START:STOP] with integers, "
                     f"e.g. [:400] or [400:]") from None
  return head, a, b


def parse(spec: str) -> Spec:
  s = str(spec).strip()
  if not s:
    raise ValueError("empty dataset spec; use builtin:SPLIT, json:PATH, tfds:NAME[:SPLIT] or hf:PATH[:SPLIT]")
  parts = [p.strip() for p in s.split("+")]
  if len(parts) > 1 and all(p.partition(":")[0] in KINDS for p in parts):
    return Spec("mix", "+".join(str(parse(p)) for p in parts))
  s, start, stop = _range(s)
  return dataclasses.replace(_parse(s), start=start, stop=stop)


def _parse(s: str) -> Spec:
  kind, sep, rest = s.partition(":")
  if not sep or kind not in KINDS:
    if s.endswith((".json", ".jsonl")):
      return Spec("json", s)
    raise ValueError(f"dataset spec {s!r} does not start with one of {', '.join(k + ':' for k in KINDS)}")
  if kind == "builtin":
    if rest not in BUILTIN_SPLITS:
      raise ValueError(f"dataset spec {s!r}: the builtin splits are {', '.join(BUILTIN_SPLITS)}")
    return Spec(kind, rest)
  if kind == "json":
    return Spec(kind, rest)
  if kind == "synthetic":
    count, _, split = rest.partition(":")
    if not count.isdigit() or int(count) < 1 or (split and split not in builtin.SPLITS):
      raise ValueError(f"dataset spec {s!r}: expected synthetic:N[:SPLIT] with N >= 1 and SPLIT one of "
                       f"{', '.join(builtin.SPLITS)}")
    return Spec(kind, count, split or None)
  path, _, split = rest.rpartition(":") if rest.count(":") else (rest, "", "")
  return Spec(kind, path or rest, split or None)


def parse_sets(text: str) -> dict[str, Spec]:
  """'name=spec,name=spec' -> {name: Spec}, in order; names must be unique and file-name safe."""
  out: dict[str, Spec] = {}
  for item in [x.strip() for x in str(text).split(",") if x.strip()]:
    name, sep, spec = item.partition("=")
    name = name.strip()
    if not sep or not name:
      raise ValueError(f"evaluation set {item!r} is not NAME=SPEC")
    if not name.replace("_", "").replace("-", "").isalnum():
      raise ValueError(f"evaluation set name {name!r} must be letters, digits, '-' or '_'")
    if name in out:
      raise ValueError(f"evaluation set {name!r} is named twice")
    out[name] = parse(spec)
  return out


def check(spec: Spec, *, tfds_dir: str = "") -> str | None:
  """Why `spec` cannot be read on this machine (None if it looks readable), without reading it."""
  if spec.kind == "mix":
    return next((p for p in (check(x, tfds_dir=tfds_dir) for x in spec.parts) if p), None)
  if spec.kind == "json" and not os.path.isfile(spec.path):
    return (f"{spec}: file not found ({os.path.abspath(spec.path)}); point the config at the file, e.g. the "
            f"paper configs' data_dir argument (--config=FILE.py:data_dir=DIR) or --config.data.KEY=json:PATH")
  if spec.kind == "hf" and not os.path.exists(spec.path):
    return (f"{spec}: no such dataset directory or file ({os.path.abspath(spec.path)}); give a local "
            f"save_to_disk directory, image folder or json/parquet file")
  if spec.kind == "tfds":
    if not tfds_dir:
      return f"{spec}: set data.tfds_dir to the directory holding prepared TFDS datasets"
    if not os.path.isdir(os.path.join(tfds_dir, spec.path.split("/")[0])):
      return f"{spec}: {spec.path} is not prepared under {tfds_dir} (run `tfds build {spec.path} --data_dir={tfds_dir}`)"
  return None


class Loaded(list):
  """A source's records, and in `.skipped` the (index, reason) of each record its reader skipped
  (skip_bad_records), so a stage can report them: nothing is dropped without a count."""
  skipped: list = []


def _loaded(recs, skipped=(), limit: int | None = None) -> Loaded:
  out = Loaded(recs[:limit] if limit is not None else recs)
  out.skipped = list(skipped)
  return out


def load(spec: Spec | str, *, seed: int = 0, limit: int | None = None, image_root: Any = None,
         skip_bad_records: bool = False, tfds_dir: str = "", label_names: Any = None, task: str | None = None,
         label_noise: float = 0.0, image_size: int = 56, prompt: str | None = None,
         answer_column: str = "label") -> Loaded:
  """Records of one source (the first `limit` of them, if given)."""
  spec = parse(spec) if isinstance(spec, str) else spec
  if spec.kind == "mix":
    loaded = [load(p, seed=seed, image_root=image_root, skip_bad_records=skip_bad_records, tfds_dir=tfds_dir,
                   label_names=label_names, task=task, label_noise=label_noise, image_size=image_size, prompt=prompt,
                   answer_column=answer_column) for p in spec.parts]
    mixed = [r for i in range(max(map(len, loaded))) for part in loaded if i < len(part) for r in [part[i]]]
    return _loaded(mixed, [sk for part in loaded for sk in part.skipped], limit)
  if spec.sliced:
    recs = load(dataclasses.replace(spec, start=None, stop=None), seed=seed, limit=spec.stop if spec.start is None
                and spec.stop is not None and spec.stop >= 0 else None, image_root=image_root,
                skip_bad_records=skip_bad_records, tfds_dir=tfds_dir, label_names=label_names, task=task,
                label_noise=label_noise, image_size=image_size, prompt=prompt, answer_column=answer_column)
    return _loaded(recs[spec.start:spec.stop], recs.skipped, limit)
  problem = check(spec, tfds_dir=tfds_dir)
  if problem:
    raise FileNotFoundError(problem)
  if spec.kind == "synthetic":
    split = spec.split or "train"
    recs = builtin.load_synthetic(int(spec.path), split, seed=seed, label_noise=label_noise if split == "train"
                                  else 0.0)
    return _loaded(recs, limit=limit)
  if spec.kind == "builtin" and spec.path in digit_tasks.SPLITS:
    return _loaded(digit_tasks.load(spec.path, seed=seed, limit=limit, image_size=image_size,
                                    label_noise=label_noise if spec.path.endswith("_train") else 0.0))
  if spec.kind == "builtin":
    return _loaded(builtin.load_builtin(spec.path, seed=seed, limit=limit, label_noise=label_noise
                                        if spec.path == "train" else 0.0, image_size=image_size))
  if spec.kind == "json":
    res = read_paper_json(spec.path, image_root=image_root or None, task=task, skip_bad_records=skip_bad_records)
  elif spec.kind == "tfds":
    from dcsft_jax.data import tfds_source
    res = tfds_source.read_tfds(spec.path, split=spec.split or "train", data_dir=tfds_dir,
                                label_names=label_names or None, limit=limit, skip_bad_records=skip_bad_records)
  else:
    res = read_hf_dataset(spec.path, answer_column=answer_column, task=task or "classification",
                          prompt=prompt or builtin.PROMPT, split=spec.split, image_root=image_root or None,
                          skip_bad_records=skip_bad_records)
  return _loaded(list(res), getattr(res, "skipped", ()), limit)
