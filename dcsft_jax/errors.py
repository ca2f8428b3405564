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


# Set by `cli` while it runs: where the trace goes, and the terminal's stderr once `divert_stderr` has
# sent fd 2 to that log.
_LOG: Callable[[], str | None] | None = None
_TERMINAL: int | None = None


def divert_stderr() -> None:
  """From now on, what libraries write to stderr goes to the run's error log, not the terminal; `cli`
  still prints its one line on the terminal. For a failure that leaves a library's threads running:
  Orbax's reads of a damaged checkpoint keep completing into a closed event loop, and each one prints
  a traceback, before and after the failure is said. Nothing outside `cli` (or with --verbose)."""
  global _TERMINAL
  if _LOG is None or _TERMINAL is not None:
    return
  path = _LOG() or default_log()
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  except OSError:
    return
  sys.stderr.flush()
  _TERMINAL = os.dup(2)
  os.dup2(fd, 2)
  os.close(fd)


@contextlib.contextmanager
def stderr_to_log_while():
  """Within the block, stderr goes to the run's log (`divert_stderr`); when the block ends normally it
  comes back to the terminal, and after an exception it stays in the log: a library's stray threads
  can print before the exception reaches any handler."""
  if _LOG is None or _TERMINAL is not None:
    yield
    return
  divert_stderr()
  yield
  _undivert()


def _undivert() -> None:
  global _TERMINAL
  if _TERMINAL is None:
    return
  sys.stderr.flush()
  os.dup2(_TERMINAL, 2)
  os.close(_TERMINAL)
  _TERMINAL = None


def cli(name: str, fn: Callable[[], object], *, log: Callable[[], str | None] = lambda: None,
        verbose: bool = False) -> object:
  """Runs fn(); a user-fixable failure becomes one line on stderr and exit status 1. `log()` gives
  the trace's file (called after the failure: a run knows its workdir only once its config is read)."""
  global _LOG
  _LOG = None if verbose else log
  try:
    return fn()
  except USER_ERRORS as e:
    if not is_user_error(e):
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
    sys.exit(1)


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
