"""Training metrics to the console, a JSONL file and TensorBoard event files.

The TensorBoard writer speaks the event-file format directly (TFRecord framing with masked CRC32C,
an `Event` protobuf with scalar summaries, encoded by hand), so neither TensorFlow nor tensorboardX
is needed to write what `tensorboard --logdir` reads.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time

import jax


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
  return _field(num, 2, _varint(len(data)) + data)


def encode_event(step: int, wall_time: float, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """tensorflow.Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5 {value=1
  {tag=1, simple_value=2 (float)}}."""
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b"".join(_bytes_field(1, _bytes_field(1, k.encode()) + _field(2, 5, struct.pack("<f", float(v))))
                       for k, v in scalars.items())
    msg += _bytes_field(5, summary)
  return msg


def frame(record: bytes) -> bytes:
  length = struct.pack("<Q", len(record))
  return length + struct.pack("<I", _masked(length)) + record + struct.pack("<I", _masked(record))


def read_records(path: str):
  """The raw records of an event file, CRCs checked (for tests and tools)."""
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked(data[i:i + 8]):
      raise ValueError(f"{path}: corrupt length CRC at byte {i}")
    rec = data[i + 12:i + 12 + n]
    if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != _masked(rec):
      raise ValueError(f"{path}: corrupt record CRC at byte {i}")
    yield rec
    i += 16 + n


class MetricsWriter:
  """Scalars per step to `events.out.tfevents.*` and `metrics.jsonl` in `logdir` (process 0 only)."""

  def __init__(self, logdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.logdir = logdir
    if not self.active:
      return
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, "metrics.jsonl")
    if os.path.exists(path):
      # Steps after the checkpoint we resume from will be run (and logged) again.
      keep = []
      with open(path, encoding="utf-8") as f:
        for line in f:
          try:
            if json.loads(line)["step"] <= resume_step:
              keep.append(line)
          except (json.JSONDecodeError, KeyError):
            break
      with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._tb = open(os.path.join(logdir, name), "ab")
    self._tb.write(frame(encode_event(0, time.time(), file_version="brain.Event:2")))
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    self._tb.write(frame(encode_event(step, time.time(), clean)))
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")

  def flush(self) -> None:
    if self.active:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()
