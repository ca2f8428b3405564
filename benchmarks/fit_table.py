"""BENCHMARKS.md's memory table: `python -m dcsft_jax.aot` for each (config, target), one process each
(a process holds one compiler's backend), then one markdown table of stages x targets.

  python benchmarks/fit_table.py --out=DIR [--configs=A.py,B.py] [--targets=h100x1,h100x8,v5e-8,v5p-8,v6e-8]
      [--max_batch_targets=h100x1,h100x8] [--records=2048] [--existing_only] [-- EXTRA AOT FLAGS]

A cell is the stage's binding program: fits (every program of the stage fits), its per-device GiB (the
largest of the stage's programs), the share of the budget it leaves (tight below aot.TIGHT_MARGIN, 5%)
and the largest per-device micro-batch where searched (the smallest over the stage's programs). Runs already in DIR (their JSON, and parts NAME.TARGET.PART.json from
`python -m dcsft_jax.aot --programs=STAGES --json=...`, merged program by program) are reused, so an
interrupted table resumes; --existing_only makes the table from them alone ("not run" where a pair has none).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

from dcsft_jax import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = "configs/bench/imagenet_synthetic_3b.py,configs/bench/imagenet_synthetic_7b.py"
TARGETS = "h100x1,h100x8,v5e-8,v5p-8,v6e-8"
# The paper's sizes (NOTES §1): scoring 16 prompts x K 8, GRPO 16 prompts x G 8, 128 new tokens each.
PAPER = ["--config.stages=init,cold_start,score,curate,finetune,grpo,evaluate",
         "--config.score.batch_size=16", "--config.score.max_new_tokens=128",
         "--config.evaluate.batch_size=32", "--config.evaluate.max_new_tokens=128"]
STAGES = [("cold_start", "cold start (full SFT)"), ("finetune", "LoRA SFT"), ("grpo", "GRPO (G = 8)"),
          ("score", "scoring (K = 8)"), ("evaluate", "evaluation (greedy)")]


def _stem(out: str, config: str, target: str) -> str:
  return os.path.join(out, f"{os.path.basename(config)[:-3]}.{target}")


def load(out: str, config: str, target: str) -> dict | None:
  """A pair's results: its column's JSON (NAME.TARGET.json) merged with any parts beside it
  (NAME.TARGET.PART.json: one aot run with `--programs=STAGES`, e.g. a slow TPU column compiled stage by
  stage so that an interrupted one keeps what finished, or a `--max_batch` search of some stages). A
  part's program replaces the column's program of the same name, parts in name order, except that a
  program whose largest batch was searched is never replaced by one whose was not. None when the pair
  has no file."""
  stem = _stem(out, config, target)
  paths = ([stem + ".json"] if os.path.exists(stem + ".json") else []) + sorted(glob.glob(glob.escape(stem) + ".*.json"))
  if not paths:
    return None
  merged, programs = None, {}
  for path in paths:
    r = json.load(open(path))
    merged = merged or r
    for p in r["programs"]:
      had = programs.get(p["name"])
      if had is None or had.get("max_rows_per_device") is None or p.get("max_rows_per_device") is not None:
        programs[p["name"]] = p
  return {**merged, "programs": list(programs.values())}


def run_one(config: str, target: str, out: str, *, max_batch: bool, records: int, extra: list[str]) -> dict:
  path = _stem(out, config, target) + ".json"
  cmd = [sys.executable, "-m", "dcsft_jax.aot", f"--config={config}", f"--target={target}", f"--json={path}",
         f"--records={records}", *PAPER, *extra] + (["--max_batch"] if max_batch else [])
  t0 = time.time()
  print("$", " ".join(cmd), flush=True)
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  log = os.path.join(out, os.path.basename(path)[:-5] + ".log")
  with open(log, "w") as f:
    f.write(r.stdout + "\n" + r.stderr)
  print(f"  exit {r.returncode} in {time.time() - t0:.0f} s; {log}", flush=True)
  if not os.path.exists(path):
    raise SystemExit(f"{config} on {target}: no JSON (exit {r.returncode}); see {log}")
  return json.load(open(path))


def cell(programs: list[dict]) -> str:
  if not programs:
    return "-"
  fits = all(p["compiled"] and p["fits"] for p in programs)
  # The TPU compiler refuses a program that cannot fit (RESOURCE_EXHAUSTED at compile time) and says
  # what its temporaries alone would need: that is the cell's figure then.
  oom = [re.search(r"HLO temporaries \(([0-9.]+)G\)", p.get("error") or "") for p in programs if not p["compiled"]]
  if any(oom):
    return "**no**, temporaries alone " + max(m.group(1) for m in oom if m)
  gib = max((p["bytes"].get("total") or 0) for p in programs) / 2 ** 30
  # Programs without a batch (parameter and adapter init) have no largest batch.
  batched = [p for p in programs if p.get("rows", 1)]
  rows = [p.get("max_rows_per_device") for p in batched]
  # A program that does not fit at the config's batch has no largest batch to show (the search says 0).
  if not fits or not batched or any(r is None for r in rows):
    mb = ""
  else:
    least = min(batched, key=lambda p: p["max_rows_per_device"])
    mb = ", max " + aot.max_rows_text(least["max_rows_per_device"], least.get("max_rows_at_least", False))
  # Headroom: the share of the budget the largest program leaves (aot.TIGHT_MARGIN marks a tight fit).
  budget = min((p.get("budget_bytes") or 0) for p in programs)
  spare = 1.0 - max((p["bytes"].get("total") or 0) for p in programs) / budget if budget else None
  room = "" if spare is None or not fits else f" ({aot.headroom_text(spare)} spare{', tight' if spare < aot.TIGHT_MARGIN else ''})"
  return f"{'yes' if fits else '**no**'} {gib:.1f}{room}{mb}"


def table(results: dict, configs: list[str], targets: list[str]) -> str:
  lines = ["| model | stage | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
  for c in configs:
    size = "7B" if "7b" in c else "3B"
    for stage, label in STAGES:
      cells = [cell([p for p in results[(c, t)]["programs"] if p["stage"] == stage]) if (c, t) in results
               else "not run" for t in targets]
      lines.append(f"| {size} | {label} | " + " | ".join(cells) + " |")
  budget = "; ".join(f"{t}: {r['budget_bytes'] / 2 ** 30:.1f} GiB"
                     for t in targets for r in [next((results[(c, t)] for c in configs if (c, t) in results), None)]
                     if r is not None)
  return "\n".join(lines) + f"\n\nA program fits in (per device): {budget}.\n"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--configs", default=CONFIGS)
  ap.add_argument("--targets", default=TARGETS)
  ap.add_argument("--max_batch_targets", default="h100x1,h100x8")
  ap.add_argument("--records", type=int, default=2048)
  ap.add_argument("--existing_only", action="store_true", help="table from the JSONs already in --out")
  a, extra = ap.parse_known_args()
  extra = [x for x in extra if x != "--"]
  os.makedirs(a.out, exist_ok=True)
  searched = set(a.max_batch_targets.split(","))
  results = {}
  configs, targets = a.configs.split(","), a.targets.split(",")
  for c in configs:
    for t in targets:
      done = load(a.out, c, t)     # reused: an interrupted table resumes
      if done is None and a.existing_only:
        continue
      results[(c, t)] = done or run_one(c, t, a.out, max_batch=t in searched, records=a.records, extra=extra)
  md = table(results, configs, targets)
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
