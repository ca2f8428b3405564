"""The training loop: batches -> jitted step -> metrics, with Orbax checkpoints that resume exactly.

One loop (`Trainer`) for SFT and for every RL algorithm: what differs comes in as `Parts` (the loss,
the batch source, the reference weights, what else a save keeps), never as a subclass's hooks.

A checkpoint holds the trainable leaves, the optimizer state, the step and the RNG (an Orbax
`StandardSave`), and the data iterator's position plus the metrics so far (JSON). Frozen leaves
(the base model under LoRA) are not saved again: they come from the model the run started from.
Saving is asynchronous. A preemption notice (SIGTERM) makes the loop save at the end of a step and
raise `Preempted` (dcsft_jax.preemption: the one signal handler, and the step every process of a
multi-process run agrees to save).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dcsft_jax import fingerprint as fingerprint_lib
from dcsft_jax import preemption
from dcsft_jax.data import batching
from dcsft_jax.errors import CheckpointSaveFailed, UserError
from dcsft_jax.models import params as params_lib
from dcsft_jax.models import registry
from dcsft_jax.models.layers import LoraSpec, ModelOptions
from dcsft_jax.train import metrics as metrics_lib
from dcsft_jax.train import optim, sft

log = logging.getLogger(__name__)


class _QuietOrbaxProbes(logging.Filter):
  """Drops Orbax's own warning per damaged step (its metadata probe, when a manager lists the steps
  and when one is read): the trainer's one line per step says what it is and what was done."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_QuietOrbaxProbes())

# Dense bf16 peak per device, for MFU (None where unknown: the CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  batch_size: int                  # examples per optimizer step (global)
  accum: int = 1                   # micro-batches per step
  optim: optim.OptimConfig = optim.OptimConfig()
  lora: LoraSpec | None = None
  freeze_vit: bool = False
  freeze_aligner: bool = False
  save_every: int = 100
  keep: int = 2
  # When every checkpoint of a run cannot be read: 'restart' the stage from step 0, or 'stop' (each one
  # is kept aside as STEP.unreadable-TIME either way, to be looked at or moved back).
  damaged_checkpoints: str = "restart"
  stage: str = ""                  # the pipeline stage that runs it, for the restart its messages name
  seed: int = 0
  loss_positions_only: bool = True   # logits only where a target is (same loss and gradients)
  # Under LoRA, the frozen base is stored in this dtype (None: as given; see sft.init_state); a full
  # fine-tuning GRPO run stores its reference copy in it.
  frozen_dtype: Any = None

  @property
  def base_dtype(self):
    """The dtype the state's frozen leaves are stored in (None: as given)."""
    return self.frozen_dtype if self.lora is not None else None

  def __post_init__(self):
    if self.damaged_checkpoints not in ("restart", "stop"):
      raise ValueError(f"damaged_checkpoints {self.damaged_checkpoints!r} is not 'restart' or 'stop'")
    if self.batch_size % self.accum:
      raise ValueError(f"batch_size {self.batch_size} is not divisible by accum {self.accum}")


def _pad_to(arrays: dict[str, np.ndarray], L: int, P: int, cfg) -> dict[str, np.ndarray]:
  """Right-pads one micro-batch to L tokens and P patches, so micro-batches of a step stack. The image
  arrays are padded with what the family's layout writes on padding (batching.empty_arrays)."""
  from dcsft_jax.data import batching
  rows = arrays["input_ids"].shape[0]
  padding = batching.empty_arrays(batching.Bucket(P, 1), rows, cfg)    # padding rows of every image array
  out = {}
  for k, v in arrays.items():
    if k in ("input_ids", "attention_mask", "loss_mask"):
      v = np.pad(v, ((0, 0), (0, L - v.shape[1])))
    elif k == "positions":
      v = np.pad(v, ((0, 0), (0, 0), (0, L - v.shape[2])))
    elif k in padding and k not in batching.TEXT_KEYS:
      v = np.concatenate([v, padding[k][:, :P - v.shape[1]].astype(v.dtype)], axis=1)
    out[k] = v
  return out


def stack_micro(batches: Sequence[dict[str, np.ndarray]], cfg) -> dict[str, np.ndarray]:
  """Micro-batches of a model of `cfg` -> one [A, ...] stack, padded to the longest."""
  L = max(b["input_ids"].shape[1] for b in batches)
  P = max(b["pixel_values"].shape[1] for b in batches)
  padded = [_pad_to(b, L, P, cfg) for b in batches]
  return {k: np.stack([b[k] for b in padded]) for k in padded[0]}


# Figures that depend on the wall clock, not on the computation (left out of reproducibility checks).
TIMING_KEYS = ("tokens_per_s", "mfu", "step_seconds", "rollout_seconds")


_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large", "ENOSPC", "EDQUOT", "EFBIG")


class _ToLog(logging.Filter):
  """Drops Orbax's own reports of a failed write from the console (they arrive one per array, from
  its threads and at garbage collection, hundreds of lines) and appends them to the last run's trace
  file: the failure itself reaches the user as one CheckpointSaveFailed line or one set-aside warning."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    ours = ("orbax" in record.pathname and record.exc_info) or \
        (record.name == "asyncio" and "orbax" in text and "never retrieved" in text)
    if not ours:
      return True
    _append(_LAST_TRACE[0], f"[{record.name}] {text}\n" + (
        "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""))
    return False


def _append(path: str, text: str) -> None:
  if not path or jax.process_index() != 0:
    return
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
  except OSError:
    pass                   # the disk that refused a checkpoint may refuse the log too


_LAST_TRACE = [""]


def _quiet_hook(hook):
  def quiet(kind, value, tb):
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      _append(_LAST_TRACE[0], "".join(traceback.format_exception(kind, value, tb)))
      return
    hook(kind, value, tb)
  quiet.dcsft_quiet = True
  return quiet


def _quiet_unraisable(hook):
  def quiet(u):
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      _append(_LAST_TRACE[0], "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
      return
    hook(u)
  quiet.dcsft_quiet = True
  return quiet


def orbax_noise_to(trace: str) -> None:
  """From now on in this process, Orbax's per-array failure reports (its thread's logging.exception,
  asyncio's "Task/Future exception was never retrieved") and tensorstore's "Event loop is closed"
  callbacks into a loop Orbax already closed (printed through sys.excepthook or sys.unraisablehook)
  go to `trace`, not the
  console. For the process, not a block: the abandoned writes finish, and report, after the failure
  has long left the training loop."""
  _LAST_TRACE[0] = trace
  for lg in (logging.getLogger("absl"), logging.getLogger("asyncio")):
    if not any(isinstance(f, _ToLog) for f in lg.filters):
      lg.addFilter(_ToLog())
  if not getattr(sys.excepthook, "dcsft_quiet", False):
    sys.excepthook = _quiet_hook(sys.excepthook)
  if not getattr(sys.unraisablehook, "dcsft_quiet", False):     # the same, through PyErr_WriteUnraisable
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


@dataclasses.dataclass(frozen=True)
class Parts:
  """What one kind of training gives the loop (`Trainer`); the loop itself is the same for all of them.

  loss         the step's loss, in sft.make_train_step's form (sft.sft_loss; grpo.make_loss(algorithm))
  count_name   what the loss's count figure counts ("tokens"; "completions" for the RL figures)
  source       source(batches, state) -> (the next step's host arrays [A, b, ...], figures), the figure
               "_tokens_in" being the tokens the step reads; `batches` is the run's BatchIterator's
               iterator and `state` the TrainState before the step (an RL source samples with it)
  reference    the step takes a frozen copy of the starting weights as its last argument when the run
               trains them all (an RL step's KL reference; with LoRA it reads the base without adapters)
  postfix      postfix(metrics) -> the progress bar's figures
  after_save   after_save(the kept checkpoint steps): what else a save keeps or drops (RL: old rollouts)
  model_flops  whether 6N FLOPs per trained token counts the step's work (MFU); not when rollouts do
  fingerprint  what else decides the run's numbers, kept with every checkpoint
  """
  loss: Callable = sft.sft_loss
  count_name: str = "tokens"
  source: Callable | None = None
  reference: bool = False
  postfix: Callable[[dict], dict] = lambda m: {"loss": f"{m['loss']:.4f}", "tok_s": f"{m['tokens_per_s']:.0f}"}
  after_save: Callable[[Sequence[int]], None] | None = None
  model_flops: bool = True
  fingerprint: dict = dataclasses.field(default_factory=dict)


def sft_parts(cfg, tc: TrainConfig) -> Parts:
  """Supervised fine-tuning: micro-batches of the iterator's records, loss on the answer tokens."""
  def source(batches, state):
    host = stack_micro([next(batches).arrays for _ in range(tc.accum)], cfg)
    if tc.loss_positions_only:
      host["loss_index"], host["loss_select"] = sft.loss_positions(host["loss_mask"], host["valid"])
    return host, {"_tokens_in": float(host["attention_mask"].sum())}
  return Parts(source=source)


class Trainer:
  """Trains `params` (a full model or a LoRA-augmented one) on a batch iterator; resumes from `ckpt_dir`.

  One loop for every kind of training: what differs (the loss, how a step's batch is made, what else
  is saved) comes in `parts` (SFT's by default: sft_parts)."""

  def __init__(self, cfg, opts: ModelOptions, params, tc: TrainConfig, mesh, workdir: str,
               parts: Parts | None = None, fingerprint: dict | None = None):
    """`fingerprint`: what else decides the run (its data, its start model), kept with every checkpoint
    beside the TrainConfig and the parts' own; resuming under a different one stops with the difference."""
    self.cfg, self.tc, self.mesh, self.workdir = cfg, tc, mesh, workdir
    self.parts = parts = parts or sft_parts(cfg, tc)
    if parts.source is None:
      raise ValueError("Parts.source is required (sft_parts gives SFT's)")
    self.fingerprint = fingerprint_lib.of({"train": tc, **parts.fingerprint, **(fingerprint or {})})
    for k in ("save_every", "keep", "damaged_checkpoints", "stage"):   # no effect on the results
      self.fingerprint["train"].pop(k)
    if tc.optim.moments == "float32":      # as before the option existed: those runs still resume
      self.fingerprint["train"]["optim"].pop("moments", None)
    spec = step_spec(cfg, opts, tc, mesh, parts.loss, parts.count_name)
    self.opts, self.tx, self.mask, self.step_fn = spec.opts, spec.tx, spec.mask, spec.step_fn
    self.schedule = optim.schedule(tc.optim)
    self.n_params = params_lib.count_params(params)
    # Every leaf on the mesh by the logical rules, so restored checkpoints land in the same places,
    # and the state in the layout every step keeps (sft.state_layout).
    params = jax.device_put(params, sft.shardings(spec.params))
    rng = jax.random.key_data(jax.random.key(tc.seed))
    self.state = sft.init_state(params, self.tx, self.mask, rng, tc.base_dtype, layout=spec.layout)
    # The frozen starting weights, when the step takes them: a real copy, since the state's leaves are
    # donated to the step; stored like a LoRA run's frozen base (tc.frozen_dtype).
    self.reference = None
    if parts.reference and tc.lora is None:
      copy = (lambda x: x.astype(tc.frozen_dtype)) if tc.frozen_dtype is not None else (lambda x: x.copy())
      self.reference = jax.tree.map(copy, self.state.params)
    self.ckpt_dir = os.path.join(workdir, "checkpoints")
    self.manager = self._new_manager()
    # Model FLOPs per trained token (forward + backward), for MFU.
    self._flops_per_token = 6 * self.n_params if parts.model_flops else None

  # ------------------------------------------------------------------------- checkpoints
  def _saved(self):
    s = self.state
    return {"train": s.train, "opt_state": s.opt_state, "step": s.step, "rng": s.rng}

  def _new_manager(self):
    return _CheckpointManager(self.ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=self.tc.keep, enable_async_checkpointing=True))

  def save(self, iterator_state: dict, history: list[dict]) -> None:
    step = int(self.state.step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(self._saved()),
        meta=ocp.args.JsonSave({"iterator": iterator_state, "history": history,
                                "fingerprint": self.fingerprint})), force=True)
    if self.parts.after_save is not None:
      self.parts.after_save(self.manager.all_steps())

  def save_or_explain(self, fn, step: int, what: str | None = None):
    """fn() (a save, or waiting for the asynchronous one; `what`: another write, e.g. the finished
    model directory), with a failure turned into one CheckpointSaveFailed line; the whole trace goes
    to the log file a bug report needs."""
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - Orbax's writers raise whatever the filesystem does
      trace = self._log_trace(f"saving step {step}" + (f" ({what})" if what else ""), e)
      last = self._last_complete_step()
      text = f"{type(e).__name__}: {e}"
      cause = next((k for k in _DISK_FULL if k in text), None)
      hint = ("the disk (or quota) is full: free space, or give --config.workdir on a larger disk, and " if cause
              else "fix the cause and ")
      resume = f"step {last}" if last is not None else "the start (no step was saved)"
      raise CheckpointSaveFailed(
          f"saving {what or f'a checkpoint to {self.ckpt_dir}'} failed at step {step} "
          f"({cause or text.splitlines()[0][:200]}); "
          f"{hint}run the same command again: it resumes from {resume}. Full trace: {trace}") from None

  def _last_complete_step(self) -> int | None:
    """The newest step folder Orbax finished (it renames a step into place when complete)."""
    steps = [int(d) for d in os.listdir(self.ckpt_dir) if d.isdigit()] if os.path.isdir(self.ckpt_dir) else []
    return max(steps) if steps else None

  def _log_trace(self, what: str, error: BaseException) -> str:
    trace = os.path.join(self.workdir, "logs", "checkpoint_errors.log")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(trace), exist_ok=True)
      try:
        with open(trace, "a", encoding="utf-8") as f:
          f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n" + "".join(traceback.format_exception(error)))
      except OSError:
        pass                 # a full disk may refuse the log too: the console line still says it all
    return trace

  def restore(self) -> tuple[dict | None, list[dict]]:
    """Restores the latest readable checkpoint: (iterator state, history), or (None, []) for none.

    A step that cannot be read (a truncated file, an empty folder from a crash mid-save, a full
    disk) is set aside as STEP.unreadable-TIME, with one warning naming it and the cause, and the
    step before it is tried: the run loses those steps, not the whole run. When none is left, one line
    says the stage starts from step 0."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # noqa: BLE001 - Orbax's errors for a damaged step have no common type
        self._set_aside_if_damaged(step, e)
        continue
      if "fingerprint" in meta:     # checked before the weights are read; a deliberate stop, not damage
        fingerprint_lib.check(f"the training run in {self.ckpt_dir}", meta["fingerprint"], self.fingerprint,
                              f"Run with the same settings to resume it, or start the stage over with the new "
                              f"ones: --config.restart_stage={self.tc.stage or 'STAGE (cold_start, finetune or grpo)'}"
                              f" deletes its outputs, {self.ckpt_dir} among them.")
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._saved())
      try:
        st = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
      except Exception as e:  # noqa: BLE001
        self._set_aside_if_damaged(step, e)
        continue
      self.state = self.state.replace(train=st["train"], opt_state=st["opt_state"], step=st["step"], rng=st["rng"])
      log.warning("resumed from %s at step %d", self.ckpt_dir, step)
      return meta["iterator"], meta["history"]
    if steps and self.tc.damaged_checkpoints == "stop":
      raise UserError(f"no readable checkpoint left in {self.ckpt_dir} ({len(steps)} set aside as "
                      f"STEP.unreadable-TIME, each named above); move a good copy back as its step number, or run "
                      f"with --config.damaged_checkpoints=restart to start the stage from step 0")
    if steps:
      log.warning("no readable checkpoint left in %s (%d set aside, each named above): this run starts from "
                  "step 0 (--config.damaged_checkpoints=stop stops instead)", self.ckpt_dir, len(steps))
    return None, []

  def _set_aside_if_damaged(self, step: int, error: Exception) -> None:
    """Sets the step aside when the error is the checkpoint's (missing, truncated, undecodable
    files); re-raises what is the machine's (out of memory on smaller hardware, permissions, a
    network filesystem timing out), which would otherwise discard good checkpoints one by one."""
    text = f"{type(error).__name__}: {error}"
    if (isinstance(error, (MemoryError, PermissionError, TimeoutError, ConnectionError))
        or any(k in text for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "DEADLINE_EXCEEDED",
                                   "UNAVAILABLE", "Permission denied"))):
      raise error
    self._set_aside(step, error)

  def _set_aside(self, step: int, error: Exception) -> None:
    cause = (str(error).strip().splitlines() or [""])[0][:300]
    aside = os.path.join(self.ckpt_dir, f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    # The whole story goes to the log, for a bug report; the console gets one line.
    trace = self._log_trace(f"step {step} -> {aside}", error)
    log.warning("checkpoint step %d in %s cannot be read (%s: %s); moved to %s, trying the step before it "
                "(full trace: %s)", step, self.ckpt_dir, type(error).__name__, cause, aside, trace)
    if jax.process_index() == 0:
      os.replace(os.path.join(self.ckpt_dir, str(step)), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"dcsft-checkpoint-set-aside-{step}")
    # The manager lists the steps it found when it was made: a new one no longer sees the moved step.
    self.manager.close()
    self.manager = self._new_manager()

  # ------------------------------------------------------------------------- the loop
  def fit(self, iterator: batching.BatchIterator, *, progress: bool = True, on_step=None,
          hparams: dict | None = None) -> dict[str, Any]:
    """Trains to tc.steps, resuming from the latest checkpoint; metrics go to {workdir}/logs.

    on_step(step, metrics): called after each step; a dict it returns joins that step's metrics.
    hparams: the run's settings, for TensorBoard's HPARAMS tab (MetricsWriter.hparams).
    """
    orbax_noise_to(os.path.join(self.workdir, "logs", "checkpoint_errors.log"))
    tc = self.tc
    it_state, history = self.restore()
    if it_state is not None:
      iterator.restore(it_state)
    writer = metrics_lib.MetricsWriter(os.path.join(self.workdir, "logs"), resume_step=int(self.state.step))
    if hparams:
      writer.hparams(hparams)
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=int(self.state.step), desc="train", unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    peak = peak_flops_per_device()
    batches = iter(iterator)
    step = int(self.state.step)
    reference = () if self.reference is None else (self.reference,)
    try:
      with preemption.saving() as stop_check:
        # Asked before the first step too: a notice that came while the run restored or compiled stops
        # it here, with nothing new to save (what was restored is on disk). Every process asks here and
        # after every step, so their counts (preemption.Stop) stay in step.
        stop = stop_check()
        while step < tc.steps and stop is None:
          t0 = time.time()
          host, info = self.parts.source(batches, self.state)
          batch = {k: jax.make_array_from_process_local_data(
              _batch_sharding(self.mesh, k, v.ndim), v) for k, v in host.items()}
          t1 = time.time()
          self.state, m = self.step_fn(self.state, batch, *reference)
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          dt = time.time() - t1
          step = int(self.state.step)
          tokens_in = info.pop("_tokens_in")
          m.update(info)
          m["step_seconds"] = time.time() - t0
          m["tokens_per_s"] = tokens_in * jax.process_count() / dt
          m["mfu"] = (self._flops_per_token * m["tokens_per_s"] / (peak * jax.device_count())
                      if peak and self._flops_per_token else None)
          bar.update(1)
          bar.set_postfix(self.parts.postfix(m))
          if on_step is not None:
            m.update(on_step(step, m) or {})
          history.append({"step": step, **{k: v for k, v in m.items() if v is not None}})
          writer.write(step, {k: v for k, v in m.items() if v is not None})
          # Every process asks at every step: the agreed step has to be one that each of them asks about.
          stop = stop_check()
          if step % tc.save_every == 0 or step == tc.steps or stop is not None:
            self.save_or_explain(lambda: self.save(iterator.state(), history), step)
            writer.flush()
        # The last save finishes inside the section: a signal meanwhile is recorded, not fatal.
        self.save_or_explain(self.manager.wait_until_finished, step)
        if stop is not None:
          raise preemption.Preempted(step, self.ckpt_dir, stop)
    finally:
      bar.close()
      writer.close()
      try:
        self.save_or_explain(self.manager.wait_until_finished, step)
      finally:
        iterator.close()
    return {"steps": int(self.state.step), "history": history}

  @property
  def params(self):
    return self.state.params


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a run's jitted step is, without any real array: the model options it traces with, the
  optimizer and trainable mask, the parameters' and the state's layout (ShapeDtypeStructs with
  shardings) and the jitted step itself. The trainer runs it; dcsft_jax.aot compiles it for devices
  this host does not have."""
  opts: ModelOptions
  tx: Any
  mask: Any
  params: Any          # ShapeDtypeStructs of the (LoRA-augmented) parameters, sharded by the logical rules
  layout: sft.TrainState
  step_fn: Any


def train_options(opts: ModelOptions, tc: TrainConfig) -> ModelOptions:
  """The model options a run's step traces with: the run's adapters, dropout only where LoRA has it."""
  return dataclasses.replace(opts, lora=tc.lora, deterministic=tc.lora is None or tc.lora.dropout == 0.0)


def step_spec(cfg, opts: ModelOptions, tc: TrainConfig, mesh, loss=sft.sft_loss,
              count_name: str = "tokens") -> StepSpec:
  from dcsft_jax import mesh as mesh_lib
  opts = train_options(opts, tc)
  params = mesh_lib.abstract_params(registry.of(cfg).init_params(cfg, opts, abstract=True), mesh)
  tx = optim.optimizer(tc.optim)
  mask = optim.trainable_mask(params, lora=tc.lora is not None, freeze_vit=tc.freeze_vit,
                              freeze_aligner=tc.freeze_aligner)
  layout = sft.state_layout(params, tx, mask, mesh, tc.base_dtype)
  step_fn = _shared_step(cfg, opts, tc.optim, loss, count_name, sft.shardings(layout))
  return StepSpec(opts, tx, mask, params, layout, step_fn)


_STEPS: dict = {}


def _shared_step(cfg, opts, oc: optim.OptimConfig, loss, count_name: str, state_sharding):
  """One jitted step per (model, optimizer, loss, layout) in a process, so trainers built again (the
  pipeline's SFT runs, a resumed run) reuse its compiled program."""
  leaves, treedef = jax.tree.flatten(state_sharding)
  key = (cfg, opts, oc, loss, count_name, treedef, tuple(leaves))
  if key not in _STEPS:
    _STEPS[key] = sft.make_train_step(cfg, opts, optim.optimizer(oc), optim.schedule(oc), loss=loss,
                                      count_name=count_name, state_sharding=state_sharding)
  return _STEPS[key]


class _CheckpointManager(ocp.CheckpointManager):
  """Orbax's CheckpointManager, except that it leaves JAX's preemption sync to the training loop.

  Orbax asks reached_preemption_sync_point(step) itself, for its logs and metrics: in `save`, with the
  step the loop has just asked about, but also, on process 0, from the thread that finalizes an
  asynchronous save, steps later, with that save's step. That moves process 0's counter back; if the
  protocol read it then, the agreed step could be one that process 0 has passed and the others have
  not, and they would wait for it in a collective save."""

  def reached_preemption(self, step: int) -> bool:
    return False


def _batch_sharding(mesh, key: str, ndim: int):
  from dcsft_jax import mesh as mesh_lib
  # [A, b, ...]: the micro-batch axis stays whole, rows split over the batch axes.
  return mesh_lib.batch_sharding(mesh, ndim, 2 if key == "positions" else 1)


def adapter_options(opts: ModelOptions | None, lora: LoraSpec) -> ModelOptions:
  """The model options fresh adapters are made with: the run's (their param_dtype), with `lora`."""
  return dataclasses.replace(opts or ModelOptions(), lora=lora)


def init_lora(params, cfg, lora: LoraSpec, seed: int, mesh=None, opts: ModelOptions | None = None):
  """Adds freshly initialised adapters (B = 0, so the model is unchanged) to base params.

  Only the adapters are made, by one program (Family.init_program) whose outputs lie in their
  shardings on `mesh`; the base is never built again. Without a mesh, on the default device. The
  values are the same either way: the adapters of init_params(cfg, adapter options, PRNGKey(seed))."""
  fresh = params_lib.unbox(registry.of(cfg).init_params(cfg, adapter_options(opts, lora), jax.random.PRNGKey(seed),
                                                mesh=mesh, keep=params_lib.is_adapter))

  def merge(base, new):
    if isinstance(new, dict):
      base = base if isinstance(base, dict) else {}
      return {**base, **{k: merge(base.get(k), v) for k, v in new.items()}}
    return base if base is not None else new
  return merge(params, fresh)
