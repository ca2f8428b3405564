"""Atomic writes: every file and directory the project writes appears whole or not at all.

A temporary file in the target's own directory (same filesystem, so the rename is atomic), synced,
then `os.replace`d over the target. A crash, a kill -9 or a full disk leaves the old file (or none),
never half a file; the temporary is removed on any error. Directories are built beside the target
and renamed into place the same way (`directory`).
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import tempfile
from typing import IO, Iterator


def _file_mode() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
  """`with writer(path) as f: f.write(...)`: `path` is replaced only when the block finishes."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic writer mode must be 'w' or 'wb', not {mode!r}")
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".", suffix=".tmp")
  os.fchmod(fd, _FILE_MODE)          # mkstemp makes 0600; the file gets what open() would give it
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
  with writer(path, "wb") as f:
    f.write(data)
  return os.fspath(path)


def write_text(path: str | os.PathLike, text: str) -> str:
  with writer(path) as f:
    f.write(text)
  return os.fspath(path)


def write_json(path: str | os.PathLike, obj, **kw) -> str:
  kw = {"indent": 2, "ensure_ascii": False, **kw}
  with writer(path) as f:
    json.dump(obj, f, **kw)
  return os.fspath(path)


def temp_name(path: str, tag: str) -> str:
  """A sibling of `path` (same filesystem) that no other process picks: `<path>.<tag>-<pid>`."""
  return f"{os.path.abspath(path).rstrip(os.sep)}.{tag}-{os.getpid()}"


@contextlib.contextmanager
def directory(out_dir: str) -> Iterator[str]:
  """`with directory(out) as tmp:` fill `tmp`; on success it replaces `out` whole.

  On Linux the two are swapped in one atomic rename, so `out` always holds a complete directory, old or
  new; elsewhere the old one is moved aside first (`out.dcsft-old-PID` for the instant between renames)
  and deleted once the new one is in place. On error the partial `tmp` is removed and `out` is
  untouched.
  """
  _remove_abandoned(out_dir)
  tmp = temp_name(out_dir, "dcsft-tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    # The contents reach the disk before the rename that publishes them: after a power cut the
    # directory is the old one or the whole new one, never new names over empty files.
    sync_tree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir) and _exchange(tmp, out_dir):
    shutil.rmtree(tmp, ignore_errors=True)           # tmp now holds the old directory
    return
  old = None
  if os.path.exists(out_dir):
    old = temp_name(out_dir, "dcsft-old")
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(root: str) -> None:
  """fsync every file and directory under `root` (directories last, so their entries are durable)."""
  for d, _, files in os.walk(root, topdown=False):
    for name in files:
      path = os.path.join(d, name)
      if os.path.islink(path):
        continue
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _remove_abandoned(out_dir: str) -> None:
  """Deletes the `out.dcsft-tmp-PID` / `out.dcsft-old-PID` siblings that killed writers left (PID no
  longer alive). The names are this module's own, so a user's `out.old-2024` is never touched."""
  base = os.path.abspath(out_dir).rstrip(os.sep)
  for path in glob.glob(glob.escape(base) + ".dcsft-tmp-*") + glob.glob(glob.escape(base) + ".dcsft-old-*"):
    pid = path.rsplit("-", 1)[-1]
    if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE), so `b` never goes missing;
  False where the OS, the C library or the filesystem cannot (then two renames do it)."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
