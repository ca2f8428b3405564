"""TFDS sources: ImageNet-style classification sets (imagenet2012, imagenet_r, imagenet_a, ...) and
RefCOCO grounding, read from a user's prepared TFDS `data_dir`.

Reading goes through TFDS data sources (array_record files), which need no TensorFlow. Images stay
encoded (bytes) in the records until a batch decodes them. The record layout follows the features,
not the name: an `image` with a ClassLabel `label` gives classification records; `objects` with
`bbox` and `refexp` gives one grounding record per referring expression.
"""
from __future__ import annotations

import collections
import io
import os
import re
from typing import Any, Iterable, Mapping

from PIL import Image

from dcsft_jax import optional
from dcsft_jax.data.records import BadRecord, ReadResult, Record, format_box

CLASSIFICATION_PROMPT = "Please provide the object name in the image. Output the answer using one word."
GROUNDING_PROMPT = ('Locate the object described as "{expression}" in the image and output its bounding box '
                    "as [x1, y1, x2, y2].")
_WNID = re.compile(r"^n\d{8}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def label_map_from_records(records: Iterable[Record]) -> dict[str, str]:
  """WordNet id -> answer word, from records whose image path has a WordNet-id directory, as the
  paper's files do (/data/dataset/Imagenet/val/n04355338/... -> 'sundial')."""
  votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for r in records:
    path = r.meta.get("original_image", r.image) if isinstance(r.meta, dict) else r.image
    if isinstance(path, str):
      for part in reversed(path.replace("\\", "/").split("/")):
        if _WNID.match(part):
          votes[part][r.answer] += 1
          break
  return {wnid: c.most_common(1)[0][0] for wnid, c in votes.items()}


def _version_dir(data_dir: str, name: str) -> str:
  root = os.path.join(os.path.expanduser(data_dir), name)
  versions = sorted((tuple(int(x) for x in v.split(".")), v) for v in (os.listdir(root) if os.path.isdir(root) else [])
                    if _VERSION.match(v))
  if not versions:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared under {data_dir} (no {root}/<version>/). Prepare it with "
        f"`tfds build {name.split('/')[0]} --data_dir={data_dir} --file_format=array_record`.")
  return os.path.join(root, versions[-1][1])


def _open(name: str, split: str, data_dir: str, decoders):
  tfds = optional.require("tensorflow_datasets", f"the TFDS source {name!r}")
  path = _version_dir(data_dir, name)
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f"TFDS dataset {name!r} at {path} has no split {split!r}; it has {sorted(builder.info.splits)}")
  try:
    return builder, builder.as_data_source(split=split, decoders=decoders)
  except Exception as e:  # TFDS raises several types when the files are TFRecords
    raise ValueError(
        f"cannot read TFDS dataset {name!r} at {path} as a data source ({e}). dcsft_jax reads array_record "
        f"datasets; convert this one with `tfds convert_format --dataset_dir={path} "
        f"--out_file_format=array_record`.") from e


def _label_words(names: list[str], label_names, name: str) -> list[str]:
  if label_names is None:
    if names and all(_WNID.match(n) for n in names):
      raise ValueError(f"the labels of TFDS dataset {name!r} are WordNet ids ({names[0]}, ...); pass label_names "
                       "(a dict or JSON file of id -> word, e.g. label_map_from_records(read_paper_json(...)))")
    return list(names)
  if isinstance(label_names, (str, os.PathLike)):
    import json
    with open(label_names) as f:
      label_names = json.load(f)
  if isinstance(label_names, Mapping):
    return [label_names.get(n, label_names.get(str(i))) for i, n in enumerate(names)]
  return list(label_names)


def read_tfds(name: str, *, split: str, data_dir: str, label_names: Any = None,
              prompt: str = CLASSIFICATION_PROMPT, grounding_prompt: str = GROUNDING_PROMPT,
              limit: int | None = None, skip_bad_records: bool = False) -> ReadResult:
  """Records of split `split` of TFDS dataset `name` (e.g. 'imagenet_r', 'ref_coco/refcoco_unc').

  label_names: for classification, maps the ClassLabel names (ImageNet's WordNet ids) to answer
  words: a dict, a JSON file, or a list indexed by label. Classes without a word are skipped and
  counted (the paper's OOD sets keep only one-word class names).
  """
  import tensorflow_datasets as tfds
  source = f"tfds:{name}[{split}]"
  probe = tfds.builder_from_directory(_version_dir(data_dir, name))
  feats = probe.info.features
  if "objects" in feats and "refexp" in feats["objects"].feature:
    decoders = {"image": tfds.decode.SkipDecoding()}
    if "mask" in feats["objects"].feature:
      decoders["objects"] = {"mask": tfds.decode.SkipDecoding()}
    _, ds = _open(name, split, data_dir, decoders)
    return _grounding(ds, source, name, split, grounding_prompt, limit, skip_bad_records)
  if "image" in feats and "label" in feats and isinstance(feats["label"], tfds.features.ClassLabel):
    words = _label_words(feats["label"].names, label_names, name)
    _, ds = _open(name, split, data_dir, {"image": tfds.decode.SkipDecoding()})
    return _classification(ds, source, name, split, words, prompt, limit, skip_bad_records)
  raise ValueError(f"TFDS dataset {name!r} has features {sorted(feats.keys())}: neither image+ClassLabel "
                   "(classification) nor objects/refexp (grounding)")


def _finish(source, records, bad, skip_bad_records, selected_out=()) -> ReadResult:
  """Bad examples raise unless skipping; `selected_out` (e.g. classes without a word) are counted only."""
  if bad and not skip_bad_records:
    index, reason = bad[0]
    raise BadRecord(source, index, reason, "fix the dataset, or set skip_bad_records to skip (and count) such "
                    "records")
  return ReadResult(records, list(bad) + list(selected_out), source)


def _classification(ds, source, name, split, words, prompt, limit, skip_bad_records) -> ReadResult:
  records, skipped, unnamed = [], [], []
  n = len(ds) if limit is None else min(limit, len(ds))
  for i in range(n):
    ex = ds[i]
    label = int(ex["label"])
    word = words[label] if 0 <= label < len(words) else None
    if not word:
      unnamed.append((i, f"label {label} has no answer word in label_names"))
      continue
    image = ex["image"]
    if not isinstance(image, (bytes, bytearray)) or not image:
      skipped.append((i, "the image is empty"))
      continue
    fname = ex.get("file_name", b"")
    fname = fname.decode() if isinstance(fname, bytes) else str(fname)
    records.append(Record(id=f"{name}/{split}/{i}", image=bytes(image), prompt=prompt, answer=word,
                          task="classification", meta={"source": source, "index": i, "label": label,
                                                        "file_name": fname}))
  # Classes without a word are a selection the user asked for (the paper keeps one-word names), not bad records.
  return _finish(source, records, skipped, skip_bad_records, selected_out=unnamed)


def _grounding(ds, source, name, split, grounding_prompt, limit, skip_bad_records) -> ReadResult:
  records, skipped = [], []
  n = len(ds) if limit is None else min(limit, len(ds))
  for i in range(n):
    ex = ds[i]
    image = bytes(ex["image"])
    try:
      with Image.open(io.BytesIO(image)) as f:
        w, h = f.size
    except Exception as e:  # pylint: disable=broad-except
      skipped.append((i, f"the image cannot be read ({e})"))
      continue
    objs = ex["objects"]
    image_id = int(ex.get("image/id", i))
    for o, box in enumerate(objs["bbox"]):
      ymin, xmin, ymax, xmax = (float(v) for v in box)   # TFDS boxes are normalised (ymin, xmin, ymax, xmax)
      pixel = [xmin * w, ymin * h, xmax * w, ymax * h]
      # TFDS gives a Sequence of dicts column-wise; RefCOCO nests a list of expressions per object.
      raws, ids = objs["refexp"]["raw"][o], objs["refexp"]["refexp_id"][o]
      if isinstance(raws, (bytes, str)):
        raws, ids = [raws], [ids]
      for raw, rid in zip(raws, ids):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not text.strip():
          skipped.append((i, f"object {o} has an empty referring expression"))
          continue
        records.append(Record(id=f"{name}/{split}/{image_id}/{int(rid)}", image=image,
                              prompt=grounding_prompt.format(expression=text.strip()),
                              answer=format_box([round(v) for v in pixel]),
                              task="grounding", meta={"source": source, "index": i, "box": pixel,
                                                      "image_size": (w, h)}))
  return _finish(source, records, skipped, skip_bad_records)
