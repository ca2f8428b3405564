"""The training loop: exact resume after a crash, SIGTERM saves, metrics files TensorBoard reads."""
from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest

from dcsft_jax.data import batching, builtin
from dcsft_jax.data.processor import Processor
from dcsft_jax.models import qwen2_5_vl as M
from dcsft_jax.models.config import tiny_config
from dcsft_jax import mesh as mesh_lib
from dcsft_jax.train import metrics, optim, trainer


def _setup(workdir, lora=None):
  cfg = tiny_config()
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
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


def test_killed_run_resumes_bit_identical(tmp_path):
  # LoRA with dropout: adapters, frozen base, optimizer state and the dropout RNG all have to resume.
  lora = M.LoraSpec(rank=4, alpha=8, dropout=0.05)
  setups = [_setup(tmp_path, lora) for _ in range(3)]   # built outside the mesh: three identical starts

  class Killed(Exception):
    pass

  def die(step, m):
    if step == 5:
      raise Killed()

  mesh = setups[0][4]
  with mesh_lib.use(mesh):
    cfg, params, it, tc, _ = setups[0]
    ref = trainer.SFTTrainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "a"))
    out_a = ref.fit(it, progress=False)
    final_a = jax.tree.map(np.asarray, ref.params)
    cfg, params, it, tc, _ = setups[1]
    t = trainer.SFTTrainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "b"))
    with pytest.raises(Killed):
      t.fit(it, progress=False, on_step=die)
    assert t.manager.latest_step() == 4
    cfg, params, it, tc, _ = setups[2]
    t = trainer.SFTTrainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path / "b"))
    out_b = t.fit(it, progress=False)
    final_b = jax.tree.map(np.asarray, t.params)
  for x, y in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)):
    np.testing.assert_array_equal(x, y)
  strip = lambda h: [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in h]
  assert strip(out_a["history"]) == strip(out_b["history"]) and len(out_b["history"]) == 6
  assert out_a["history"][-1]["loss"] < out_a["history"][0]["loss"]
  lines = open(tmp_path / "b" / "logs" / "metrics.jsonl").read().splitlines()
  assert [int(json.loads(x)["step"]) for x in lines] == list(range(1, 7))


def test_event_file_is_valid_tensorboard_format(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.write(3, {"loss": 1.5, "grad_norm": 0.25})
  w.close()
  path = next(p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents"))
  recs = list(metrics.read_records(str(path)))
  assert len(recs) == 2 and b"brain.Event:2" in recs[0]
  # Decode the second Event by hand: step (field 2) = 3, the tags and float values present.
  r = recs[1]
  assert r[0] == 0x09 and r[9] == 0x10 and r[10] == 3
  assert b"loss" in r and struct.pack("<f", 1.5) in r and struct.pack("<f", 0.25) in r
  # The known CRC32C check value, and a corrupted file is caught.
  assert metrics.crc32c(b"123456789") == 0xE3069283
  data = bytearray(path.read_bytes())
  data[-6] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt"):
    list(metrics.read_records(str(path)))


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
def test_sigterm_saves_before_exit(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, os.path.join(repo, "tests", "sigterm_train.py"), str(tmp_path / "run")],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  seen = []
  for line in p.stdout:
    seen.append(line.strip())
    if line.startswith("step 3"):
      p.send_signal(signal.SIGTERM)
      break
  rest = p.stdout.read()
  assert p.wait(timeout=300) == 143, rest
  last = int(rest.split("saved step ")[1].split()[0])
  assert last >= 3 and (tmp_path / "run" / "checkpoints" / str(last)).is_dir()
