"""The training loop: exact resume after a crash, SIGTERM saves, metrics files TensorBoard reads."""
from __future__ import annotations

import io
import json
import logging
import shutil

import jax
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from dcsft_jax.data import batching, builtin
from dcsft_jax.data.processor import Processor
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.qwen2_5_vl.config import tiny_config
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.train import metrics, optim, trainer


_BASE = {}


def _setup(workdir, lora=None):
  cfg = tiny_config()
  # One random model per process, each setup its own host copy (a trainer donates its buffers).
  if "params" not in _BASE:
    _BASE["params"] = jax.tree.map(np.asarray, M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0))))
  params = jax.tree.map(np.array, _BASE["params"])
  if lora is not None:
    params = trainer.init_lora(params, cfg, lora, seed=1)
  proc = Processor.tiny(cfg=cfg)
  recs = builtin.load_builtin("train", limit=24)
  buckets = batching.auto_buckets(recs, proc, with_answers=True, max_buckets=1)
  it = batching.BatchIterator(recs, proc, batch_size=4, buckets=buckets, shuffle=True, seed=3, epochs=None)
  tc = trainer.TrainConfig(steps=6, batch_size=8, accum=2, lora=lora, save_every=2, keep=2,
                           optim=optim.OptimConfig(learning_rate=1e-3, total_steps=6, warmup_ratio=0.2))
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  return cfg, params, it, tc, mesh


def test_killed_run_resumes_bit_identical(tmp_path, caplog):
  # LoRA with dropout: adapters, frozen base, optimizer state and the dropout RNG all have to resume.
  lora = M.LoraSpec(rank=4, alpha=8, dropout=0.05)
  setups = [_setup(tmp_path, lora) for _ in range(6)]   # built outside the mesh: six identical starts

  class Killed(Exception):
    pass

  def die(step, m):
    if step == 6:                # after step 5 was logged: the resumed run logs 5 and 6 again
      raise Killed()

  mesh = setups[0][4]
  with mesh_lib.use(mesh):
    cfg, params, it, tc, _ = setups[0]
    ref = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "a"))
    out_a = ref.fit(it, progress=False)
    final_a = jax.tree.map(np.asarray, ref.params)
    cfg, params, it, tc, _ = setups[1]
    t = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "b"))
    with pytest.raises(Killed):
      t.fit(it, progress=False, on_step=die)
    assert t.manager.latest_step() == 4
    # Resuming those checkpoints on other data would mix two runs: refused, naming the difference,
    # before any weight is read or step compiled.
    cfg, params, it, tc, _ = setups[3]
    other = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "b"),
                               fingerprint={"data": "json:other.json"})
    with pytest.raises(ValueError, match=r"started with other settings: data None then, 'json:other.json' now"
                                         r".*--config.restart_stage=STAGE .*checkpoints"):
      other.fit(it, progress=False)
    cfg, params, it, tc, _ = setups[2]
    t = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "b"))
    out_b = t.fit(it, progress=False)
    final_b = jax.tree.map(np.asarray, t.params)
    # The finished run's last step (6) damaged, as by a crash mid-save: set aside, step 4 resumed, the
    # same end reached.
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    step6 = tmp_path / "c" / "checkpoints" / "6"
    shutil.rmtree(step6)
    step6.mkdir()
    cfg, params, it, tc, _ = setups[4]
    t = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "c"))
    out_c = t.fit(it, progress=False)
    final_c = jax.tree.map(np.asarray, t.params)
    # Every step damaged (issue 27): each set aside with its line, then one line saying the run starts
    # over; it reaches the same end from step 0.
    shutil.copytree(tmp_path / "a", tmp_path / "d")
    for step in (4, 6):
      shutil.rmtree(tmp_path / "d" / "checkpoints" / str(step))
      (tmp_path / "d" / "checkpoints" / str(step)).mkdir()
    cfg, params, it, tc, _ = setups[5]
    t = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "d"))
    with caplog.at_level(logging.WARNING):
      out_d = t.fit(it, progress=False)
    final_d = jax.tree.map(np.asarray, t.params)
  said = [r.getMessage() for r in caplog.records if str(tmp_path / "d" / "checkpoints") in r.getMessage()]
  assert sum("cannot be read" in m for m in said) == 2 and sum("starts from step 0" in m for m in said) == 1, said
  assert [h["step"] for h in out_d["history"]] == list(range(1, 7))
  for x, y in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_d)):
    np.testing.assert_array_equal(x, y)
  assert len(list((tmp_path / "c" / "checkpoints").glob("6.unreadable-*"))) == 1
  assert "Traceback" in (tmp_path / "c" / "logs" / "checkpoint_errors.log").read_text()
  assert [h["step"] for h in out_c["history"]] == list(range(1, 7))
  for x, y in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_c)):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)):
    np.testing.assert_array_equal(x, y)
  strip = lambda h: [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in h]
  assert strip(out_a["history"]) == strip(out_b["history"]) and len(out_b["history"]) == 6
  assert out_a["history"][-1]["loss"] < out_a["history"][0]["loss"]
  logs = tmp_path / "b" / "logs"
  lines = open(logs / "metrics.jsonl").read().splitlines()
  assert [int(json.loads(x)["step"]) for x in lines] == list(range(1, 7))
  # TensorBoard reads the killed run's event file, then the resumed run's, whose purge at step 5 drops
  # the killed run's step 5: every step once, with the values the resumed run logged.
  assert len(list(logs.glob("events.out.tfevents.*"))) == 2
  loss = _events(logs).Scalars("loss")
  assert [e.step for e in loss] == list(range(1, 7))
  assert [e.value for e in loss] == [np.float32(r["loss"]) for r in out_b["history"]]


def _events(logdir) -> event_accumulator.EventAccumulator:
  """Everything TensorBoard reads from the event files in `logdir` (size 0: no sampling)."""
  keep_all = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0}
  return event_accumulator.EventAccumulator(str(logdir), size_guidance=keep_all).Reload()


def test_tensorboard_gets_settings_text_and_images(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.hparams({"run": "sft", "train": {"learning_rate": 1e-3, "lora": True, "steps": 40}, "mesh": (1, 2)})
  w.text("report", "| model | acc |\n|---|---|\n| SFT | 91.00 |\n")
  plot = Image.new("RGB", (40, 30), (70, 120, 190))
  w.image("plots/train_loss", plot)
  w.close()
  ev = _events(tmp_path)
  start = hparams_metadata.parse_session_start_info_plugin_data(
      ev.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content)
  assert json_format.MessageToDict(start)["hparams"] == {
      "run": "sft", "train.learning_rate": 1e-3, "train.lora": True, "train.steps": 40.0, "mesh": "(1, 2)"}
  text = ev.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
  assert "| SFT | 91.00 |" in text
  (img,) = ev.Images("plots/train_loss")
  assert (img.width, img.height) == plot.size
  assert np.array_equal(np.asarray(Image.open(io.BytesIO(img.encoded_image_string))), np.asarray(plot))
  assert not (tmp_path / "metrics.jsonl").exists()      # no scalars written: no metrics file


@pytest.mark.slow
def test_two_process_run_trains_and_checkpoints(tmp_path):
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  script = os.path.join(repo, "tests", "two_process_train.py")
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port), str(tmp_path / "run")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  lines = [out.strip().splitlines()[-1] for out, _ in outs]
  assert lines[0].startswith("process 0/2 devices 2 steps 2") and lines[1].startswith("process 1/2 devices 2 steps 2")
  assert lines[0].split("loss")[1] == lines[1].split("loss")[1]     # both processes saw the same global step
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


@pytest.mark.slow
def test_main_saves_then_exits_143_on_sigterm_and_130_on_ctrl_c(tmp_path):
  """`python -m dcsft_jax.main` in a training stage: SIGTERM saves the step and exits 143 with one log
  line saying so, no traceback; the same command resumes there, and a Ctrl-C saves and exits 130."""
  import os
  import re
  import signal
  import subprocess
  import sys
  import time
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  wd = tmp_path / "wd"
  ckpts = wd / "train" / "cold_start" / "checkpoints"
  cmd = [sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py", f"--config.workdir={wd}",
         "--config.stages=init,cold_start", "--config.cold_start.steps=100000", "--config.cold_start.save_every=2"]

  def saved():
    return [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.is_dir() else []

  def stopped_by(signum, after: int) -> tuple[int, str]:
    """Runs the command until it has saved a step past `after` and sends `signum`: the step it says it
    saved, and its stderr."""
    with open(tmp_path / "err", "w") as err:
      p = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 600
    while max(saved(), default=0) <= after and p.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    if p.poll() is None:
      p.send_signal(signum)
    try:
      code = p.wait(timeout=300)
    except subprocess.TimeoutExpired:
      p.kill()
      code = p.wait()
    log = (tmp_path / "err").read_text()
    assert code == 128 + signum and "Traceback" not in log, f"exit status {code}\n{log[-3000:]}"
    reason = "preempted" if signum == signal.SIGTERM else "interrupted"
    lines = re.findall(rf"{reason}: saved step (\d+) to {re.escape(str(ckpts))}; run the same command again "
                       "to resume$", log, re.M)
    assert len(lines) == 1, log[-3000:]
    step = int(lines[0])
    assert step > after and step in saved(), (step, saved())
    return step, log

  n, _ = stopped_by(signal.SIGTERM, after=0)
  _, log = stopped_by(signal.SIGINT, after=n)
  assert f"resumed from {ckpts} at step {n}" in log, log[-3000:]


@pytest.mark.slow
def test_two_process_preemption_saves_one_step_everywhere_and_resumes_exactly(tmp_path):
  """SIGTERM to one process of two: JAX's preemption sync makes both save the same step and exit
  143 (a per-process save would leave the other waiting in the collective save); the same command
  again resumes there and ends bit-identical to an uninterrupted run (tests/two_process_preempt.py)."""
  import os
  import signal
  import socket
  import subprocess
  import sys
  import time
  steps = 24
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  script = os.path.join(repo, "tests", "two_process_preempt.py")

  def launch(phase):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    procs = []
    for i in range(2):
      with open(tmp_path / f"{phase}.{i}.out", "w") as out, open(tmp_path / f"{phase}.{i}.err", "w") as err:
        procs.append(subprocess.Popen([sys.executable, script, phase, str(i), str(port), str(tmp_path), str(steps)],
                                      env=env, stdout=out, stderr=err))
    return procs

  def logs(phase):
    """Both processes' stderr, for a failure's message."""
    tails = [(tmp_path / f"{phase}.{i}.err").read_text()[-3000:] for i in range(2)]
    return "".join(f"\n--- {phase}: process {i} stderr (tail) ---\n{t}" for i, t in enumerate(tails))

  def stop(procs, phase, why):
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    pytest.fail(f"{phase}: {why}{logs(phase)}")

  def finish(procs, phase, timeout):
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
      stop(procs, phase, f"not done {timeout} s later (a process left waiting in a collective?)")

  def reports(phase):
    """Each process's JSON lines by run name."""
    lines = [(tmp_path / f"{phase}.{i}.out").read_text().splitlines() for i in range(2)]
    return [{r["run"]: r for r in (json.loads(x) for x in ls if x.startswith("{"))} for ls in lines]

  def progress(i):
    try:
      return int((tmp_path / f"progress.{i}").read_text())
    except (FileNotFoundError, ValueError):
      return 0

  procs = launch("first")
  deadline = time.time() + 900            # two starts and a reference run, on a loaded machine
  while min(progress(0), progress(1)) < 2:
    if any(p.poll() is not None for p in procs):
      stop(procs, "first", f"a process ended before the interrupted run's step 2: {[p.poll() for p in procs]}")
    if time.time() > deadline:
      stop(procs, "first", "the interrupted run did not reach step 2 in time")
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)    # one process only: a preemption notice reaches one host
  codes = finish(procs, "first", 300)
  assert codes == [143, 143], f"exit statuses {codes}{logs('first')}"
  ref, first = zip(*[(r["ref"], r["run"]) for r in reports("first")])
  saved = {r["preempted"] for r in first}
  assert len(saved) == 1 and {r["latest"] for r in first} == saved, f"{first}{logs('first')}"
  n = saved.pop()
  assert 2 <= n < steps and sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [str(n)], first
  assert first[0]["message"] == (f"preempted: saved step {n} to {tmp_path / 'run' / 'checkpoints'}; "
                                 "run the same command again to resume")

  procs = launch("resume")
  codes = finish(procs, "resume", 600)
  assert codes == [0, 0], f"exit statuses {codes}{logs('resume')}"
  resumed = [r["run"] for r in reports("resume")]
  for i in range(2):
    assert resumed[i]["start"] == n and resumed[i]["steps"] == steps
    # Every step's figures (the first run's, restored, then the resumed run's) and this process's
    # shards of the final parameters are those of the uninterrupted run.
    assert resumed[i]["history"] == ref[i]["history"] and len(ref[i]["history"]) == steps
    assert resumed[i]["params"] == ref[i]["params"]


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_one_line(tmp_path):
  """A checkpoint save that the filesystem refuses (here RLIMIT_FSIZE: every write past 256 KiB fails
  with EFBIG, as a full disk fails with ENOSPC) ends the run with exit 1 and one line naming the folder,
  the cause, the step a re-run resumes from and the trace file; no traceback, no Orbax wall."""
  import os
  import re
  import resource
  import signal
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "DCSFT_COMPILATION_CACHE"))}
  env.update(PYTHONPATH=repo, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  wd = tmp_path / "wd"
  cmd = [sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py", f"--config.workdir={wd}",
         "--config.cold_start.steps=4", "--config.cold_start.save_every=2"]
  r = subprocess.run(cmd + ["--config.stages=init"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

  r = subprocess.run(cmd + ["--config.stages=cold_start"], cwd=repo, env=env, capture_output=True, text=True,
                     timeout=600, preexec_fn=small_files)
  ckpts = wd / "train" / "cold_start" / "checkpoints"
  trace = wd / "train" / "cold_start" / "logs" / "checkpoint_errors.log"
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  # Step 1's save runs in the background; its failure surfaces at the next save (step 2) or the wait.
  assert re.fullmatch(re.escape(f"dcsft_jax: saving a checkpoint to {ckpts} failed at step ") + r"[12]" + re.escape(
      " (File too large); the disk (or quota) is full: free space, or give --config.workdir on a larger disk, and "
      f"run the same command again: it resumes from the start (no step was saved). Full trace: {trace}"), last), last
  assert "Traceback" in trace.read_text()
  # What the console got besides the progress bar and that line: a few lines, not Orbax's hundreds.
  noise = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip() and "step/s" not in ln and "s/step" not in ln
           and "cudart_stub" not in ln and "absl::InitializeLog" not in ln]
  assert len(noise) <= 12, "\n".join(noise)
