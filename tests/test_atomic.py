"""dcsft_jax.atomic: a target is replaced whole or not at all, and nothing is left behind on error."""
import os

import pytest

from dcsft_jax import atomic


def test_write_replaces_whole_and_cleans_up_on_error(tmp_path):
  p = tmp_path / "sub" / "x.json"
  atomic.write_json(p, {"a": 1})
  assert p.read_text() == '{\n  "a": 1\n}'
  with pytest.raises(RuntimeError):
    with atomic.writer(p) as f:
      f.write("half")
      raise RuntimeError("killed")
  assert p.read_text() == '{\n  "a": 1\n}'          # the old file, untouched
  assert os.listdir(p.parent) == ["x.json"]          # no temporary left
  atomic.write_bytes(p, b"new")
  assert p.read_bytes() == b"new" and os.listdir(p.parent) == ["x.json"]


def test_directory_replaces_whole(tmp_path):
  out = tmp_path / "model"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with atomic.directory(str(out)) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").write("new")
      raise RuntimeError("killed")
  assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(out) == ["old.txt"]
  with atomic.directory(str(out)) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("new")
  assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(out) == ["new.txt"]


def test_directory_syncs_every_file_before_publishing(tmp_path, monkeypatch):
  """Each file and folder inside is fsync'ed before the rename that publishes the directory: else a
  power cut could leave the new names over empty files."""
  synced, renamed = [], []
  real_fsync, real_exchange = os.fsync, atomic._exchange
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
  monkeypatch.setattr(atomic, "_exchange", lambda a, b: (renamed.append(len(synced)), real_exchange(a, b))[1])
  out = tmp_path / "model"
  out.mkdir()
  with atomic.directory(str(out)) as tmp:
    os.makedirs(os.path.join(tmp, "params"))
    open(os.path.join(tmp, "params", "a.bin"), "wb").write(b"x" * 10)
    open(os.path.join(tmp, "config.json"), "w").write("{}")
  names = [os.path.relpath(p, tmp) for p in synced]
  assert {"params/a.bin", "config.json", "params", "."} <= set(names), names
  assert renamed == [len(synced)]          # all of them before the swap
  assert (out / "params" / "a.bin").read_bytes() == b"x" * 10
