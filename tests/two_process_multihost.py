"""One of two processes checking dcsft_jax.multihost (driven by tests/test_pipeline_mesh.py):
python tests/two_process_multihost.py PROCESS_ID PORT."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from dcsft_jax import multihost  # noqa: E402

ran = []
print(f"process {pid}: text {multihost.broadcast_text(f'from {pid} ü')!r}", flush=True)
print(f"process {pid}: empty {multihost.broadcast_text('')!r}", flush=True)
got = multihost.on_process_0(lambda: ran.append(pid) or {"n": 3, "who": pid})
print(f"process {pid}: result {got} ran {ran}", flush=True)


def fails():
  raise FileNotFoundError("scores.jsonl not found: run the 'score' stage first")


try:
  multihost.on_process_0(fails)
except FileNotFoundError as e:
  print(f"process {pid}: raised FileNotFoundError: {e}", flush=True)
multihost.barrier("done")
print(f"process {pid}: done", flush=True)
