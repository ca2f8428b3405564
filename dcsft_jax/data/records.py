"""The one example type (`Record`) and the readers/writers that turn data files into it.

Every source (the paper's JSON files, HF datasets) becomes a list of `Record`s; everything
downstream (processor, sampler, verifier, curation) only ever sees `Record`s.

The paper's repo ships two JSON layouts, both a top-level list of dicts (NOTES.md §2.1):
  (a) ms-swift SFT:   {"messages": [{"role": "user", "content": "<image>question"},
                                    {"role": "assistant", "content": "label"}],
                       "images": ["/data/dataset/Imagenet/train/n0.../x.JPEG"]}
  (b) GRPO / test:    {"problem": "question", "solution": "label", "image": "/data/dataset/..."}
`read_paper_json` detects the layout per record, so a file may even mix them.

Ids. The files carry no ids, yet the difficulty buckets (easy/medium/hard) must be matched against
the full `left` set and the scores file, whatever file a sample came from and wherever its images
live now. So the default id is derived from the record's content, never from its position:
  * the image path as written in the file (before any `image_root` remapping);
  * plus `#` and 10 hex digits of sha1(prompt) for non-classification tasks, because grounding
    has several referring expressions per image;
  * plus `~k` for the k-th repeat of an id within one file (duplicated rows stay distinct);
  * `{file stem}:{index}` for text-only records (no image).
A record's own `id` key, if present, wins. `write_swift_json` writes `id` (and `task`) only when
the reader could not derive the same value again, so curated files stay byte-compatible with the
paper's ms-swift format in the common case.

`meta` holds provenance (source file, index, layout, original image path, system prompt) and is
excluded from `==`: the same sample read from `imagenet_left_sft.json` and `imagenet_left_grpo.json`
is the same record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, Sequence, Union

from PIL import Image

from dcsft_jax import atomic, optional

TASKS = ("classification", "grounding", "reasoning")
IMAGE_TOKEN = "<image>"
ImageRoot = Union[str, os.PathLike, tuple[str, str], None]

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the Record type
@dataclasses.dataclass(frozen=True)
class Record:
  """One example: an image (or none), a question, the reference answer, the task that scores it.

  `image` is a path (str), an already decoded PIL image (HF datasets decode images themselves), or
  the encoded bytes of an image file (TFDS sources keep images encoded until a batch needs them).
  Raises ValueError on a malformed record; readers turn that into `BadRecord` naming file + index.
  """
  id: str
  image: Union[str, Image.Image, None]
  prompt: str
  answer: str
  task: str
  meta: dict = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    if not isinstance(self.id, str) or not self.id:
      raise ValueError(f"id must be a non-empty string, got {self.id!r}")
    if isinstance(self.image, os.PathLike):
      object.__setattr__(self, "image", os.fspath(self.image))  # frozen: coerce once, here
    if not (self.image is None or isinstance(self.image, (str, bytes, Image.Image))):
      raise ValueError(f"image must be a path, encoded bytes, a PIL image or None, got {type(self.image).__name__}")
    if isinstance(self.image, str) and not self.image:
      raise ValueError("image path is empty")
    if not isinstance(self.prompt, str):
      raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
    if not isinstance(self.answer, str):
      raise ValueError(f"answer must be a string, got {type(self.answer).__name__}")
    if not self.answer.strip():
      raise ValueError("answer is empty")
    if self.task not in TASKS:
      raise ValueError(f"unknown task {self.task!r} (expected one of {', '.join(TASKS)})")
    if self.meta is None:
      object.__setattr__(self, "meta", {})
    if not isinstance(self.meta, dict):
      raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")


class BadRecord(ValueError):
  """A record (or a whole file) that cannot become a `Record`; the message says where, why, and the fix."""

  def __init__(self, source: str, index: int | None, reason: str, fix: str, record_id: str | None = None):
    self.source, self.index, self.reason, self.fix, self.record_id = source, index, reason, fix, record_id
    where = source if index is None else f"{source}: record {index}"
    if record_id is not None:
      where += f" (id {record_id!r})"
    super().__init__(f"{where}: {reason}. Fix: {fix}")


@dataclasses.dataclass
class ReadResult:
  """What a reader returns: the records, and every skipped record as (index, reason). Nothing is dropped silently."""
  records: list[Record]
  skipped: list[tuple[int, str]]
  source: str

  def __len__(self) -> int:
    return len(self.records)

  def __iter__(self) -> Iterator[Record]:
    return iter(self.records)

  def __getitem__(self, i):
    return self.records[i]


# ----------------------------------------------------------------------------- answers and tasks
_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_BOX = re.compile(rf"[\[(]\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\])]")


def parse_box(text: str, *, strict: bool = False) -> tuple[float, float, float, float] | None:
  """The first box "[x1, y1, x2, y2]" (or with parentheses) in `text`, as floats; None if there is none.

  strict=True: the whole text (whitespace and a trailing '.' stripped) must be the box; used for
  task inference, so a reasoning answer that merely mentions four numbers is not a grounding one.
  Lenient mode finds a box inside model output such as '{"bbox_2d": [1, 2, 3, 4]}'.
  Boxes with x2 < x1 or y2 < y1 are not boxes (None): every consumer would score them wrong anyway.
  """
  if not isinstance(text, str):
    return None
  s = text.strip()
  if strict:
    s = s.rstrip(".").strip()
    m = _BOX.fullmatch(s)
  else:
    m = _BOX.search(s)
  if m is None:
    return None
  x1, y1, x2, y2 = (float(g) for g in m.groups())
  if x2 < x1 or y2 < y1:
    return None
  return x1, y1, x2, y2


def format_box(box: Sequence[float]) -> str:
  """The paper's integer box text, "[x1, y1, x2, y2]": infer/sample.py rewrites grounding answers with
  int(x), which truncates (toward zero) rather than rounds."""
  return "[" + ", ".join(str(int(v)) for v in box) + "]"


_OPTION_ANSWER = re.compile(r"\(?[A-Ha-h]\)?[.:]?")
_OPTIONS_IN_PROMPT = re.compile(r"(?:^|[\s(])\(?[A-H][.):]\s")
_NUMBER_ANSWER = re.compile(rf"{_NUM}(?:\s*/\s*\d+)?%?")


def infer_task(prompt: str, answer: str) -> str:
  """grounding if the answer is a box; reasoning if it is a choice letter (with options in the
  prompt), a number, LaTeX or a chain of thought; classification otherwise (a label).

  Numbers count as reasoning because no classification label in the paper is numeric.
  """
  a = answer.strip()
  if parse_box(a, strict=True) is not None:
    return "grounding"
  if _OPTION_ANSWER.fullmatch(a) and len(_OPTIONS_IN_PROMPT.findall(prompt)) >= 2:
    return "reasoning"
  if _NUMBER_ANSWER.fullmatch(a) or "\\" in a or "$" in a or "<think>" in a or "\n" in a:
    return "reasoning"
  return "classification"


def default_id(image_path: str | None, prompt: str, task: str, *, source: str, index: int) -> str:
  """The content-derived id described in the module docstring (without the `~k` repeat suffix)."""
  if image_path is None:
    return f"{os.path.splitext(os.path.basename(source))[0]}:{index}"
  if task == "classification":
    return image_path
  return f"{image_path}#{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- image paths
def _under(path: str, prefix: str) -> bool:
  # Component-wise: "/data/dataset/Imagenet" must not match "/data/dataset/Imagenet-A/...".
  prefix = prefix.rstrip("/")
  return path == prefix or path.startswith(prefix + "/")


def _common_dir(paths: list[str]) -> str | None:
  absolute = [p for p in paths if os.path.isabs(p)]
  if not absolute:
    return None
  return os.path.commonpath([os.path.dirname(p) for p in absolute])


def remap_image(path: str, image_root: ImageRoot, common_dir: str | None) -> str:
  """Where an image really is. The rule for `image_root`:

  * None: the path is used as written.
  * (old_prefix, new_prefix): absolute paths under old_prefix (whole path components) get it
    replaced by new_prefix; any other absolute path is an error. This is the rule to put in
    configs: e.g. ("/data/dataset", "/mnt/imagenet_copy") serves every file of the paper at once.
  * a directory: the longest common directory of all absolute image paths in the same file is
    replaced by it, so image_root holds the tree below that directory (for
    imagenet_left_grpo.json: /data/dataset/Imagenet/train -> image_root/n04355338/...). Handy
    for one file; note the common directory depends on the file's contents (a one-class file has
    a deeper one), so use the pair form when several files share one tree.
  Relative paths are joined to the directory (or to new_prefix).
  """
  if image_root is None:
    return path
  if isinstance(image_root, tuple):
    if len(image_root) != 2:
      raise ValueError(f"image_root pair must be (old_prefix, new_prefix), got {image_root!r}")
    old, new = (os.fspath(p) for p in image_root)
    if not os.path.isabs(path):
      return os.path.join(new, path)
    if not _under(path, old):
      raise ValueError(f"image path {path!r} is not under the old prefix {old!r}")
    return os.path.join(new, os.path.relpath(path, old)) if path != old.rstrip("/") else new
  root = os.fspath(image_root)
  if not os.path.isabs(path) or common_dir is None:
    return os.path.join(root, path)
  return os.path.join(root, os.path.relpath(path, common_dir))


# ----------------------------------------------------------------------------- the paper's JSON
_FIX_SWIFT = ('each record must be {"messages": [{"role": "user", "content": "<image>question"}, '
              '{"role": "assistant", "content": "answer"}], "images": ["path"]} '
              'or {"problem": "question", "solution": "answer", "image": "path"}')


class _Bad(Exception):
  """Internal: a per-record problem, turned into BadRecord (with file and index) by the reader."""

  def __init__(self, reason: str, fix: str = _FIX_SWIFT):
    super().__init__(reason)
    self.reason, self.fix = reason, fix


def _one_image(value: Any, key: str) -> str | None:
  if value is None:
    return None
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    if not value:
      return None
    if len(value) > 1:
      raise _Bad(f"{len(value)} images; a Record holds one", "split the record or keep one image")
    if isinstance(value[0], str):
      return value[0]
    if isinstance(value[0], dict) and isinstance(value[0].get("path"), str):  # ms-swift also allows {"path": ...}
      return value[0]["path"]
  raise _Bad(f"{key!r} must be a path or a list of one path, got {type(value).__name__}")


def _parse_paper_record(rec: Any) -> dict[str, Any]:
  """One raw dict -> the Record fields (prompt with <image> removed, answer, image as written)."""
  if not isinstance(rec, dict):
    raise _Bad(f"record is a {type(rec).__name__}, not an object")
  meta: dict[str, Any] = {}
  if "messages" in rec:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
      raise _Bad("'messages' must be a list of {role, content} objects")
    for m in msgs:
      if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise _Bad(f"a message lacks a string 'role' or 'content': {m!r}")
    if msgs and msgs[0]["role"] == "system":
      meta["system"] = msgs[0]["content"]
      msgs = msgs[1:]
    roles = [m["role"] for m in msgs]
    if roles == ["user", "assistant"]:
      user, answer = msgs[0]["content"], msgs[1]["content"]
    elif roles == ["user"] and isinstance(rec.get("solution"), str):  # ms-swift GRPO in messages form
      user, answer = msgs[0]["content"], rec["solution"]
    else:
      raise _Bad(f"messages have roles {roles}; expected one user turn then one assistant turn",
                 "multi-turn records are not supported; keep the last user/assistant pair")
    image = _one_image(rec.get("images"), "images")
    layout = "messages"
  elif "problem" in rec or "solution" in rec:
    user, answer = rec.get("problem"), rec.get("solution")
    if not isinstance(user, str):
      raise _Bad(f"'problem' must be a string, got {type(user).__name__}")
    if not isinstance(answer, str):
      raise _Bad(f"'solution' must be a string, got {type(answer).__name__}")
    image = _one_image(rec.get("image", rec.get("images")), "image")
    layout = "problem"
  else:
    raise _Bad(f"neither 'messages' nor 'problem'/'solution' keys (keys: {sorted(rec)})")
  n_tags = user.count(IMAGE_TOKEN)
  if layout == "messages" and n_tags != (image is not None):
    raise _Bad(f"{n_tags} {IMAGE_TOKEN} tags in the user turn but {int(image is not None)} images",
               f"put exactly one {IMAGE_TOKEN} in the user turn per image (ms-swift requires it)")
  if not answer.strip():
    raise _Bad("answer is empty", "drop the record or fill in its reference answer")
  for name, text in (("user turn", user), ("answer", answer)):
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:   # a lone surrogate ("\ud800" in the JSON): no tokenizer takes it
      raise _Bad(f"the {name} is not valid Unicode ({e.reason} at character {e.start}: {text[e.start]!r})",
                 "re-encode the text as UTF-8 (an escape like \\ud800 without its pair is a broken character)") from None
  task = rec.get("task")
  if task is not None and task not in TASKS:
    raise _Bad(f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
  meta["layout"] = layout
  return dict(id=rec.get("id"), image=image, prompt=user.replace(IMAGE_TOKEN, "").strip(), answer=answer,
              task=task, meta=meta)


def _check_task_arg(task: str | None):
  if task is not None and task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)} or None (infer per record)")


def _finish(source: str, raw: Iterable[tuple[int, Any]], parse, *, image_root: ImageRoot, task: str | None,
            skip_bad_records: bool, common_dir: str | None) -> ReadResult:
  """Shared tail of the readers: parse, remap, infer task, derive ids, validate; skip or raise."""
  records: list[Record] = []
  skipped: list[tuple[int, str]] = []
  seen: dict[str, int] = {}
  for i, rec in raw:
    rid = None
    try:
      f = parse(rec)
      rid = f["id"]
      if rid is not None and not isinstance(rid, str):
        raise _Bad(f"'id' must be a string, got {type(rid).__name__}")
      t = task or f["task"] or infer_task(f["prompt"], f["answer"])
      image, meta = f["image"], dict(f["meta"], source=source, index=i)
      if isinstance(image, str):
        meta["original_image"] = image
      if rid is None:  # before remapping: ids must not depend on where the images live now
        rid = default_id(meta.get("original_image"), f["prompt"], t, source=source, index=i)
        k = seen.get(rid, 0)
        seen[rid] = k + 1
        if k:
          rid = f"{rid}~{k}"
      if isinstance(image, str):
        try:
          image = remap_image(image, image_root, common_dir)
        except ValueError as e:
          raise _Bad(str(e), "pass image_root=(old_prefix, new_prefix) with an old_prefix that covers every image")
      try:
        records.append(Record(id=rid, image=image, prompt=f["prompt"], answer=f["answer"], task=t, meta=meta))
      except ValueError as e:
        raise _Bad(str(e), "fix the record's fields")
    except _Bad as e:
      if not skip_bad_records:
        raise BadRecord(source, i, e.reason, e.fix + " (or pass skip_bad_records=True to skip such records)",
                        record_id=rid) from None
      skipped.append((i, e.reason))
  if skipped:
    _log.warning("%s: skipped %d bad record(s) of %d; first: %s", source, len(skipped),
                 len(records) + len(skipped), "; ".join(f"#{i}: {r}" for i, r in skipped[:3]))
  return ReadResult(records=records, skipped=skipped, source=source)


def read_paper_json(path: str | os.PathLike, *, image_root: ImageRoot = None, task: str | None = None,
                    skip_bad_records: bool = False) -> ReadResult:
  """Read one of the paper's JSON files (either layout, see the module docstring) into Records.

  image_root: see `remap_image` (None, a directory, or an (old_prefix, new_prefix) pair).
  task: forces the task of every record; None infers it per record (`infer_task`) unless the
    record has its own "task" key.
  skip_bad_records: False raises BadRecord at the first bad record; True skips bad records and
    lists them in `.skipped` (and logs a warning). A file that is not a JSON list always raises.
  """
  _check_task_arg(task)
  source = os.fspath(path)
  try:
    with open(source, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise BadRecord(source, None, f"not valid JSON ({e})", "the file must be one JSON list of records") from None
  except UnicodeDecodeError as e:
    raise BadRecord(source, None, f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                    "save the file as UTF-8 JSON") from None
  if not isinstance(data, list):
    raise BadRecord(source, None, f"top level is a {type(data).__name__}, not a list",
                    "the file must be one JSON list of records (JSONL is not the paper's format)")
  common = None
  if image_root is not None and not isinstance(image_root, tuple):
    paths = []
    for rec in data:  # a pre-pass over whatever paths parse; bad records are reported in the main pass
      try:
        p = _parse_paper_record(rec)["image"]
      except _Bad:
        continue
      if p is not None:
        paths.append(p)
    common = _common_dir(paths)
  return _finish(source, enumerate(data), _parse_paper_record, image_root=image_root, task=task,
                 skip_bad_records=skip_bad_records, common_dir=common)


def write_swift_json(records: Iterable[Record], path: str | os.PathLike) -> int:
  """Write records in the paper's ms-swift messages/images layout, atomically; returns the count.

  Grounding answers are written as integer boxes "[x1, y1, x2, y2]" (as the paper's sample.py
  does). `id`/`task` keys are added only where `read_paper_json` would not derive them again, so
  reading the file back gives equal records. Images must be paths: a PIL image has no place in JSON.
  """
  path = os.fspath(path)
  out = []
  for n, r in enumerate(records):
    if isinstance(r.image, Image.Image):
      raise ValueError(f"record {n} (id {r.id!r}) has an in-memory PIL image; save it to a file and "
                       f"set Record.image to its path before writing {path}")
    answer = r.answer
    if r.task == "grounding":
      box = parse_box(answer)
      if box is None:
        raise ValueError(f"record {n} (id {r.id!r}) is a grounding record whose answer {answer!r} is not a box")
      answer = format_box(box)
    msgs = [{"role": "system", "content": r.meta["system"]}] if isinstance(r.meta.get("system"), str) else []
    user = (IMAGE_TOKEN if r.image is not None else "") + r.prompt
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    row: dict[str, Any] = {"messages": msgs, "images": [r.image] if r.image is not None else []}
    inferred = infer_task(r.prompt, answer)
    if inferred != r.task:
      row["task"] = r.task
    # Compare with the derived id of the path as written (the reader derives ids before remapping).
    if r.id != default_id(r.image, r.prompt, r.task, source=path, index=n):
      row["id"] = r.id
    out.append(row)
  atomic.write_json(path, out)
  return len(out)


# ----------------------------------------------------------------------------- HF datasets
def _load_hf(path_or_dataset: Any, split: str | None):
  datasets = optional.require("datasets", f"reading {path_or_dataset!r} as a Hugging Face dataset")
  ds = path_or_dataset
  if isinstance(ds, (str, os.PathLike)):
    p = os.fspath(ds)
    if os.path.isdir(p) and (os.path.exists(os.path.join(p, "dataset_info.json"))
                             or os.path.exists(os.path.join(p, "dataset_dict.json"))):
      ds = datasets.load_from_disk(p)  # a dataset saved with save_to_disk
    elif os.path.isdir(p):
      ds = datasets.load_dataset("imagefolder", data_dir=p)
    else:
      ext = p.rsplit(".", 1)[-1].lower()
      builder = {"json": "json", "jsonl": "json", "parquet": "parquet", "arrow": "arrow", "csv": "csv"}.get(ext)
      if builder is None:
        raise ValueError(f"{p}: unknown file type .{ext}; expected a save_to_disk directory, an image folder, "
                         f"or a .json/.jsonl/.parquet/.arrow/.csv file")
      ds = datasets.load_dataset(builder, data_files=p)
  if isinstance(ds, (datasets.DatasetDict, dict)):
    if split is None:
      if len(ds) != 1:
        raise ValueError(f"the dataset has splits {sorted(ds)}; pass split=")
      split = next(iter(ds))
    ds = ds[split]
  elif split is not None and not isinstance(ds, datasets.Dataset):
    raise ValueError(f"cannot take split {split!r} of a {type(ds).__name__}")
  return ds


def read_hf_dataset(path_or_dataset: Any, *, answer_column: str, task: str, image_column: str | None = "image",
                    prompt_column: str | None = None, prompt: str | None = None, id_column: str | None = None,
                    split: str | None = None, image_root: ImageRoot = None,
                    skip_bad_records: bool = False) -> ReadResult:
  """Read an HF dataset (a Dataset/DatasetDict, a save_to_disk dir, an image folder, or a
  json/jsonl/parquet/arrow/csv file) into Records.

  Exactly one of prompt_column (per-row question) and prompt (one question for all rows) is given.
  The image column may hold decoded PIL images (the `Image` feature), {"path", "bytes"} dicts
  (kept as the path if there is one, else decoded) or path strings; image_column=None reads
  text-only data. An image folder's labels are class indices: answer_column="label" gives their names.
  """
  _check_task_arg(task)
  if task is None:
    raise ValueError("read_hf_dataset needs task= (a column of labels does not say how to score it)")
  if (prompt_column is None) == (prompt is None):
    raise ValueError("pass exactly one of prompt_column= and prompt=")
  ds = _load_hf(path_or_dataset, split)
  # In-memory datasets have no file to name; "hf_dataset" also stems the ids of image-less rows.
  source = os.fspath(path_or_dataset) if isinstance(path_or_dataset, (str, os.PathLike)) else "hf_dataset"
  columns = set(ds.column_names)
  for name in (answer_column, image_column, prompt_column, id_column):
    if name is not None and name not in columns:
      raise ValueError(f"{source}: no column {name!r} (columns: {sorted(columns)})")
  # imagefolder labels are ClassLabel ints: report the class name, which is what the model says.
  label_names = getattr(ds.features[answer_column], "names", None)

  def parse(row: dict[str, Any]) -> dict[str, Any]:
    ans = row[answer_column]
    if label_names is not None and isinstance(ans, int):
      ans = label_names[ans]
    if not isinstance(ans, str):
      raise _Bad(f"answer column {answer_column!r} holds a {type(ans).__name__}, not a string",
                 "convert the answers to text before reading")
    q = prompt if prompt is not None else row[prompt_column]
    if not isinstance(q, str):
      raise _Bad(f"prompt column {prompt_column!r} holds a {type(q).__name__}, not a string", "fix the column")
    img = None if image_column is None else row[image_column]
    if isinstance(img, dict):
      if img.get("path"):
        img = img["path"]
      elif img.get("bytes"):
        import io
        img = Image.open(io.BytesIO(img["bytes"]))
      else:
        img = None
    if not (img is None or isinstance(img, (str, Image.Image))):
      raise _Bad(f"image column {image_column!r} holds a {type(img).__name__}", "store paths or images")
    if not ans.strip():
      raise _Bad("answer is empty", "drop the record or fill in its reference answer")
    rid = row[id_column] if id_column is not None else None
    if rid is not None and not isinstance(rid, str):
      rid = str(rid)
    return dict(id=rid, image=img, prompt=q.replace(IMAGE_TOKEN, "").strip(), answer=ans, task=None,
                meta={"layout": "hf"})

  common = None
  if image_root is not None and not isinstance(image_root, tuple) and image_column is not None:
    col = ds[image_column] if not hasattr(ds.features[image_column], "decode") else []
    common = _common_dir([p for p in col if isinstance(p, str)])
  return _finish(source, enumerate(ds), parse, image_root=image_root, task=task,
                 skip_bad_records=skip_bad_records, common_dir=common)
