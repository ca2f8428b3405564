"""One signal handler for the process (dcsft_jax/preemption.py, issue 30): every stage and trainer stops
through it, and none reaches into the trainer for it. The stages' own SIGTERM tests (scoring and
evaluation in test_stages.py, training in test_trainer.py, before any stage in test_user_errors.py)
send the signal to real runs; here, the handler's rules and the code's shape."""
import ast
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dcsft_jax import preemption

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dcsft_jax")


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        yield os.path.relpath(path, PACKAGE), ast.parse(open(path).read())


def test_only_the_preemption_module_installs_signal_handlers():
  calls = {}
  for rel, tree in _modules():
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "signal"
          and isinstance(node.func.value, ast.Name) and node.func.value.id == "signal"):
        calls.setdefault(rel, 0)
        calls[rel] += 1
  assert set(calls) == {"preemption.py"}, calls


def test_stages_and_main_do_not_import_the_trainer_for_preemption():
  for rel, tree in _modules():
    if not (rel.startswith("stages" + os.sep) or rel == "main.py"):
      continue
    text = ast.unparse(tree)
    assert "trainer.Preempted" not in text and "trainer.reached_preemption" not in text, rel
    if rel != os.path.join("stages", "training.py"):     # the one stage that trains
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "dcsft_jax.train":
          assert "trainer" not in [a.name for a in node.names], rel
  from dcsft_jax.train import trainer
  assert not hasattr(trainer, "Preempted") and not hasattr(trainer, "reached_preemption")


def test_a_signal_in_a_saving_section_is_recorded_and_the_section_stops_at_its_next_unit():
  """A section that stops where its Stop says raises Preempted itself (the stages and the trainer do);
  here the sections end normally after the signal, so the end of the outermost one raises it."""
  before = signal.getsignal(signal.SIGTERM)
  with preemption.handled():
    assert signal.getsignal(signal.SIGTERM) is preemption.handler
    assert signal.getsignal(signal.SIGINT) is preemption.handler
    with pytest.raises(preemption.Preempted) as e:
      with preemption.saving() as stop:
        assert stop() is None
        os.kill(os.getpid(), signal.SIGTERM)
        with preemption.saving() as inner:      # a curve's evaluation inside a training step: one record
          assert inner() == signal.SIGTERM
        assert stop() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)    # a second notice changes nothing
        assert stop() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C while it saves: out at once
          os.kill(os.getpid(), signal.SIGINT)
    assert e.value.exit_status == 143
    with pytest.raises(preemption.Preempted) as e:
      with preemption.saving() as stop:         # a new section starts clean
        assert stop() is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C again: at once
          os.kill(os.getpid(), signal.SIGINT)
    assert e.value.exit_status == 130
    assert signal.getsignal(signal.SIGTERM) is preemption.handler     # the run's handler stays
  assert signal.getsignal(signal.SIGTERM) is before                   # and leaves with it
  # A section on its own (the trainer used as a library) installs the handler for itself.
  with preemption.saving():
    assert signal.getsignal(signal.SIGTERM) is preemption.handler
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_during_a_sections_final_save_is_not_lost():
  """The last ask said go on, then a notice came while the final save was written: the section ends
  (its work saved) and raises Preempted for it, rather than the run going on to its next stage."""
  with pytest.raises(preemption.Preempted, match="^preempted: saved everything it had done") as e:
    with preemption.saving() as stop:
      assert stop() is None
      os.kill(os.getpid(), signal.SIGTERM)       # during the "final save"
  assert e.value.exit_status == 143
  with preemption.saving() as stop:               # and the next section starts clean
    assert stop() is None


def test_a_signal_outside_any_saving_section_exits_at_once_with_one_line():
  code = textwrap.dedent("""
      import os, signal, time
      from dcsft_jax import preemption
      with preemption.handled():
        with preemption.saving() as stop:
          pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("not reached")
  """)
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert p.returncode == 143 and "not reached" not in p.stdout
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert lines[-1] == preemption.message(signal.SIGTERM), p.stderr


def test_preempted_says_what_was_saved_and_exits_with_the_signals_status():
  e = preemption.Preempted(12, "/w/train/x/checkpoints")
  assert e.exit_status == 143
  assert str(e) == "preempted: saved step 12 to /w/train/x/checkpoints; run the same command again to resume"
  e = preemption.Preempted(3, "/w/scores.partial.jsonl", signal.SIGINT, unit="batch")
  assert e.exit_status == 130 and str(e).startswith("interrupted: saved batch 3 to ")
