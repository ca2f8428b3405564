"""One of two processes of a jax.distributed CPU run for test_trainer.py's preemption test:
python tests/two_process_preempt.py PHASE PROCESS_ID PORT WORKDIR STEPS

PHASE "first": an uninterrupted run of STEPS steps in WORKDIR/ref (the reference), then the same run
in WORKDIR/run, slowed down and writing its step to WORKDIR/progress.PROCESS_ID, until the test's
SIGTERM to one process stops both; exits with Preempted's status (143). PHASE "resume": WORKDIR/run
again, to STEPS. Each run prints one JSON line. Both runs of "first" share one compiled step.
"""
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
phase, pid, port, workdir, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

from dcsft_jax import mesh as mesh_lib  # noqa: E402
from dcsft_jax.data import batching, builtin  # noqa: E402
from dcsft_jax.data.processor import Processor  # noqa: E402
from dcsft_jax.models import qwen2_5_vl as M  # noqa: E402
from dcsft_jax.models.qwen2_5_vl.config import tiny_config  # noqa: E402
from dcsft_jax import preemption  # noqa: E402
from dcsft_jax.train import optim, trainer  # noqa: E402

cfg = tiny_config()
# On the host: each trainer puts its own copy on the mesh (the step donates the state's buffers).
params = jax.tree.map(np.asarray, M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0))))
proc = Processor.tiny(cfg=cfg)
recs = builtin.load_builtin("train", limit=16)
buckets = batching.auto_buckets(recs, proc, with_answers=True, max_buckets=1)
mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
tc = trainer.TrainConfig(steps=steps, batch_size=4, save_every=10_000,
                         optim=optim.OptimConfig(learning_rate=1e-3, total_steps=steps))


def digest(tree) -> str:
  """This process's shards of every leaf, hashed: equal digests are bit-identical parameters."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    for s in sorted(leaf.addressable_shards, key=lambda s: s.device.id):
      h.update(np.asarray(s.data).tobytes())
  return h.hexdigest()


def train(name: str, on_step=None) -> None:
  it = batching.BatchIterator(recs, proc, batch_size=4, buckets=buckets, shuffle=True, seed=1, epochs=None)
  t = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, os.path.join(workdir, name))
  start = t.manager.latest_step() or 0
  try:
    out = t.fit(it, progress=False, on_step=on_step)
  except preemption.Preempted as e:
    print(json.dumps({"run": name, "preempted": e.step, "latest": t.manager.latest_step(), "message": str(e)}),
          flush=True)
    sys.exit(e.exit_status)
  history = [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in out["history"]]
  print(json.dumps({"run": name, "start": start, "steps": out["steps"], "history": history,
                    "params": digest(t.params)}), flush=True)


def slowly(step, m):
  # Room for the test to send its SIGTERM and for JAX's protocol (its notifier polls once a second)
  # to agree on a step well before the run's last.
  tmp = os.path.join(workdir, f"progress.{pid}.tmp")
  with open(tmp, "w") as f:
    f.write(str(step))
  os.replace(tmp, os.path.join(workdir, f"progress.{pid}"))
  time.sleep(1.0)


with mesh_lib.use(mesh):
  if phase == "first":
    train("ref")
    train("run", on_step=slowly)
  else:
    train("run")
