"""Runs the DC-SFT pipeline: `python -m dcsft_jax.main --config=configs/dcsft.py`.

Every config field can be overridden (`--config.model.hf_path=DIR`, `--config.stages=init`); the
config is validated before any work starts. Stages whose outputs exist in the workdir are skipped,
so re-running the same command resumes. A training stage sent SIGTERM (a preemption notice; in a
multi-host run, to any one process: all of them stop at the same step) saves a checkpoint and exits
143 (130 after a Ctrl-C), the status of a process that signal ended.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, logging
from ml_collections import config_flags

import jax

from dcsft_jax import atomic
from dcsft_jax import mesh as mesh_lib
from dcsft_jax import run_config
from dcsft_jax import stages as stages_lib
from dcsft_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "A Python config file (configs/dcsft.py).",
                                          lock_config=True)


@dataclasses.dataclass
class Context:
  workdir: str
  mesh: jax.sharding.Mesh
  model_options: object


def maybe_initialize_distributed(mode: str) -> None:
  """Multi-host start-up. TPU pods and SLURM set the variables jax.distributed reads by itself."""
  env = os.environ
  launched = any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")) or \
      int(env.get("SLURM_NTASKS", "1")) > 1 or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
  if mode == "on" or (mode == "auto" and launched):
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def run(config) -> dict:
  names = run_config.validate(config, [s.name for s in stages_lib.STAGES])
  opts = run_config.model_options(config)
  maybe_initialize_distributed(config.distributed)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  opts = dataclasses.replace(opts, platform=mesh_lib.platform(mesh))
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    atomic.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  ctx = Context(workdir, mesh, opts)
  summary_path = os.path.join(workdir, "stages.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  print(f"dcsft_jax: {jax.device_count()} {jax.default_backend()} device(s), mesh {dict(mesh.shape)}, "
        f"workdir {workdir}")
  for name in names:
    stage = stages_lib.BY_NAME[name]
    if os.path.exists(os.path.join(workdir, stage.output)):
      print(f"[{name}] done already ({stage.output} exists): skipped")
      continue
    print(f"[{name}] {stage.doc}")
    t0 = time.time()
    with mesh_lib.use(mesh):
      figures = stage.run(config, ctx)
    figures["seconds"] = round(time.time() - t0, 2)
    summary[name] = figures
    print(f"[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    if jax.process_index() == 0:
      atomic.write_json(summary_path, summary, default=str)
  return summary


def main(argv):
  if len(argv) > 1:
    sys.exit(f"unexpected arguments {argv[1:]}; settings go through --config.KEY=VALUE")
  if _CONFIG.value is None:
    sys.exit("give --config=configs/dcsft.py (or another config file)")
  try:
    run(_CONFIG.value)
  except run_config.ConfigError as e:
    sys.exit(f"bad config: {e}")
  except trainer.Preempted as e:
    logging.warning("%s", e)      # an expected stop, with its checkpoint: one line, no traceback
    sys.exit(e.exit_status)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
