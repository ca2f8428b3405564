"""What the processes of a multi-host run (jax.distributed) agree on, outside the jitted programs:
a barrier, process 0's text for all, and host-only work that process 0 alone does. With one process
each is the plain thing (no barrier, the text as it is, the call itself)."""
from __future__ import annotations

import builtins
import json
from typing import Any, Callable

import jax
import numpy as np


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (`name` must be the same in all of them)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def broadcast_text(text: str) -> str:
  """Process 0's `text`, on every process (the others' `text` is ignored)."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils
  data = text.encode() if jax.process_index() == 0 else b""
  # Two broadcasts of fixed shapes (every process contributes the same shape): the length, the bytes.
  n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int64)))
  if n == 0:
    return ""
  word = np.frombuffer(data.ljust(n, b"\0"), np.uint8) if jax.process_index() == 0 else np.zeros(n, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(word), np.uint8)).decode(errors="replace")


def on_process_0(fn: Callable[[], Any]) -> Any:
  """fn() on process 0 only (host work that writes shared files: curation, the report), its JSON
  result on every process. If it raises, every process raises: process 0 its own exception, the
  others the same built-in type (else RuntimeError) with its message, so none is left waiting at the
  next collective for a process that has stopped."""
  if jax.process_count() == 1:
    return fn()
  out, error = None, None
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
      error = e
  told = {"result": out} if error is None else {"error": str(error), "type": type(error).__name__}
  said = json.loads(broadcast_text(json.dumps(told, default=str)))
  if error is not None:
    raise error
  if "error" in said:
    kind = getattr(builtins, said["type"], None)
    raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(said["error"])
  return said["result"]


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process must ask, with its own flag)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))).any())
