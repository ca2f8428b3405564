"""The workdir's layout: every path a stage reads or writes, and the file that marks each stage done.

One object, so the stages, the report, the tests and a user's scripts agree on where things are:

  config.json, stages.json            the run's settings; each finished stage's figures
  base_model/, cold_start_model/      model directories (Orbax params + config.json + processor files)
  models/{sft,sft_m,sft_em,grpo}/     the trained models; models/finetune.json marks the LoRA runs done
                                      (with config.seeds = N > 1, seed s > 0 of run NAME is NAME.seed{s})
  train/NAME/                         a training run: checkpoints/, logs/ (metrics.jsonl, TensorBoard),
                                      curve.json (OOD accuracy vs step), figures.json, rollouts/ (GRPO)
  scores/scores.jsonl                 K verified samples per training prompt (scores.partial.jsonl while running)
  curation/                           RECIPE.json training files, images/, pass_rates.png, summary.json
  eval/MODEL/SET.json                 greedy answers per set; eval/accuracy.{json,md}
  report.md, results.json, plots/     the report (plots/logs: its TensorBoard copy)
  hf_export/                          the exported Hugging Face directory
  settings/STAGE.json                 the settings a finished stage was made with (main checks them)
  logs/errors.log                     the traces of failures said in one line (dcsft_jax.errors)

A model directory marks itself complete by its config.json, written last (checkpoint.save_model).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import socket
import time

MODEL_DONE = "config.json"
_SEED_SUFFIX = re.compile(r"\.seed(\d+)$")


def run_name(name: str, seed: int) -> str:
  """The run (and model, and evaluation label) of training seed `seed` of `name`: seed 0 keeps the
  plain name, so a one-seed run's layout is the same as before seeds existed."""
  return name if seed == 0 else f"{name}.seed{seed}"


def split_run_name(run: str) -> tuple[str, int]:
  """run_name's inverse: 'sft_em.seed2' -> ('sft_em', 2); 'sft_em' -> ('sft_em', 0)."""
  m = _SEED_SUFFIX.search(run)
  return (run[:m.start()], int(m.group(1))) if m else (run, 0)


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: str
  seeds: int = 1                     # config.seeds: training runs per finetune recipe and RL algorithm
  algorithms: tuple[str, ...] = ("grpo",)   # config.grpo.algorithms: the RL runs, models/NAME

  def __post_init__(self):
    object.__setattr__(self, "root", os.path.abspath(self.root))

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  # ----------------------------------------------------------------------- the run
  @property
  def config(self) -> str:
    return self.path("config.json")

  @property
  def stages(self) -> str:
    return self.path("stages.json")

  @property
  def lock(self) -> str:
    return self.path(".lock")

  # ----------------------------------------------------------------------- models
  @property
  def base_model(self) -> str:
    return self.path("base_model")

  @property
  def pretrained_model(self) -> str:
    return self.path("pretrained_model")

  @property
  def cold_start_model(self) -> str:
    return self.path("cold_start_model")

  def model(self, name: str) -> str:
    """A training run's model directory: pretrained_model/, cold_start_model/, or models/NAME/."""
    return {"pretrain": self.pretrained_model, "cold_start": self.cold_start_model}.get(name) or self.path("models", name)

  def model_done(self, name: str) -> bool:
    return os.path.exists(os.path.join(self.model(name), MODEL_DONE))

  @property
  def finetune_done(self) -> str:
    return self.path("models", "finetune.json")

  # ----------------------------------------------------------------------- training runs
  def train(self, name: str) -> str:
    return self.path("train", name)

  def train_runs(self) -> list[str]:
    root = self.path("train")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []

  def logs(self, name: str) -> str:
    return os.path.join(self.train(name), "logs")

  def metrics(self, name: str) -> str:
    return os.path.join(self.logs(name), "metrics.jsonl")

  def curve(self, name: str) -> str:
    return os.path.join(self.train(name), "curve.json")

  def figures(self, name: str) -> str:
    """A finished run's summary figures, for the stage summary of a later, resumed invocation."""
    return os.path.join(self.train(name), "figures.json")

  # ----------------------------------------------------------------------- scoring and curation
  @property
  def scores(self) -> str:
    return self.path("scores", "scores.jsonl")

  @property
  def scores_partial(self) -> str:
    return self.path("scores", "scores.partial.jsonl")

  @property
  def curation(self) -> str:
    return self.path("curation")

  @property
  def curation_summary(self) -> str:
    """Written last by the curate stage: its presence means the stage is done."""
    return os.path.join(self.curation, "summary.json")

  def recipe(self, recipe: str) -> str:
    return os.path.join(self.curation, f"{recipe}.json")

  @property
  def curated_images(self) -> str:
    return os.path.join(self.curation, "images")

  @property
  def pass_rates_png(self) -> str:
    return os.path.join(self.curation, "pass_rates.png")

  # ----------------------------------------------------------------------- evaluation, report, export
  def eval_result(self, model: str, eval_set: str) -> str:
    return self.path("eval", model, f"{eval_set}.json")

  @property
  def accuracy_json(self) -> str:
    return self.path("eval", "accuracy.json")

  @property
  def accuracy_md(self) -> str:
    return self.path("eval", "accuracy.md")

  @property
  def report(self) -> str:
    return self.path("report.md")

  @property
  def results(self) -> str:
    return self.path("results.json")

  @property
  def plots(self) -> str:
    return self.path("plots")

  @property
  def export(self) -> str:
    return self.path("hf_export")

  def stage_outputs(self, stage: str, recipes: tuple[str, ...] = ()) -> list[str]:
    """Everything `stage` writes (what --config.restart_stage deletes); `recipes`: finetune's runs."""
    seeded = lambda names: [run_name(n, s) for n in names for s in range(self.seeds)]
    runs = {"pretrain": ["pretrain"], "cold_start": ["cold_start"], "finetune": seeded(recipes), "grpo": seeded(self.algorithms)}.get(stage, [])
    return {
        "init": [self.base_model],
        "pretrain": [self.pretrained_model],
        "cold_start": [self.cold_start_model],
        "score": [os.path.dirname(self.scores)],
        "curate": [self.curation],
        "finetune": [self.model(r) for r in seeded(recipes)] + [self.finetune_done],
        "grpo": [self.model(r) for r in seeded(self.algorithms)],
        "evaluate": [self.path("eval")],
        "report": [self.report, self.results, self.plots],
        "export": [self.export],
    }[stage] + [self.train(r) for r in runs]

  # ----------------------------------------------------------------------- stage markers
  def stage_settings(self, stage: str) -> str:
    """The settings `stage` finished with (stages.settings), written when it finished."""
    return os.path.join(self.root, "settings", f"{stage}.json")

  def done_marker(self, stage: str) -> str:
    """The file whose existence means `stage` finished (main skips it then)."""
    return {
        "init": os.path.join(self.base_model, MODEL_DONE),
        "pretrain": os.path.join(self.pretrained_model, MODEL_DONE),
        "cold_start": os.path.join(self.cold_start_model, MODEL_DONE),
        "score": self.scores,
        "curate": self.curation_summary,
        "finetune": self.finetune_done,
        # Seed by seed, each algorithm in order: the last one's model means every one finished.
        "grpo": os.path.join(self.model(run_name(self.algorithms[-1], self.seeds - 1)), MODEL_DONE),
        "evaluate": self.accuracy_json,
        "report": self.report,
        "export": self.export,
    }[stage]


class WorkdirBusy(RuntimeError):
  pass


@contextlib.contextmanager
def locked(wd: Workdir):
  """Holds the workdir's lock (an exclusive flock on WORKDIR/.lock) for the block, or raises
  WorkdirBusy naming the run that holds it. Two runs on one workdir would train, log and checkpoint
  over each other; the lock makes the second one stop before it touches anything. The kernel drops
  the lock when the holder dies, so a killed run never leaves a stale one (the next run takes it over
  and says so). Process 0 takes it for a multi-host run (its hosts share the workdir)."""
  os.makedirs(wd.root, exist_ok=True)
  fd = os.open(wd.lock, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
      raise WorkdirBusy(f"{wd.root} is in use by {holder}. Wait for that run to finish (or stop it), or "
                        f"give this run another --config.workdir.") from None
    before = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if before:   # the kernel dropped that holder's lock without its cleanup: it was killed
      print(f"dcsft_jax: taking over the lock of {wd.root} from {before} (no longer running)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)      # a clean exit leaves no holder; a killed run leaves its line behind
  finally:
    os.close(fd)


@contextlib.contextmanager
def locked_by_process_0(wd: Workdir):
  """`locked` for a run of any number of processes. Process 0 takes the lock (the hosts share the
  workdir) and every process learns whether it got it: a busy workdir stops them all at once with
  the holder's name, where the others would otherwise wait forever at their first collective."""
  import jax
  if jax.process_count() == 1:
    with locked(wd):
      yield
    return
  from dcsft_jax import multihost
  with contextlib.ExitStack() as stack:
    busy = ""
    if jax.process_index() == 0:
      try:
        stack.enter_context(locked(wd))
      except Exception as e:  # noqa: BLE001 - busy, or no workdir at all: every process must hear it
        busy = str(e) if isinstance(e, WorkdirBusy) else f"{wd.root}: {type(e).__name__}: {e}"
    said = multihost.broadcast_text(busy)
    if said:
      raise WorkdirBusy(said)
    yield
