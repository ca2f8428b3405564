"""One process of the pipeline (`python -m dcsft_jax.main ARGS`), recording what it writes: every
path under the workdir that Python opens for writing, creates, renames into, or removes, through the
interpreter's audit hooks (PEP 578). Used by tests/test_pipeline_mesh.py to check that the processes
of a multi-host run write only what each should:

  python tests/pipeline_process.py WRITES_JSON --config=... --config.workdir=DIR ...

Files written by native code (Orbax's TensorStore array shards, whose per-process layout is Orbax's)
are not seen; everything the project writes from Python is."""
import atexit
import json
import os
import sys

out, argv = sys.argv[1], sys.argv[2:]
workdir = os.path.abspath(next(a.split("=", 1)[1] for a in argv if a.startswith("--config.workdir=")))
writes: set[str] = set()


def _note(path) -> None:
  if isinstance(path, (str, bytes, os.PathLike)):
    path = os.path.abspath(os.fsdecode(path))
    if path == workdir or path.startswith(workdir + os.sep):
      writes.add(os.path.relpath(path, workdir))


def _hook(event: str, args) -> None:
  if event == "open" and len(args) >= 2:
    path, mode = args[0], args[1]
    flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
        (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
    if writing:
      _note(path)
  elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
    _note(args[1])
  elif event in ("os.remove", "os.unlink", "os.rmdir", "shutil.rmtree", "os.mkdir", "os.truncate"):
    _note(args[0])


def _dump() -> None:
  with open(out, "w") as f:
    json.dump(sorted(writes), f, indent=0)


sys.addaudithook(_hook)
atexit.register(_dump)
sys.argv = ["dcsft_jax.main", *argv]
import runpy  # noqa: E402

runpy.run_module("dcsft_jax.main", run_name="__main__", alter_sys=True)
