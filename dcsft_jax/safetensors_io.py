"""Minimal safetensors reading and writing on NumPy, bf16 included.

Reading memory-maps the file, so a tensor (or a slice of it) costs only the pages it touches:
a 7B checkpoint streams onto the mesh without ever being whole in host RAM. Writing is atomic
(temporary file, then rename).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
  """A lazily read .safetensors file: `.keys()`, `.shape(name)`, `.dtype(name)`, `.get(name)`."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n <= 0 or n > size - 8:
          raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
      raise ValueError(f"{path} is not a readable safetensors file ({e}). Re-download or re-export it.") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self.header = header
    self._data_start = 8 + n
    self._size = size
    self._mm = None
    for name, info in header.items():
      b, e = info["data_offsets"]
      if info["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
      if self._data_start + e > size:
        raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")

  def keys(self):
    return self.header.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self.header[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    """A read-only, memory-mapped view of the tensor."""
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    info = self.header[name]
    b, e = info["data_offsets"]
    raw = self._mm[self._data_start + b:self._data_start + e]
    return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def save_file(tensors: dict[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], path: str,
              metadata: dict[str, str] | None = None) -> None:
  items = list(tensors.items() if isinstance(tensors, dict) else tensors)
  header, off = {}, 0
  for name, arr in items:
    arr = np.asarray(arr)
    if arr.dtype not in NAMES:
      raise ValueError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
    header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [off, off + arr.nbytes]}
    off += arr.nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in items:
      f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
  os.replace(tmp, path)
