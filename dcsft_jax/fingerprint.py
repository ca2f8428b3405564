"""Fingerprints: the settings that made a resumable output (a scoring journal, a training checkpoint),
kept with it, so a resume under other settings stops and names the difference instead of mixing
the two runs' results."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os


def of(settings) -> dict:
  """A JSON-plain dict (dataclasses and tuples included), equal to what a file reads back."""
  return json.loads(json.dumps(settings or {}, sort_keys=True, default=_plain))


def _plain(o):
  if dataclasses.is_dataclass(o) and not isinstance(o, type):
    return dataclasses.asdict(o)
  return str(o)


def check(what: str, had: dict, has: dict, fix: str) -> None:
  """Raises ValueError naming every setting of `what` that differs (`had` made it, `has` is asked)."""
  had, has = _flat(had), _flat(has)
  diff = sorted(k for k in set(had) | set(has) if had.get(k) != has.get(k))
  if diff:
    raise ValueError(f"{what} was started with other settings: "
                     + ", ".join(f"{k} {had.get(k)!r} then, {has.get(k)!r} now" for k in diff) + f". {fix}")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def portable(path: str, root: str) -> str:
  """`path` relative to the workdir `root` when inside it: a workdir moved or mounted elsewhere must
  still resume."""
  path, root = os.path.abspath(path), os.path.abspath(root)
  return os.path.relpath(path, root) if path.startswith(root.rstrip(os.sep) + os.sep) else path


def identity(path: str) -> str | None:
  """What a model directory or a data file is, cheaply: a hash of a file's bytes, or of a directory's
  config.json and its file list with sizes (the weights themselves are not read). None for what is
  not a local path (builtin data, a TFDS name)."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  elif os.path.isdir(path):
    cfg = os.path.join(path, "config.json")
    if os.path.exists(cfg):
      with open(cfg, "rb") as f:
        h.update(f.read())
    for root, dirs, files in sorted(os.walk(path)):
      dirs.sort()
      for fn in sorted(files):
        p = os.path.join(root, fn)
        h.update(f"{os.path.relpath(p, path)}:{os.path.getsize(p)}\n".encode())
  else:
    return None
  return h.hexdigest()[:16]
