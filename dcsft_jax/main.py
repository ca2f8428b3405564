"""Runs the DC-SFT pipeline: `python -m dcsft_jax.main --config=configs/dcsft.py`.

Every config field can be overridden (`--config.model.hf_path=DIR`, `--config.stages=init`); the
config is validated before any work starts. Stages whose outputs exist in the workdir are skipped,
so re-running the same command resumes. A training stage sent SIGTERM (a preemption notice; in a
multi-host run, to any one process: all of them stop at the same step) saves a checkpoint and exits
143 (130 after a Ctrl-C), the status of a process that signal ended.
"""
from __future__ import annotations

import hashlib
import dataclasses
import json
import os
import shutil
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import PIL.Image

from dcsft_jax import atomic, compile_cache, config_base, errors, fingerprint
from dcsft_jax import mesh as mesh_lib
from dcsft_jax import multihost, preemption
from dcsft_jax import run_config
from dcsft_jax import stages as stages_lib
from dcsft_jax import verify
from dcsft_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A Python config file (configs/dcsft.py).",
                                          lock_config=True)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the whole trace of a failure (else it goes to "
                             "WORKDIR/logs/errors.log and the failure is one line).")


@dataclasses.dataclass
class Context:
  wd: workdir_lib.Workdir            # every path of the run (dcsft_jax/workdir.py)
  mesh: jax.sharding.Mesh
  model_options: object

  @property
  def workdir(self) -> str:
    return self.wd.root


def _restart(config, wd: workdir_lib.Workdir) -> None:
  """--config.restart_stage: delete the named stages' outputs, so they run again from scratch."""
  recipes = tuple(r.strip() for r in config.finetune.recipes.split(",") if r.strip())
  # Once per settings: a requeued run (the same command after a preemption) must resume the restarted
  # stage, not delete its progress again. restarts.json keeps what was restarted under which config.
  key = hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]
  marker = wd.path("restarts.json")
  done = json.load(open(marker)) if os.path.exists(marker) else {}
  for stage in [s.strip() for s in str(config.restart_stage).split(",") if s.strip()]:
    if done.get(stage) == key:
      print(f"[{stage}] restart: done already for these settings (a resumed run keeps its progress; "
            f"delete {marker} to restart it again)")
      continue
    # The stage and every stage that read its outputs: their results came from what is deleted.
    gone = [p for s in stages_lib.downstream(stage) for p in wd.stage_outputs(s, recipes) + [wd.stage_settings(s)]
            if os.path.lexists(p)]
    if jax.process_index() == 0:
      for p in gone:
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
      done[stage] = key
      atomic.write_json(marker, done)
    print(f"[{stage}] restart: deleted {', '.join(os.path.relpath(p, wd.root) for p in gone) or 'nothing'}")
  multihost.barrier("dcsft-restart")


def maybe_initialize_distributed(mode: str) -> None:
  """Multi-host start-up. TPU pods and SLURM set the variables jax.distributed reads by itself; any
  other launcher (several processes on one machine, a cluster without SLURM) sets
  JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES and JAX_PROCESS_ID for each process."""
  env = os.environ
  launched = any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")) or \
      int(env.get("SLURM_NTASKS", "1")) > 1 or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
  if mode == "on" or (mode == "auto" and launched):
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
      # CPU devices of several processes talk through gloo (JAX's CPU default has no cross-process
      # collectives); accelerators' own collectives are unaffected.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = {k: int(env[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
                if env.get(v)}
    jax.distributed.initialize(**explicit)
    compile_cache.configure()          # a multi-process run's executables apart from single processes'
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def run(config) -> dict:
  names = run_config.validate(config, [s.name for s in stages_lib.STAGES])
  verify.configure(config)
  opts = run_config.model_options(config)
  maybe_initialize_distributed(config.distributed)
  try:
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  except ValueError as e:
    raise run_config.ConfigError(f"config.mesh: {e}") from None
  run_config.validate_mesh(config, names, mesh)
  opts = dataclasses.replace(opts, platform=mesh_lib.platform(mesh))
  if config.data.max_image_pixels:
    # PIL refuses images over twice MAX_IMAGE_PIXELS (DecompressionBombError, a bad record).
    PIL.Image.MAX_IMAGE_PIXELS = config.data.max_image_pixels // 2
  with preemption.handled():
    _check_answer_budget(config, names)
    wd = workdir_lib.Workdir(config.workdir, seeds=config.seeds, algorithms=run_config.rl_algorithms(config))
    with workdir_lib.locked_by_process_0(wd):
      return _run_stages(config, names, Context(wd, mesh, opts))


def _check_settings(config, wd: workdir_lib.Workdir, names: list[str]) -> str:
  """What settings differ from those a finished stage was made with ('' if none): the stages this run
  runs or reads (their upstream), each key then and now, and the restart that redoes them."""
  need = set()
  for n in names:
    need.update(s for s in [st.name for st in stages_lib.STAGES] if n in stages_lib.downstream(s))
  changed = []
  for s in [st.name for st in stages_lib.STAGES if st.name in need]:
    path = wd.stage_settings(s)
    if not (os.path.exists(wd.done_marker(s)) and os.path.exists(path)):
      continue
    had, has = json.load(open(path)), fingerprint.of(stages_lib.settings(config, s))
    # A key the stage finished without (added to the code since) at its default changes nothing: a new
    # key's default keeps what the code did before it.
    default = fingerprint.of(stages_lib.settings(config_base.base(), s))
    diff = sorted(k for k in set(had) | set(has) if had.get(k) != has.get(k)
                  and not (k not in had and k in default and has.get(k) == default[k]))
    if diff:
      changed.append((s, "; ".join(f"{k} {had.get(k)!r} then, {has.get(k)!r} now" for k in diff)))
  if not changed:
    return ""
  first = changed[0][0]
  return (f"settings changed since these stages finished in {wd.root}: "
          + " | ".join(f"{s}: {d}" for s, d in changed)
          + f". Rerun with --config.restart_stage={first} (redoes {', '.join(stages_lib.downstream(first))}), "
            f"or put the settings back.")


def _check_answer_budget(config, names: list[str]) -> None:
  """Answers longer than a generating stage's budget stop the run before any work (or warn)."""
  from dcsft_jax import answer_budget
  problems = answer_budget.problems(config, names)
  if problems and config.data.answer_budget != "warn":
    raise errors.UserError(" | ".join(problems))
  for p in problems:
    print(f"warning: {p}", file=sys.stderr)


def _run_stages(config, names: list[str], ctx: Context) -> dict:
  wd, mesh = ctx.wd, ctx.mesh
  _restart(config, wd)
  problem = multihost.on_process_0(lambda: _check_settings(config, wd, names))
  if problem:
    raise errors.UserError(problem)
  if jax.process_index() == 0:
    atomic.write_text(wd.config, config.to_json_best_effort(indent=2))
  summary = json.load(open(wd.stages)) if os.path.exists(wd.stages) else {}
  print(f"dcsft_jax: {jax.device_count()} {jax.default_backend()} device(s), mesh {dict(mesh.shape)}, "
        f"workdir {wd.root}")
  ran = []
  for name in names:
    # Whether the stage runs is process 0's reading of the workdir, told to every process (a
    # collective, so every process is past the previous stage): hosts whose view of a shared
    # filesystem lags would otherwise disagree, and one would run a stage alone.
    stage = stages_lib.BY_NAME[name]
    marker = wd.done_marker(name)
    todo = multihost.on_process_0(lambda: _to_do(config, wd, name, ran))
    if todo == "done":
      print(f"[{name}] done already ({os.path.relpath(marker, wd.root)} exists): skipped")
      continue
    if todo:
      print(f"[{name}] done before, but {todo}: running it again (finished parts are kept)")
    ran.append(name)
    print(f"[{name}] {stage.doc}")
    t0 = time.time()
    with mesh_lib.use(mesh):
      figures = stage.run(config, ctx)
    figures["seconds"] = round(time.time() - t0, 2)
    summary[name] = figures
    print(f"[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    if jax.process_index() == 0:
      atomic.write_json(wd.stages, summary, default=str)
      atomic.write_json(wd.stage_settings(name), fingerprint.of(stages_lib.settings(config, name)))
  multihost.barrier("dcsft-done")
  return summary


def _to_do(config, wd: workdir_lib.Workdir, name: str, ran: list[str]) -> str:
  """'' (run the stage), 'done' (skip it), or what a finished stage lacks (run it again)."""
  if not os.path.exists(wd.done_marker(name)):
    return ""
  return _missing(config, wd, name, ran) or "done"


def _missing(config, wd: workdir_lib.Workdir, name: str, ran: list[str]) -> str:
  """What a finished stage lacks for this config ('' if nothing): a later --config.seeds or another
  recipe or model adds recipe files to curation and runs to finetune and evaluation, which then do only
  the new ones (each run and
  each evaluated set is its own done file); the report is rebuilt when any stage ran."""
  if name == "curate":
    new = [r.strip() for r in config.curate.recipes.split(",") if r.strip() and not os.path.exists(wd.recipe(r.strip()))]
    return f"recipes {', '.join(new)} are new" if new else ""
  if name == "finetune":
    have = {k.rsplit("/", 1)[0] for k in json.load(open(wd.finetune_done))}
    want = [workdir_lib.run_name(r.strip(), s) for s in range(config.seeds)
            for r in config.finetune.recipes.split(",") if r.strip()]
    new = [r for r in want if r not in have]
    return f"runs {', '.join(new)} are new" if new else ""
  if name == "grpo":
    new = [workdir_lib.run_name(a, s) for s in range(config.seeds) for a in run_config.rl_algorithms(config)
           if not wd.model_done(workdir_lib.run_name(a, s))]
    return f"runs {', '.join(new)} are new" if new else ""
  if name == "evaluate":
    from dcsft_jax.data import sources
    acc = json.load(open(wd.accuracy_json))["accuracy"]
    sets = list(sources.parse_sets(config.data.eval))
    new = [label for label, _ in run_config.evaluated_models(config)
           if label not in acc or any(s not in acc[label] for s in sets)]
    return f"models {', '.join(new)} are new" if new else ""
  if name == "report" and ran:
    return f"{', '.join(ran)} ran since"
  return ""


def main(argv):
  if len(argv) > 1:
    sys.exit(f"unexpected arguments {argv[1:]}; settings go through --config.KEY=VALUE")
  if _CONFIG.value is None:
    sys.exit("give --config=configs/dcsft.py (or another config file)")
  config = _CONFIG.value
  log = lambda: os.path.join(str(config.workdir), "logs", "errors.log") if os.path.isdir(str(config.workdir)) else None
  errors.cli("dcsft_jax", lambda: _main(config), log=log, verbose=_VERBOSE.value)


def _main(config) -> None:
  try:
    run(config)
  except run_config.ConfigError as e:
    raise errors.UserError(f"bad config: {e}") from e
  except errors.CheckpointSaveFailed as e:
    # Out at once, skipping interpreter shutdown: the writes Orbax abandoned are still finishing, and
    # their callbacks into its closed event loop would print a traceback each during finalization.
    # The message is the cause; the trace is in the log file it names.
    logging.flush()
    print(f"dcsft_jax: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  except workdir_lib.WorkdirBusy as e:
    sys.exit(f"dcsft_jax: {e}")     # a busy workdir: the message is the cause
  except preemption.Preempted as e:
    logging.warning("%s", e)      # an expected stop, with its checkpoint: one line, no traceback
    sys.exit(e.exit_status)


def _parse_flags(argv: list[str]):
  """absl's flag parsing, with failures a user can fix said in one line: -h/--help lists the config's
  fields (exit 0); an override naming no field names that override and its section's keys (or the
  nearest); a value of the wrong type names the flag."""
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    print(_usage())
    sys.exit(0)
  from dcsft_jax import config_base
  argv = [f"--config={config_base.resolve_config(a[len('--config='):])}" if a.startswith("--config=") else a
          for a in argv]
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    sys.exit(f"dcsft_jax: error: bad config override: {_unknown_key(argv, e)}")
  except flags.Error as e:
    sys.exit(f"dcsft_jax: error: bad flag: {errors.one_line(e)}; `python -m dcsft_jax.main -h` lists the config's "
             f"fields")


def _unknown_key(argv: list[str], e: Exception) -> str:
  """The override that names no field, and what the section has (ml_collections says only the key)."""
  import difflib

  from dcsft_jax import config_base
  base = config_base.base()
  for a in argv[1:]:
    if not a.startswith("--config."):
      continue
    path = a[len("--config."):].split("=", 1)[0].split(".")
    node, good = base, []
    for part in path:
      if hasattr(node, "keys") and part in node.keys():
        node, good = node[part], good + [part]
        continue
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      where = ".".join(good) or "the config"
      near = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
      hint = f"did you mean {'.'.join(good + near)}?" if near else f"{where} has {', '.join(keys)}"
      return f"{a.split('=', 1)[0]}: {where} has no field {part!r}; {hint}"
  return f"{errors.one_line(e)}; dcsft_jax/config_base.py lists every key"


def _usage() -> str:
  """Every config field by section, with its default and the comment config_base.py gives it."""
  from dcsft_jax import config_base
  helps = config_base.field_help()
  lines = ["python -m dcsft_jax.main --config=configs/dcsft.py [--config.SECTION.KEY=VALUE ...] [--verbose]",
           "  (--config also takes a shipped config's name from any directory: dcsft, paper/imagenet_qwen25vl_3b, ...)",
           "", "Runs the DC-SFT pipeline (README.md). The config's fields (defaults of config_base.base()):"]
  base = config_base.base()

  def walk(node, prefix):
    for k in node.keys():
      v = node[k]
      if hasattr(v, "keys"):
        lines.extend(["", f"[{prefix}{k}]"])
        walk(v, f"{prefix}{k}.")
      else:
        h = helps.get(f"{prefix}{k}", "")
        lines.append(f"  --config.{prefix}{k}={v!r}" + (f"    {h}" if h else ""))
  walk(base, "")
  return "\n".join(lines)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=_parse_flags)
