"""Fingerprints: the settings that made a resumable output (a scoring journal, a training checkpoint),
kept with it, so a resume under other settings stops and names the difference instead of mixing
the two runs' results."""
from __future__ import annotations

import dataclasses
import json


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
