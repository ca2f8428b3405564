"""Difficulty curation: easy (all K right) / medium (mixed) / hard (none right), then the
training files of the configured recipes (SFT-M = medium, SFT-EM = easy + medium, ...), in the
paper's ms-swift messages JSON, with a summary and a pass-rate histogram."""
from __future__ import annotations

import os

from dcsft_jax import curation
from dcsft_jax.stages import common, score

DIR = "curation"
OUTPUT = os.path.join(DIR, "summary.json")      # written last: its presence means the stage is done
IMAGES = os.path.join(DIR, "images")


def recipe_file(workdir: str, recipe: str) -> str:
  return os.path.join(workdir, DIR, f"{recipe}.json")


def run(config, ctx) -> dict:
  c = config.curate
  scores_path = os.path.join(ctx.workdir, score.OUTPUT)
  if not os.path.exists(scores_path):
    raise FileNotFoundError(f"{scores_path} not found: run the 'score' stage first")
  scores = curation.read_scores(scores_path)
  records = common.load_records(config, config.data.train, limit=config.data.train_limit, train=True)
  window = (float(c.window_lo), float(c.window_hi)) if (c.window_lo > 0 or c.window_hi < 1) else None
  out = {"summary": curation.summary(records, scores), "recipes": {}}
  for recipe in [r.strip() for r in c.recipes.split(",") if r.strip()]:
    chosen = curation.select(records, scores, recipe=recipe,
                             hard_ratio=0.0 if "hard" in curation.RECIPES[recipe] else c.hard_ratio, window=window,
                             seed=config.seed, allow_missing=config.data.skip_bad_records)
    path = recipe_file(ctx.workdir, recipe)
    n = curation.write_curated(chosen, path, os.path.join(ctx.workdir, IMAGES))
    out["recipes"][recipe] = {"records": n, "file": path}
  png = os.path.join(ctx.workdir, DIR, "pass_rates.png")
  curation.pass_rate_histogram_png(scores, png, title=f"pass rates of {len(scores)} training prompts")
  out["histogram"] = png
  out["hard_ratio"], out["window"] = c.hard_ratio, window
  common.write_json(os.path.join(ctx.workdir, OUTPUT), out)
  s = out["summary"]
  return {**{f"n_{b}": s["buckets"][b] for b in curation.BUCKETS},
          **{f"{r}_records": v["records"] for r, v in out["recipes"].items()}}
