"""One of two processes of a jax.distributed CPU run (driven by test_stages.py) that wants the
workdir another run holds: python tests/two_process_lock.py PROCESS_ID PORT WORKDIR."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from dcsft_jax import workdir as workdir_lib  # noqa: E402

try:
  with workdir_lib.locked_by_process_0(workdir_lib.Workdir(workdir)):
    print(f"process {pid}: got the workdir", flush=True)
except workdir_lib.WorkdirBusy as e:
  print(f"process {pid}: busy: {e}", flush=True)
