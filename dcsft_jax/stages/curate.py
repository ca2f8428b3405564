"""Difficulty curation: easy (all K right) / medium (mixed) / hard (none right), then the
training files of the configured recipes (SFT-M = medium, SFT-EM = easy + medium, ...), in the
paper's ms-swift messages JSON, with a summary and a pass-rate histogram."""
from __future__ import annotations

import json
import os

from dcsft_jax import curation, multihost
from dcsft_jax.stages import common


def run(config, ctx) -> dict:
  """Host work that writes shared files: process 0 does it, every process gets its figures."""
  return multihost.on_process_0(lambda: _curate(config, ctx))


def _curate(config, ctx) -> dict:
  c = config.curate
  wd = ctx.wd
  scores_path = wd.scores
  if not os.path.exists(scores_path):
    raise FileNotFoundError(f"{scores_path} not found: run the 'score' stage first")
  scores = curation.read_scores(scores_path)
  records = common.load_records(config, config.data.train, limit=config.data.train_limit, train=True)
  window = (float(c.window_lo), float(c.window_hi)) if (c.window_lo > 0 or c.window_hi < 1) else None
  out = {"summary": curation.summary(records, scores), "recipes": {}}
  table1_size = curation.table1_size(out["summary"])
  for recipe in [r.strip() for r in c.recipes.split(",") if r.strip()]:
    base, added = curation.parse_recipe(recipe)    # 'sft_em+hard0.2': Fig. 5's share of hard added back
    if added is None:
      added = 0.0 if "hard" in curation.RECIPES[base] else c.hard_ratio
    chosen = curation.select(records, scores, recipe=base, hard_ratio=added, window=window,
                             seed=config.seed, allow_missing=config.data.skip_bad_records)
    if base in curation.TABLE1:
      if not table1_size:
        empty = [b for b in curation.BUCKETS if not out["summary"]["buckets"][b]]
        raise ValueError(f"config.curate.recipes={c.recipes!r}: Table 1's recipes balance every bucket to the "
                         f"smallest, and the {'/'.join(empty)} bucket is empty (pass rates in {scores_path}); leave "
                         f"the table1_* recipes out, or score more training prompts")
      chosen = curation.balance(chosen, table1_size, config.seed)
    path = wd.recipe(recipe)
    # A recipe added to a finished curation (main: "recipes ... are new") is written alone: the files
    # already there are what the finished runs trained on, and stay as they are.
    n = len(json.load(open(path))) if os.path.exists(path) else \
        curation.write_curated(chosen, path, wd.curated_images)
    # The hard prompts in the recipe's data: Fig. 5's x axis is their share of it (13.5% in the
    # paper's standard SFT), where a '+hardR' recipe names a share of the hard bucket.
    hard = sum(1 for r in chosen if r.id in scores and scores[r.id].bucket == "hard")
    out["recipes"][recipe] = {"records": n, "hard": hard, "file": path}
  png = wd.pass_rates_png
  curation.pass_rate_histogram_png(scores, png, title=f"pass rates of {len(scores)} training prompts")
  out["histogram"] = png
  out["hard_ratio"], out["window"] = c.hard_ratio, window
  if any(curation.parse_recipe(r)[0] in curation.TABLE1 for r in out["recipes"]):
    out["table1"] = {"size": table1_size, "steps": curation.TABLE1_STEPS}
  # Last: the summary marks the stage done (Workdir.done_marker).
  common.write_json(wd.curation_summary, out)
  s = out["summary"]
  return {**{f"n_{b}": s["buckets"][b] for b in curation.BUCKETS},
          **{f"{r}_records": v["records"] for r, v in out["recipes"].items()}}
