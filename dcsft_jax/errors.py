"""Failures a user can fix, said in one line.

`UserError` is raised where the fix is known: its message names the file, record, key or directory
and the fix (the `--config.restart_stage`, the install command, a key's valid values). The entry
points (`main`, `convert`, `generate`, `aot`) run under `cli`, which prints such a failure as one line
on stderr and exits 1, and writes the whole trace to a log (WORKDIR/logs/errors.log for a run, else
~/.cache/dcsft_jax/errors.log), or to stderr with `--verbose`. ValueErrors and missing files raised
by the project's own code are the same kind of failure (a bad input, said by the code that read it);
raised inside a library (JAX, Orbax, transformers), they are unexpected, as is anything else, and
keep their traceback.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import sysconfig
import traceback
from typing import Callable

# What an entry point reports in one line: the project's own errors about inputs and settings.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
               PermissionError)


class UserError(ValueError):
  """A failure the user can fix; the message names what is wrong and the fix."""


class CheckpointSaveFailed(RuntimeError):
  """A checkpoint could not be written (a full disk, a quota, a lost mount). Its message is one line:
  the folder, the cause and what to do; Orbax's trace goes to logs/checkpoint_errors.log."""


PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
# Installed libraries, which may live under the standard library's folder (a Python without a venv).
LIBRARIES = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")})


def _stdlib(name: str) -> bool:
  path = os.path.abspath(name)
  return name.startswith("<frozen ") or (path.startswith(STDLIB) and not path.startswith(LIBRARIES))


def is_user_error(e: BaseException) -> bool:
  """A UserError, or one of USER_ERRORS raised by the project's own code: the innermost frame outside
  Python's standard library (os.makedirs, json.load: the project's call) is in the package."""
  if isinstance(e, UserError):
    return True
  if not isinstance(e, USER_ERRORS):
    return False
  files = [f.filename for f in traceback.extract_tb(e.__traceback__)]
  for name in reversed(files):
    if not _stdlib(name):
      return os.path.abspath(name).startswith(PACKAGE)
  return True


def default_log() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dcsft_jax", "errors.log")


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)) \
      and getattr(e, "filename", None) and str(e.filename) not in text:
    text = f"{text}: {e.filename}"
  return text


def write_trace(path: str, what: str) -> str | None:
  """Appends the current exception's trace to `path`; the path written, or None if it cannot be."""
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {what}\n")
      f.write(traceback.format_exc())
    return path
  except OSError:
    return None


# While `cli` runs (not with --verbose): _ACTIVE. While stderr is held (`stderr_held`): the terminal's
# stderr (_TERMINAL) and the temporary file that fd 2 writes to meanwhile (_HELD).
_ACTIVE = False
_TERMINAL: int | None = None
_HELD = None


@contextlib.contextmanager
def stderr_held():
  """Within the block, what is written to stderr (fd 2, threads and C++ included) is held in a temporary
  file. When the block ends normally it comes back out on stderr, in order, and stderr is the terminal
  again; after an exception it stays held, and `cli` moves it into the run's error log with the trace,
  then sends the rest of the process's stderr there. For a failure that leaves a library's threads
  running: Orbax's reads of a damaged checkpoint keep completing into a closed event loop, each printing
  a traceback, before and after the failure reaches any handler. Nothing outside `cli` (or with
  --verbose), and nothing written in the workdir unless the run fails."""
  global _TERMINAL, _HELD
  if not _ACTIVE or _TERMINAL is not None:
    yield
    return
  import tempfile
  sys.stderr.flush()
  _HELD = tempfile.TemporaryFile()
  _TERMINAL = os.dup(2)
  os.dup2(_HELD.fileno(), 2)
  yield
  _restore_terminal()


def _restore_terminal() -> None:
  """stderr back to the terminal, and what was held written out on it."""
  global _TERMINAL, _HELD
  if _TERMINAL is None:
    return
  sys.stderr.flush()
  os.dup2(_TERMINAL, 2)
  os.close(_TERMINAL)
  _TERMINAL = None
  if _HELD is not None:
    _HELD.seek(0)
    held, _HELD = _HELD.read(), None
    if held:
      os.write(2, held)


def _release_held(path: str | None) -> None:
  """After a failure: what stderr_held kept goes to the log at `path` (when there is one)."""
  global _HELD
  if _HELD is None:
    return
  sys.stderr.flush()
  _HELD.seek(0)
  held, _HELD = _HELD.read(), None
  if held and path:
    try:
      with open(path, "ab") as f:
        f.write(held)
    except OSError:
      pass


def cli(name: str, fn: Callable[[], object], *, log: Callable[[], str | None] = lambda: None,
        verbose: bool = False) -> object:
  """Runs fn(); a user-fixable failure becomes one line on stderr and exit status 1. `log()` gives
  the trace's file (called after the failure: a run knows its workdir only once its config is read)."""
  global _ACTIVE
  _ACTIVE = not verbose
  try:
    return fn()
  except USER_ERRORS as e:
    if not is_user_error(e):
      _restore_terminal()          # an unexpected failure keeps its traceback, on the terminal
      raise
    if verbose:
      traceback.print_exc()
      where = None
    else:
      where = write_trace(log() or default_log(), f"{name} {' '.join(sys.argv[1:])}")
    msg = f"{name}: error: {one_line(e)}"
    if where:
      msg += f" (trace: {where})"
    sys.stderr.flush()
    os.write(2 if _TERMINAL is None else _TERMINAL, (msg + "\n").encode())
    if where:
      _rest_to(where)
      _release_held(where)
    else:                              # no log to hold it in: nothing is dropped
      _restore_terminal()
    sys.exit(1)
  except BaseException:
    _restore_terminal()
    raise


def _rest_to(path: str) -> None:
  """Sends whatever is written to stderr from here on to the log: a failed read leaves a library's
  abandoned tasks (Orbax's async reads of a damaged checkpoint) that complain at interpreter exit."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
  except OSError:
    return
  sys.stderr.flush()
  os.dup2(fd, 2)
  os.close(fd)
