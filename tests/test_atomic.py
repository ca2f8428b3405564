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
