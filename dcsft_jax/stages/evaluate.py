"""Greedy evaluation of one or more models on the in-distribution and OOD sets.

Per (model, set): eval/MODEL/SET.json in the shape of the paper's infer/test_dp.py output
({"accuracy", "results": [{"image", "question", "ground_truth", "model_output", "correct"}]}),
written when the set is finished (a re-run skips finished sets). Then eval/accuracy.json and
eval/accuracy.md, the table.
"""
from __future__ import annotations

import json
import os
import time

from dcsft_jax import preemption, run_config, sampling, verify
from dcsft_jax.data import sources
from dcsft_jax.stages import common

def _image_name(rec) -> str:
  return rec.image if isinstance(rec.image, str) else f"<in-memory image {rec.id}>"


def greedy_results(config, ctx, model, records, source: str, *, desc: str, sampler=None,
                   stop=None) -> tuple[list[dict], int]:
  """Greedy answers to `records`, verified -> (test_dp.py-shaped rows in record order, skipped).

  stop: a preemption.Stop, asked after each batch; a signal from it ends the set early (raising
  _SetStopped). None (the training curves): the trainer's own preemption handling applies."""
  e = config.evaluate
  sp = sampling.settings(model.directory, model.processor, repetition_penalty=e.repetition_penalty,
                         pad_id=model.cfg.pad_token_id or 0, max_new_tokens=e.max_new_tokens, num_samples=1,
                         temperature=0.0)
  gen, it = common.generator(config, ctx, model, records, sp, batch_size=e.batch_size, seed=config.seed,
                             source=source, batch_key="evaluate.batch_size", sampler=sampler)
  results = []
  bar = common.progress(len(records), desc)
  try:
    for out in gen.run(records, iterator=it):
      for r, texts in zip(out.rows, out.texts):
        if r < 0:
          continue
        rec = records[r]
        ok, why = verify.judge(rec.task, texts[0], rec.answer)
        results.append((int(r), {"id": rec.id, "task": rec.task, "image": _image_name(rec), "question": rec.prompt,
                                 "ground_truth": rec.answer, "model_output": texts[0], "correct": int(ok),
                                 "reason": why}))
        bar.update(1)
      signum = stop() if stop is not None else None
      if signum is not None:
        raise _SetStopped(signum)
  finally:
    bar.close()
  return [x for _, x in sorted(results, key=lambda t: t[0])], len(it.skipped)


class _SetStopped(Exception):
  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def accuracy_of(results: list[dict]) -> float | None:
  return sum(x["correct"] for x in results) / len(results) if results else None


def evaluate_set(config, ctx, model, name: str, spec, out_path: str, stop=None) -> dict:
  records = common.load_records(config, spec, limit=config.evaluate.limit)
  t0 = time.time()
  results, skipped = greedy_results(config, ctx, model, records, str(spec), desc=f"eval {name}", stop=stop)
  skipped += len(getattr(records, "skipped", []))      # the reader's skips, then the batcher's
  acc = accuracy_of(results)
  seconds = time.time() - t0
  common.write_json(out_path, {"model": model.directory, "dataset": str(spec), "accuracy": acc,
                               "n": len(results), "skipped": skipped, "results": results})
  return {"accuracy": acc, "n": len(results), "skipped": skipped,
          "prompts_per_s": round(len(results) / max(seconds, 1e-9), 2)}


def table(acc: dict[str, dict[str, float | None]], sets: list[str], ood: list[str]) -> str:
  cols = sets + (["OOD avg"] if ood else [])
  lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for m, row in acc.items():
    vals = [row.get(s) for s in sets]
    if ood:
      o = [row.get(s) for s in ood]
      vals.append(sum(o) / len(o) if all(v is not None for v in o) else None)
    lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{100 * v:.2f}" for v in vals) + " |")
  return "\n".join(lines) + "\n"


def _evaluate_all(config, ctx, e, sets, acc: dict, figures: dict, stop) -> None:
  """Every (model, set) not evaluated yet, into `acc` and `figures`; finished sets are read back."""
  for label, ref in run_config.evaluated_models(config):
    model = None
    acc[label] = {}
    for name, spec in sets.items():
      path = ctx.wd.eval_result(label, name)
      if os.path.exists(path):
        with open(path) as f:
          acc[label][name] = json.load(f)["accuracy"]
        continue
      model = model or common.load_model(config, ctx, ref, max_pixels=e.max_pixels, sampling_only=True)
      res = evaluate_set(config, ctx, model, name, spec, path, stop=stop)
      acc[label][name] = res["accuracy"]
      figures[f"{label}/{name}_prompts_per_s"] = res["prompts_per_s"]
      figures[f"{label}/{name}/skipped"] = res["skipped"]


def run(config, ctx) -> dict:
  e = config.evaluate
  sets = sources.parse_sets(config.data.eval)
  ood = [s.strip() for s in config.data.ood.split(",") if s.strip()]
  acc: dict[str, dict] = {}
  figures = {}
  with preemption.saving() as stop:
    try:
      _evaluate_all(config, ctx, e, sets, acc, figures, stop)
    except _SetStopped as s:      # SIGTERM / Ctrl-C: finished sets are on disk, the one in hand is redone
      done = sum(len(v) for v in acc.values())
      raise preemption.Preempted(done, ctx.wd.path("eval"), s.signum,
                              what=f"{done} finished evaluation set(s) in {ctx.wd.path('eval')}") from None
  md = table(acc, list(sets), ood)
  common.write_text(ctx.wd.accuracy_md, md)
  common.write_json(ctx.wd.accuracy_json, {"accuracy": acc, "sets": {k: str(v) for k, v in sets.items()},
                                                         "ood": ood})
  print(md)
  return {**{f"{m}/{s}": (None if v is None else round(v, 4)) for m, row in acc.items() for s, v in row.items()},
          **figures}
