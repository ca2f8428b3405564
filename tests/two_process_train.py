"""One of two processes of a jax.distributed CPU run (driven by test_trainer.py):
python tests/two_process_train.py PROCESS_ID PORT WORKDIR."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from dcsft_jax import mesh as mesh_lib  # noqa: E402
from dcsft_jax.data import batching, builtin  # noqa: E402
from dcsft_jax.data.processor import Processor  # noqa: E402
from dcsft_jax.models import qwen2_5_vl as M  # noqa: E402
from dcsft_jax.models.qwen2_5_vl.config import tiny_config  # noqa: E402
from dcsft_jax.train import optim, trainer  # noqa: E402

cfg = tiny_config()
params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
proc = Processor.tiny(cfg=cfg)
recs = builtin.load_builtin("train", limit=16)
buckets = batching.auto_buckets(recs, proc, with_answers=True, max_buckets=1)
it = batching.BatchIterator(recs, proc, batch_size=4, buckets=buckets, seed=1, epochs=None)
assert it.local_rows == 2
mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
tc = trainer.TrainConfig(steps=2, batch_size=4, save_every=2, optim=optim.OptimConfig(total_steps=2))
with mesh_lib.use(mesh):
  t = trainer.Trainer(cfg, M.ModelOptions(), params, tc, mesh, workdir)
  out = t.fit(it, progress=False)
print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} "
      f"steps {out['steps']} loss {out['history'][-1]['loss']:.6f} saved {t.manager.latest_step()}", flush=True)
