"""Pass-rate scoring: K samples per training prompt from the cold-started model, each verified.

Writes scores/scores.jsonl (one line per record: id, completions, verdicts, pass_rate, ...), in the
records' order. While running, finished batches go to scores/scores.partial.jsonl, so a killed
run resumes at the first unfinished batch and ends with the same file.
"""
from __future__ import annotations

import os
import time

import jax

from dcsft_jax import preemption, sampling, verify
from dcsft_jax import fingerprint as fingerprint_lib
from dcsft_jax.data import sources
from dcsft_jax.stages import common

def sampling_params(s, model) -> sampling.SamplingParams:
  return sampling.settings(model.directory, model.processor, repetition_penalty=s.repetition_penalty,
                           pad_id=model.cfg.pad_token_id or 0, max_new_tokens=s.max_new_tokens,
                           num_samples=s.num_samples, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)


def score_row(rec, index: int, texts: list[str]) -> dict:
  """One line of scores.jsonl: the prompt's K sampled answers, each verified by its own task's checker,
  its verdict and, when wrong, the verifier's reason ("no box", "IoU 0.31 < 0.5", "option C, not B")."""
  judged = [verify.judge(rec.task, t, rec.answer) for t in texts]
  verdicts = [int(ok) for ok, _ in judged]
  return {"id": rec.id, "index": index, "task": rec.task, "answer": rec.answer, "completions": list(texts),
          "verdicts": verdicts, "reasons": [why for _, why in judged], "pass_rate": sum(verdicts) / len(verdicts)}


def run(config, ctx) -> dict:
  s = config.score
  records = common.load_records(config, config.data.train, limit=config.data.train_limit, train=True)
  model = common.load_model(config, ctx, s.model, max_pixels=s.max_pixels, sampling_only=True)
  sp = sampling_params(s, model)
  gen, it = common.generator(config, ctx, model, records, sp, batch_size=s.batch_size, seed=config.seed + 1,
                             source=config.data.train, batch_key="score.batch_size")
  plan = it.plan(0)
  # What decides the journal's rows and their batch order: resuming under other settings would mix them.
  train = sources.parse(config.data.train)
  fingerprint = {"model": fingerprint_lib.portable(model.directory, ctx.wd.root), "model_identity": fingerprint_lib.identity(model.directory),
                 "train": str(config.data.train), "records": len(records),
                 "train_identity": fingerprint_lib.identity(train.path) if train.kind in ("json", "hf") else None,
                 "train_limit": config.data.train_limit, "label_noise": config.data.label_noise, "seed": config.seed,
                 "batch_size": s.batch_size, "num_samples": sp.num_samples, "temperature": sp.temperature,
                 "top_k": sp.top_k, "top_p": sp.top_p, "max_new_tokens": sp.max_new_tokens,
                 "repetition_penalty": sp.repetition_penalty, "max_pixels": s.max_pixels or config.data.max_pixels,
                 "buckets": [[b.patches, b.length] for b in it.buckets]}
  journal = common.JsonlJournal(ctx.wd.scores_partial, fingerprint, stage="score")
  resumed = journal.next_batch
  done_rows = sum(int((plan[i][1] >= 0).sum()) for i in range(min(resumed, len(plan))))
  bar = common.progress(sum(int((rows >= 0).sum()) for _, rows in plan), "score")
  bar.update(done_rows)
  t0, n_new, answers = time.time(), 0, 0
  try:
    with preemption.saving() as stop:
      for out in gen.run(records, start_batch=resumed, iterator=it):
        rows = []
        for r, texts in zip(out.rows, out.texts):
          if r < 0:
            continue
          rows.append(score_row(records[r], int(r), texts))
        journal.commit(out.index, rows)
        n_new += len(rows)
        answers += len(rows) * sp.num_samples
        bar.update(len(rows))
        bar.set_postfix(answers_per_s=f"{answers / max(time.time() - t0, 1e-9):.1f}")
        # SIGTERM / Ctrl-C (one process), or the batch every host agreed on: this batch is in the
        # journal; stop here.
        signum = stop()
        if signum is not None:
          raise preemption.Preempted(out.index, journal.path, signum, unit="batch")
  finally:
    bar.close()
    journal.close()
  seconds = time.time() - t0
  rows = sorted(journal.rows, key=lambda x: x["index"])
  if len({x["id"] for x in rows}) != len(rows):
    raise RuntimeError(f"{journal.path} holds a record twice; delete it to score from scratch")
  skipped = [sk.record for sk in it.skipped]
  if jax.process_index() == 0:
    text = "".join(common.json.dumps(x, ensure_ascii=False) + "\n" for x in rows)
    common.write_text(ctx.wd.scores, text)
    os.remove(journal.path)
  rates = [x["pass_rate"] for x in rows]
  return {"records": len(rows), "skipped": len(skipped) + len(getattr(records, "skipped", [])),
          "resumed_at_batch": resumed,
          "prompts_per_s": round(n_new / seconds, 2) if seconds > 0 else None,
          "answers_per_s": round(answers / seconds, 2) if seconds > 0 else None,
          "mean_pass_rate": round(sum(rates) / len(rates), 4) if rates else None, "model": model.directory}
