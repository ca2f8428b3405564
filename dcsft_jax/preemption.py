"""Stopping on a signal, for every stage and trainer: the process's one SIGTERM/SIGINT handler.

A preemption notice is SIGTERM, Ctrl-C is SIGINT. What the handler does depends on where the run is:

- Inside a `saving()` section (a training loop, scoring, evaluation: work that saves as it goes) it
  records the signal. The section asks its `Stop` after each unit of work (a step, a batch), saves
  that unit and raises `Preempted`: exit 128 + the signal, one line saying how to resume (a signal
  during the section's final save raises it as the section ends). Ctrl-C a second time stops at
  once, without the save.
- Anywhere else (loading, compiling, between stages) the process leaves at once with 128 + the
  signal and one line. Out at once rather than by an exception, which a signal can land in the
  middle of any Python code (a garbage-collection callback swallows it); every write is atomic, so
  nothing half-written is kept.

With several processes (jax.distributed) no Python handler is installed: JAX's preemption service
has its own (C++) SIGTERM handler and tells the coordination service, and the processes agree on a
unit to stop at, one past the furthest any of them had reached (`reached`). A Python handler would
replace JAX's and make only its own process save, and saves are collective: the others would wait
in them forever. Ctrl-C there stays a KeyboardInterrupt.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import jax

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Raised after the save a preemption notice (SIGTERM) or a Ctrl-C asked for; running the same
  command again resumes from it. `exit_status` is 128 + the signal, the status a shell and a
  scheduler expect from a process the signal ended."""

  def __init__(self, step: int, directory: str, signum: int = signal.SIGTERM, unit: str = "step",
               what: str | None = None):
    reason = "interrupted" if signum == signal.SIGINT else "preempted"
    what = what or f"{unit} {step} to {directory}"
    super().__init__(f"{reason}: saved {what}; run the same command again to resume")
    self.step, self.exit_status = step, 128 + signum


def message(signum: int) -> str:
  """The one line for a signal that arrives outside any saving section."""
  what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
  return (f"dcsft_jax: {what} outside a stage's own saving (loading, compiling, between stages): finished stages "
          f"and saved checkpoints are kept; run the same command again to go on")


class _State:
  installed = 0          # nesting depth of handled()
  previous: dict = {}    # the handlers handled() replaced
  sections = 0           # nesting depth of saving()
  got: int | None = None  # the signal a saving section received
  asked = 0              # stop checks asked in this process (the preemption sync's count)


def handler(signum, frame) -> None:
  """The process's handler for SIGTERM and SIGINT (single process, main thread)."""
  if _State.sections == 0:
    os.write(2, (message(signum) + "\n").encode())
    os._exit(128 + signum)
  if signum == signal.SIGINT:
    if _State.got is not None:
      raise KeyboardInterrupt          # Ctrl-C again: stop at once, without the save
    log.warning("Ctrl-C: saving at the end of this step, then stopping (Ctrl-C again to stop at once)")
  if _State.got is None:
    _State.got = signum


def _ours() -> bool:
  """Whether this process installs a Python handler: one process, from the main thread."""
  return jax.process_count() == 1 and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handled():
  """Installs `handler` for SIGTERM and SIGINT for the block (nests; the outermost restores what was
  there). The pipeline holds it for a whole run; a saving section holds it for itself."""
  if not _ours():
    yield
    return
  if _State.installed == 0:
    _State.previous = {s: signal.signal(s, handler) for s in SIGNALS}
  _State.installed += 1
  try:
    yield
  finally:
    _State.installed -= 1
    if _State.installed == 0:
      for s, h in _State.previous.items():
        signal.signal(s, h)
      _State.previous = {}


class Stop:
  """Asked after each finished unit of work of a saving section (a step, a batch): the signal to stop
  with, or None.

  One process: the signal the handler recorded. Several: SIGTERM at the unit every process agreed on
  through JAX's preemption sync (a notice to any host reaches all of them there). JAX agrees on one past
  the largest count any process had reported, and remembers counts for the whole process, so the count
  asked with is the process's: every ask of every section adds one (`_State.asked`). All processes run
  the same stages over the same steps and batches, so their counts stay in step."""

  def __call__(self) -> int | None:
    _State.asked += 1
    if _State.got is not None:
      return _State.got
    return signal.SIGTERM if reached(_State.asked) else None


@contextlib.contextmanager
def saving():
  """A section that saves on a signal and stops: yields its `Stop`. A signal recorded after the
  section's last ask (while its final save was written) is not lost: the outermost section, ending
  normally with its work saved, raises Preempted for it."""
  with handled():
    if _State.sections == 0:
      _State.got = None
    _State.sections += 1
    late = None
    try:
      yield Stop()
    finally:
      _State.sections -= 1
      if _State.sections == 0:
        late, _State.got = _State.got, None
    if late is not None:
      raise Preempted(0, "", late, what="everything it had done (the signal came as it finished)")


def reached(step: int) -> bool:
  """Whether `step` is the step JAX's preemption sync agreed on (False without jax.distributed)."""
  from jax.experimental import multihost_utils
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:        # jax.distributed with its preemption service switched off: no notices
    return False
