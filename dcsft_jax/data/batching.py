"""Static-shape batches for jit: buckets, padding, per-host shards, prefetch, exact resume.

Every example falls into the smallest bucket (patches per image, tokens) that holds it, and a
batch is built from one bucket, so a run compiles one program per bucket, not one per image
size. Rows are right-padded: under the causal mask padding never changes a real token's result,
and padded rows carry valid=0 so they never count.

The order of an epoch is a pure function of (seed, epoch), so the iterator's position is just
(epoch, batch), and restoring it replays exactly the remaining batches. Every host computes the
same global plan and materialises only its own rows of each global batch.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import logging
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from dcsft_jax.data.records import BadRecord  # re-exported: one error type for bad input

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
  patches: int   # per image (0 = text only)
  length: int    # tokens per row


# Token lengths are rounded up to a multiple of this: cuDNN's attention backward refuses odd sequence
# lengths, and accelerators tile matmuls in multiples of 8 (the padding is masked, results unchanged).
LENGTH_MULTIPLE = 8


def make_buckets(patch_sizes: Sequence[int], text_tokens: int, merge_unit: int = 4) -> tuple[Bucket, ...]:
  """One bucket per image size class: room for the image's tokens plus `text_tokens` of text."""
  out = []
  for p in sorted(set(int(p) for p in patch_sizes)):
    if p % merge_unit:
      raise ValueError(f"bucket of {p} patches is not a multiple of the merge unit {merge_unit}")
    out.append(Bucket(p, -(-(p // merge_unit + text_tokens) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE))
  return tuple(out)


def auto_buckets(records: Sequence[Any], processor, *, with_answers: bool, max_buckets: int = 4,
                 system_prompt: str | None = None, skip_bad_records: bool = False) -> tuple[Bucket, ...]:
  """Buckets that fit `records`: up to `max_buckets` patch sizes at quantiles of the data (the
  largest covers every record), each with room for the longest text. Reads image headers only."""
  measured = []
  for i, rec in enumerate(records):
    try:
      measured.append(processor.measure(rec.image, rec.prompt, rec.answer if with_answers else None,
                                        system_prompt=system_prompt, name=str(rec.id)))
    except ValueError as e:
      if not skip_bad_records:
        raise BadRecord("dataset", i, str(e), "repair or remove the record, or set skip_bad_records",
                        record_id=str(getattr(rec, "id", i))) from None
  if not measured:
    raise ValueError("no readable records to plan buckets for")
  mu = processor.cfg.vision.merge_unit
  patches = np.asarray([p for p, _ in measured])
  text = max(n - p // mu for p, n in measured)
  qs = np.quantile(patches, np.linspace(0, 1, max_buckets + 1)[1:], method="higher")
  sizes = sorted(set(int(-(-q // mu) * mu) for q in qs))
  return make_buckets(sizes, int(text))


def choose(buckets: Sequence[Bucket], patches: int, length: int) -> int | None:
  for i, b in enumerate(buckets):
    if patches <= b.patches and length <= b.length:
      return i
  return None


@dataclasses.dataclass
class Batch:
  arrays: dict[str, np.ndarray]     # host-local rows, static shapes per bucket
  ids: list[str | None]             # record ids of the rows (None = padding row)
  bucket: Bucket
  epoch: int
  index: int                        # position of this batch in its epoch's plan


@dataclasses.dataclass
class Skipped:
  record: str
  reason: str


class BatchIterator:
  """Yields `Batch`es of `records` (objects with .id .image .prompt .answer) for one host.

  with_answers: training batches (answer + loss mask) or generation prompts (no answer).
  epochs: number of passes (None = forever). skip_bad_records: skip, count and log records that
  cannot be read instead of raising BadRecord.
  """

  def __init__(self, records: Sequence[Any], processor, *, batch_size: int, buckets: Sequence[Bucket],
               with_answers: bool = True, shuffle: bool = True, seed: int = 0, epochs: int | None = 1,
               drop_remainder: bool = False, skip_bad_records: bool = False, num_workers: int = 4,
               prefetch: int = 2, system_prompt: str | None = None, process_index: int | None = None,
               process_count: int | None = None, source: str = "dataset"):
    self.records = list(records)
    self.source = source  # names the dataset in errors (a file path, a TFDS name)
    self.processor = processor
    self.batch_size = int(batch_size)
    self.buckets = tuple(sorted(buckets))
    if not self.buckets:
      raise ValueError("no buckets configured")
    self.with_answers = with_answers
    self.shuffle, self.seed, self.epochs = shuffle, seed, epochs
    self.drop_remainder = drop_remainder
    self.skip_bad_records = skip_bad_records
    self.system_prompt = system_prompt
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if self.batch_size % self.process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {self.process_count} processes")
    self.local_rows = self.batch_size // self.process_count
    self.num_workers, self.prefetch = max(1, num_workers), max(1, prefetch)
    self.skipped: list[Skipped] = []
    self._pool = cf.ThreadPoolExecutor(self.num_workers, thread_name_prefix="batching")
    self.bucket_of = self._assign_buckets()
    self.epoch, self.next_batch = 0, 0

  # ----------------------------------------------------------------------------- planning
  def _bad(self, index: int, reason: str):
    rec = self.records[index]
    rid = str(getattr(rec, "id", index))
    # Where the record is in its data file (what the reader saw: earlier skips do not shift it), and
    # which file: the user repairs the file, not this iterator's list.
    meta = getattr(rec, "meta", None) or {}
    source, at = meta.get("source", self.source), meta.get("index", index)
    if not self.skip_bad_records:
      raise BadRecord(source, at, reason, "repair or remove the record, or set skip_bad_records to skip "
                      "(and count) such records", record_id=rid)
    self.skipped.append(Skipped(rid, reason))
    log.warning("%s: skipping record %d (id %r): %s", source, at, rid, reason)

  def _measure(self, rec):
    if self.with_answers and not str(getattr(rec, "answer", "") or "").strip():
      raise ValueError("its answer is empty")
    return self.processor.measure(rec.image, rec.prompt, rec.answer if self.with_answers else None,
                                  system_prompt=self.system_prompt, name=str(rec.id))

  def _assign_buckets(self) -> np.ndarray:
    """Bucket of every record (-1 = skipped), from image headers and token counts only."""
    out = np.full(len(self.records), -1, np.int32)
    futures = [self._pool.submit(self._measure, r) for r in self.records]
    biggest = self.buckets[-1]
    for i, (rec, fut) in enumerate(zip(self.records, futures)):
      try:
        patches, length = fut.result()
      except ValueError as e:
        self._bad(i, str(e))
        continue
      b = choose(self.buckets, patches, length)
      if b is None:
        self._bad(i, f"it needs {patches} patches and {length} tokens, more than the largest bucket "
                       f"({biggest.patches} patches, {biggest.length} tokens); lower max_pixels or add a bucket")
        continue
      out[i] = b
    return out

  def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The global batches of an epoch: (bucket, record indices with -1 for padding rows)."""
    n = len(self.records)
    order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
    queues: dict[int, list[int]] = collections.defaultdict(list)
    batches = []
    for i in order:
      b = int(self.bucket_of[i])
      if b < 0:
        continue
      queues[b].append(int(i))
      if len(queues[b]) == self.batch_size:
        batches.append((b, np.asarray(queues.pop(b))))
    if not self.drop_remainder:
      for b in sorted(queues):
        rows = queues[b] + [-1] * (self.batch_size - len(queues[b]))
        batches.append((b, np.asarray(rows)))
    return batches

  def __len__(self) -> int:
    return len(self.plan(0))

  # ----------------------------------------------------------------------------- state
  def state(self) -> dict:
    return {"epoch": self.epoch, "batch": self.next_batch, "seed": self.seed, "records": len(self.records)}

  def restore(self, state: dict) -> None:
    if state.get("seed", self.seed) != self.seed or state.get("records", len(self.records)) != len(self.records):
      raise ValueError(f"iterator state {state} was saved for another dataset or seed "
                       f"({len(self.records)} records, seed {self.seed})")
    self.epoch, self.next_batch = int(state["epoch"]), int(state["batch"])

  # ----------------------------------------------------------------------------- examples
  def _example(self, i: int):
    rec = self.records[i]
    try:
      ex = self.processor.encode(rec.image, rec.prompt, rec.answer if self.with_answers else None,
                                 system_prompt=self.system_prompt, name=str(rec.id))
    except ValueError as e:
      return e
    return ex

  def _assemble(self, bucket: Bucket, rows: np.ndarray, results: list) -> dict[str, np.ndarray]:
    cfg, family = self.processor.cfg, self.processor.family
    a = empty_arrays(bucket, len(rows), cfg, self.processor.tokenizer.pad_token_id or 0)
    for r, (i, ex) in enumerate(zip(rows, results)):
      if i < 0:
        continue
      if isinstance(ex, Exception):
        self._bad(int(i), str(ex))
        continue
      n = len(ex["input_ids"])
      for k in ("input_ids", "attention_mask", "loss_mask"):
        a[k][r, :n] = ex[k]
      a["positions"][:, r, :n] = ex["positions"]
      a["rope_deltas"][r], a["valid"][r], a["lengths"][r] = ex["rope_delta"], True, n
      if len(ex["image_grid_thw"]):
        npatch = len(ex["pixel_values"])
        a["pixel_values"][r, :npatch] = ex["pixel_values"]
        lay = family.vision_layout([tuple(ex["image_grid_thw"][0])], cfg.vision, a["pixel_values"].shape[1])
        for k, v in lay.items():
          a[k][r] = v[0]
    return a

  def _local_rows(self, rows: np.ndarray) -> np.ndarray:
    return rows[self.process_index * self.local_rows:(self.process_index + 1) * self.local_rows]

  def __iter__(self) -> Iterator[Batch]:
    pending: collections.deque = collections.deque()
    epoch, index = self.epoch, self.next_batch
    if self.epochs is not None and epoch >= self.epochs:
      return
    plan = self.plan(epoch)

    def submit():
      nonlocal epoch, index, plan
      while index >= len(plan):
        if self.epochs is not None and epoch + 1 >= self.epochs:
          return False
        epoch, index = epoch + 1, 0
        plan = self.plan(epoch)
      b, rows = plan[index]
      rows = self._local_rows(rows)
      futs = [self._pool.submit(self._example, int(i)) if i >= 0 else None for i in rows]
      pending.append((epoch, index, b, rows, futs))
      index += 1
      return True

    while len(pending) < self.prefetch and submit():
      pass
    while pending:
      e, k, b, rows, futs = pending.popleft()
      submit()
      results = [f.result() if f is not None else None for f in futs]
      arrays = self._assemble(self.buckets[b], rows, results)
      self.epoch, self.next_batch = e, k + 1
      yield Batch(arrays, [str(self.records[i].id) if i >= 0 else None for i in rows], self.buckets[b], e, k)

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)


TEXT_KEYS = ("input_ids", "attention_mask", "loss_mask", "positions", "rope_deltas", "valid", "lengths")


def empty_arrays(bucket: Bucket, rows: int, cfg, pad_id: int = 0) -> dict[str, np.ndarray]:
  """A batch of `rows` padding rows in `bucket`'s shapes for a model of `cfg`: every array a batch
  carries, with its dtype (the image arrays are the model family's). The batcher fills it;
  dcsft_jax.aot compiles against its shapes."""
  from dcsft_jax.models import registry
  vcfg = cfg.vision
  B, L, P = rows, bucket.length, max(bucket.patches, vcfg.merge_unit)
  return {
      "input_ids": np.full((B, L), pad_id, np.int32), "attention_mask": np.zeros((B, L), np.int32),
      "loss_mask": np.zeros((B, L), np.int32), "positions": np.zeros((3, B, L), np.int32),
      "rope_deltas": np.zeros((B,), np.int32), "valid": np.zeros((B,), bool),
      "lengths": np.zeros((B,), np.int32),
      "pixel_values": np.zeros((B, P, vcfg.patch_dim), np.float32),
      **registry.of(cfg).vision_layout([None] * B, vcfg, P),
  }


def model_inputs(arrays: dict[str, np.ndarray]) -> tuple:
  """(input_ids, positions, images, attention_mask) in the order the models' __call__ takes them; the
  image arrays are the batch's others (the family's image keys)."""
  images = {k: v for k, v in arrays.items() if k not in TEXT_KEYS}
  return arrays["input_ids"], arrays["positions"], images, arrays["attention_mask"]


def to_global(arrays: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Host-local rows -> global arrays sharded over the mesh's batch axes (multi-host safe)."""
  from dcsft_jax import mesh as mesh_lib
  out = {}
  for k, v in arrays.items():
    dim = 1 if k == "positions" else 0
    out[k] = jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, v.ndim, dim), v)
  return out
