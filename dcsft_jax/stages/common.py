"""What several stages share: resolving model references, loading a model for sampling, reading
the configured datasets, atomic files and progress bars."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax

from dcsft_jax import atomic, checkpoint, run_config, sampling
from dcsft_jax import fingerprint as fingerprint_lib
from dcsft_jax.models import params as params_lib
from dcsft_jax import workdir as workdir_lib
from dcsft_jax.data import batching, sources
from dcsft_jax.data.processor import Processor
from dcsft_jax.models.layers import ModelOptions


def model_path(ctx, ref: str) -> str:
  """A stage's model directory name in the workdir (e.g. 'base_model'), or a path."""
  inside = ctx.wd.path(ref)
  if os.path.exists(inside) or os.path.exists(ref):
    return inside if os.path.exists(inside) else os.path.abspath(ref)
  maker = maker_stage(ctx, inside)
  raise FileNotFoundError(f"model {ref!r} not found: neither {inside} nor {os.path.abspath(ref)} exists. "
                          + (f"The {maker!r} stage makes it: run that stage first (in this command's "
                             f"--config.stages, or before it)." if maker else
                             "Give a model directory of this workdir or a path."))


@dataclasses.dataclass
class LoadedModel:
  directory: str
  cfg: object
  params: dict
  opts: ModelOptions
  processor: Processor


def maker_stage(ctx, directory: str) -> str | None:
  """The stage that writes a model directory of the workdir (None for a directory from elsewhere)."""
  directory = os.path.abspath(directory)
  maker = next((stage for stage in ("init", "pretrain", "cold_start") if os.path.dirname(ctx.wd.done_marker(stage)) == directory),
               None)
  if maker is None and os.path.dirname(directory) == ctx.wd.path("models"):
    maker = "grpo" if workdir_lib.split_run_name(os.path.basename(directory))[0] == "grpo" else "finetune"
  return maker


def load_model(config, ctx, ref: str, *, max_pixels: int = 0, sampling_only: bool = False) -> LoadedModel:
  """The model at `ref` with its processor; `max_pixels` (a stage's own cap) over data.max_pixels.
  `sampling_only` (scoring, evaluation): stored as run_config.sampling_options says."""
  directory = model_path(ctx, ref)
  opts = run_config.sampling_options(config, ctx.model_options) if sampling_only else ctx.model_options
  maker = maker_stage(ctx, directory)
  fix = f"rerun the stage that wrote it: --config.restart_stage={maker}" if maker else None
  cfg, params, lora = checkpoint.load_any(directory, mesh=ctx.mesh, opts=opts, fix=fix)
  if lora is not None and sampling_only and config.evaluate.merge_lora:
    # As the authors evaluate: the adapters merged into the weights (`swift export --merge_lora`), then
    # in the stored dtype; not applied on the fly, which rounds differently in bf16.
    params, lora = params_lib.merge_lora(params, lora.scale), None
  opts = dataclasses.replace(opts, lora=lora)
  return LoadedModel(directory, cfg, params, opts, processor_for(config, directory, cfg, max_pixels))


def processor_for(config, directory: str, cfg, max_pixels: int = 0) -> Processor:
  """The model directory's processor at the run's image sizes: a stage's own max_pixels (scoring and
  evaluation: the authors' qwen_vl_utils cap), else data.max_pixels (training's), else its own."""
  return Processor.from_pretrained(directory, cfg=cfg, min_pixels=config.data.min_pixels or None,
                                   max_pixels=max_pixels or config.data.max_pixels or None)


def load_records(config, spec, *, limit=None, train: bool = False, why_empty: str = ""):
  """The records of a data spec; none at all is a UserError naming it (an empty file, or all skipped),
  with `why_empty` as its explanation and fix when the caller knows them better."""
  d = config.data
  records = sources.load(spec, seed=config.seed, limit=limit or None, image_root=_image_root(d.image_root),
                         skip_bad_records=d.skip_bad_records, tfds_dir=d.tfds_dir, label_names=d.label_names or None,
                         label_noise=d.label_noise if train else 0.0, image_size=d.builtin_image_size)
  if not records:
    from dcsft_jax import errors
    raise errors.UserError(f"data {spec} holds no records" + (" (every record was skipped as bad)"
                                                              if d.skip_bad_records else "")
                           + (f": {why_empty}" if why_empty else ": point the config at a file or dataset with records"))
  return records


def _image_root(value: str):
  """'OLD=NEW' remaps an absolute prefix (the paper's /data/dataset/...); a plain dir re-roots."""
  if not value:
    return None
  old, sep, new = value.partition("=")
  return (old, new) if sep else value


def sampler_for(cfg, opts) -> sampling.Sampler:
  return sampling.shared_sampler(cfg, opts)


def generator(config, ctx, model: LoadedModel, records, sp: sampling.SamplingParams, *, batch_size: int,
              seed: int, source: str, batch_key: str, sampler: sampling.Sampler | None = None
              ) -> tuple[sampling.RecordGenerator, batching.BatchIterator]:
  """A RecordGenerator over `records`; pass `sampler` to reuse one sampler's compiled programs."""
  ways = ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
  if batch_size % ways:
    raise ValueError(f"config.{batch_key}={batch_size} is not divisible by the mesh's data x fsdp = {ways} "
                     f"batch shards; use a multiple of {ways}")
  buckets = batching.auto_buckets(records, model.processor, with_answers=False, max_buckets=config.data.max_buckets,
                                  skip_bad_records=config.data.skip_bad_records)
  gen = sampling.RecordGenerator(sampler or sampler_for(model.cfg, model.opts), model.params, model.processor, ctx.mesh,
                                 sp, batch_size=batch_size, buckets=buckets, seed=seed,
                                 skip_bad_records=config.data.skip_bad_records, source=source)
  return gen, gen.iterator(records)


def progress(total: int, desc: str, unit: str = "prompt"):
  """A tqdm bar with a rate, on the first process only (other hosts stay quiet)."""
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
              disable=jax.process_index() != 0, mininterval=1.0)


def write_json(path: str, obj) -> None:
  """Atomically, by the first process only (every host computes the same result)."""
  if jax.process_index() == 0:
    atomic.write_json(path, obj)


def write_text(path: str, text: str) -> None:
  if jax.process_index() == 0:
    atomic.write_text(path, text)


class JsonlJournal:
  """Append-only JSONL of finished batches, for stages that must resume after a kill.

  Each batch's lines are followed by a commit line {"_batch_done": i}; on open, anything after
  the last commit (a batch cut short, half a line) is cut off, so a resumed run restarts at the
  first batch not committed and no record is lost or written twice.

  The first line is the settings that made the journal (`fingerprint`: what decides its rows and
  their order). A run with other settings stops with the difference instead of mixing its rows with
  the old ones.
  """

  def __init__(self, path: str, fingerprint: dict | None = None, stage: str = ""):
    self.path = path
    self.rows: list[dict] = []
    self.next_batch = 0
    fingerprint = fingerprint_lib.of(fingerprint)
    good = 0
    if os.path.exists(path):
      pending: list[dict] = []
      with open(path, "rb") as f:
        data = f.read()
      offset = 0
      for raw in data.splitlines(keepends=True):
        offset += len(raw)
        if not raw.endswith(b"\n"):
          break
        try:
          obj = json.loads(raw)
        except json.JSONDecodeError:
          break
        if "_fingerprint" in obj:
          fingerprint_lib.check(path, obj["_fingerprint"], fingerprint, "Run with the same settings to resume "
                                "it, or start over with the new ones: "
                                + (f"--config.restart_stage={stage}" if stage else "delete the file") + ".")
          good = offset
        elif "_batch_done" in obj:
          self.rows += pending
          pending = []
          self.next_batch = int(obj["_batch_done"]) + 1
          good = offset
        else:
          pending.append(obj)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "ab") as f:
        f.truncate(good)
    self._f = open(path, "a", encoding="utf-8") if jax.process_index() == 0 else None
    if self._f is not None and good == 0:
      self._f.write(json.dumps({"_fingerprint": fingerprint}) + "\n")
      self._f.flush()

  def commit(self, batch_index: int, rows: list[dict]) -> None:
    self.rows += rows
    self.next_batch = batch_index + 1
    if self._f is None:
      return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    self._f.write(text + json.dumps({"_batch_done": batch_index}) + "\n")
    self._f.flush()
    os.fsync(self._f.fileno())

  def close(self):
    if self._f is not None:
      self._f.close()
