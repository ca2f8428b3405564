"""The report: what a run found, in report.md, results.json and plots/*.png in the workdir.

- the accuracy table (rows: each evaluated model; columns: every evaluation set and the OOD average),
- the difficulty buckets of the training prompts,
- wall-clock seconds per stage,
- plots: the pass-rate histogram, training loss per run, OOD accuracy against step (Fig. 3), and
  the GRPO reward.
"""
from __future__ import annotations

import json
import os
import shutil

from dcsft_jax import plots
from dcsft_jax.stages import common, curate, evaluate, training

OUTPUT = "report.md"
RESULTS = "results.json"
PLOTS = "plots"
# Display names of the models the default config evaluates (others keep their own label).
PRETTY = {"base": "base", "cold_start": "cold start", "sft": "SFT", "grpo": "GRPO", "sft_m": "SFT-M",
          "sft_em": "SFT-EM"}


def _read(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _stage_seconds(workdir: str) -> dict[str, float]:
  stages = _read(os.path.join(workdir, "stages.json")) or {}
  return {k: v.get("seconds") for k, v in stages.items() if isinstance(v, dict)}


def _runs(workdir: str) -> list[str]:
  root = os.path.join(workdir, training.TRAIN)
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def _curves(workdir: str) -> dict[str, list[dict]]:
  out = {}
  for name in _runs(workdir):
    pts = _read(os.path.join(workdir, training.TRAIN, name, "curve.json"))
    if pts:
      out[name] = pts
  return out


def _plots(workdir: str, ood: list[str], curves: dict[str, list[dict]]) -> list[str]:
  d = os.path.join(workdir, PLOTS)
  os.makedirs(d, exist_ok=True)
  made = []
  hist = os.path.join(workdir, curate.DIR, "pass_rates.png")
  if os.path.exists(hist):
    made.append(shutil.copyfile(hist, os.path.join(d, "pass_rates.png")))
  losses = {}
  for name in _runs(workdir):
    h = training.history(workdir, name)
    if h and "reward" not in h[0]:           # GRPO's loss is another objective: it has its own plot
      losses[PRETTY.get(name, name)] = ([x["step"] for x in h], [x["loss"] for x in h])
  if losses:
    made.append(plots.line_png(os.path.join(d, "train_loss.png"), losses, title="training loss",
                               xlabel="step", ylabel="loss"))
  for s in ood:
    series = {PRETTY.get(n, n): ([p["step"] for p in pts if p.get(s) is not None],
                                 [100 * p[s] for p in pts if p.get(s) is not None])
              for n, pts in curves.items() if any(p.get(s) is not None for p in pts)}
    if series:
      made.append(plots.line_png(os.path.join(d, f"ood_{s}_vs_step.png"), series,
                                 title=f"{s} accuracy during training (Fig. 3)", xlabel="step",
                                 ylabel="accuracy (%)"))
  h = training.history(workdir, "grpo")
  if h and "reward" in h[0]:
    made.append(plots.line_png(os.path.join(d, "grpo_reward.png"),
                               {"mean reward": ([x["step"] for x in h], [x["reward"] for x in h]),
                                "zero-advantage groups": ([x["step"] for x in h],
                                                          [x.get("zero_advantage", 0.0) for x in h])},
                               title="GRPO: reward and groups with no signal", xlabel="step", ylabel="fraction"))
  return made


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def build(workdir: str) -> dict:
  """Reads the stages' outputs in `workdir` and writes report.md, results.json and plots/."""
  acc = _read(os.path.join(workdir, evaluate.OUTPUT))
  cur = _read(os.path.join(workdir, curate.OUTPUT))
  seconds = _stage_seconds(workdir)
  curves = _curves(workdir)
  sets = list(acc["sets"]) if acc else []
  ood = acc["ood"] if acc else []
  parts = ["# DC-SFT run report\n", f"Workdir: `{workdir}`\n"]
  results: dict = {"workdir": workdir, "seconds": seconds}
  if acc:
    parts += ["## Accuracy (%), greedy\n",
              "In-distribution: " + ", ".join(s for s in sets if s not in ood) + "; out of distribution: " +
              ", ".join(ood) + ".\n",
              evaluate.table({PRETTY.get(m, m): row for m, row in acc["accuracy"].items()}, sets, ood)]
    results["accuracy"] = acc["accuracy"]
    results["sets"], results["ood"] = acc["sets"], ood
    results["ood_average"] = {m: (sum(row[s] for s in ood) / len(ood) if ood and all(row.get(s) is not None
                                                                                      for s in ood) else None)
                              for m, row in acc["accuracy"].items()}
  if cur:
    s = cur["summary"]
    b = s["buckets"]
    parts += ["## Difficulty of the training prompts\n",
              f"{s['n']} prompts scored with K = {s['k']} samples each (mean pass rate "
              f"{100 * (s['mean_pass_rate'] or 0):.1f}%).\n",
              _md_table(["bucket", "rule", "prompts"],
                        [["easy", f"{s['k']}/{s['k']} right", str(b["easy"])],
                         ["medium", "mixed", str(b["medium"])], ["hard", f"0/{s['k']} right", str(b["hard"])]]),
              _md_table(["recipe", "training records"], [[r, str(v["records"])] for r, v in cur["recipes"].items()])]
    results["buckets"] = b
    results["pass_rate_hist"] = dict(zip(s["pass_rate_labels"], s["pass_rate_hist"]))
    results["recipes"] = {r: v["records"] for r, v in cur["recipes"].items()}
  runs = {}
  for name in _runs(workdir):
    h = training.history(workdir, name)
    if h:
      runs[name] = {"steps": h[-1]["step"], "first_loss": h[0]["loss"], "final_loss": h[-1]["loss"],
                    **({"final_reward": h[-1]["reward"]} if "reward" in h[-1] else {})}
  if runs:
    parts += ["## Training runs\n",
              _md_table(["run", "steps", "first loss", "final loss", "final reward (GRPO)"],
                        [[PRETTY.get(n, n), str(r["steps"]), f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}",
                          f"{r['final_reward']:.3f}" if "final_reward" in r else "-"] for n, r in runs.items()])]
    results["runs"] = runs
  results["curves"] = curves
  if seconds:
    parts += ["## Wall-clock time per stage\n",
              _md_table(["stage", "seconds"], [[k, f"{v:.1f}" if v is not None else "-"] for k, v in seconds.items()]),
              f"Total: {sum(v for v in seconds.values() if v):.1f} s.\n"]
  made = _plots(workdir, ood, curves)
  if made:
    parts += ["## Plots\n"] + [f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})\n" for p in made]
  results["plots"] = [os.path.relpath(p, workdir) for p in made]
  text = "\n".join(parts)
  common.write_json(os.path.join(workdir, RESULTS), results)
  common.write_text(os.path.join(workdir, OUTPUT), text)
  return results


def run(config, ctx) -> dict:
  res = build(ctx.workdir)
  print(open(os.path.join(ctx.workdir, OUTPUT)).read())
  return {"written": os.path.join(ctx.workdir, OUTPUT), "plots": len(res["plots"])}
