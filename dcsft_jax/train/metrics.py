"""Training metrics to a JSONL file and TensorBoard (event files written by tensorboardX).

`tensorboard --logdir WORKDIR` shows every run of a workdir: each training run's scalars and settings
(train/{name}/logs) and the report's plots and text (plots/logs, stages/report.py).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX
from tensorboardX import summary as tbx_summary

from dcsft_jax import atomic

# tensorboardX names an event file by the second and the host, and truncates it: two writers of one
# process in one second (a quick resume) would write over each other, hence the pid and a counter.
_WRITERS = itertools.count()


def flatten(tree: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
  """Nested settings -> {"a.b": value}; a value that is not a bool, number or string becomes its str."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
  return out


class MetricsWriter:
  """One run's logs in `logdir`, written by process 0 only: per-step scalars to `metrics.jsonl` and
  TensorBoard (`write`), and the run's settings, text and images to TensorBoard alone.

  A run resumed from the checkpoint of step S runs and logs steps S+1.. again, so metrics.jsonl is cut
  to steps <= S and the new event file starts with a purge at step S+1 (tensorboardX's purge_step:
  TensorBoard drops the events of earlier files from that step on); every step then shows once. A
  fresh run (S = 0) purges too, so logs left by an earlier run in `logdir` do not show either.
  """

  def __init__(self, logdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.logdir = logdir
    if not self.active:
      return
    os.makedirs(logdir, exist_ok=True)
    self._jsonl_path = os.path.join(logdir, "metrics.jsonl")
    if os.path.exists(self._jsonl_path):
      keep = []
      with open(self._jsonl_path, encoding="utf-8") as f:
        for line in f:
          try:
            if json.loads(line)["step"] <= resume_step:
              keep.append(line)
          except (json.JSONDecodeError, KeyError):
            break
      atomic.write_text(self._jsonl_path, "".join(keep))   # a kill here must not empty the file
    self._jsonl = None      # opened by the first `write`: a log of images and text has no metrics.jsonl
    self._tb = tensorboardX.SummaryWriter(logdir, purge_step=resume_step + 1,
                                          filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    if self._jsonl is None:
      self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")

  def hparams(self, settings: Mapping) -> None:
    """The run's settings, flattened to "a.b" keys, for TensorBoard's HPARAMS tab.

    Only the session's start goes in, into this run's own event file: TensorBoard then lists every
    run of the log tree with its settings and offers the runs' scalars as the metrics. add_hparams
    would open a subfolder per call (a second run) and write an experiment summary, which makes the
    tab show that one summary's settings for every run.
    """
    if self.active:
      _, session_start, _ = tbx_summary.hparams(flatten(settings), {})
      self._tb.file_writer.add_summary(session_start)

  def text(self, tag: str, text: str, step: int = 0) -> None:
    """Markdown, which TensorBoard's TEXT tab renders (tables included)."""
    if self.active:
      self._tb.add_text(tag, text, step)

  def image(self, tag: str, image, step: int = 0) -> None:
    """A PIL image or an [H, W, C] uint8 array (C: 1, 3 or 4)."""
    if self.active:
      self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

  def flush(self) -> None:
    if self.active:
      self._tb.flush()
      if self._jsonl is not None:
        self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      if self._jsonl is not None:
        self._jsonl.close()
