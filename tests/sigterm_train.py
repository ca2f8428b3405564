"""A long single-process SFT run for test_trainer.py's SIGTERM test: python tests/sigterm_train.py WORKDIR."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

from dcsft_jax import mesh as mesh_lib  # noqa: E402
from dcsft_jax.data import batching, builtin  # noqa: E402
from dcsft_jax.data.processor import Processor  # noqa: E402
from dcsft_jax.models import qwen2_5_vl as M  # noqa: E402
from dcsft_jax.models.config import tiny_config  # noqa: E402
from dcsft_jax.train import optim, trainer  # noqa: E402

cfg = tiny_config()
params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
proc = Processor.tiny(cfg=cfg)
recs = builtin.load_builtin("train", limit=16)
buckets = batching.auto_buckets(recs, proc, with_answers=True, max_buckets=1)
it = batching.BatchIterator(recs, proc, batch_size=2, buckets=buckets, seed=1, epochs=None)
mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
tc = trainer.TrainConfig(steps=10_000, batch_size=2, save_every=10_000, optim=optim.OptimConfig(total_steps=10_000))
with mesh_lib.use(mesh):
  t = trainer.SFTTrainer(cfg, M.ModelOptions(), params, tc, mesh, sys.argv[1])
  try:
    t.fit(it, progress=False, on_step=lambda step, m: print(f"step {step}", flush=True))
  except trainer.Preempted as e:
    print(f"preempted: {e}", flush=True)
    sys.exit(143)
