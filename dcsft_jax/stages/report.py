"""The report: what a run found, in report.md, results.json and plots/*.png in the workdir, and the
same for TensorBoard in plots/logs (see `_tensorboard`).

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

import jax
from PIL import Image

from dcsft_jax import plots, stats
from dcsft_jax.stages import common, evaluate, training
from dcsft_jax.workdir import Workdir
from dcsft_jax.train import metrics

# Display names of the models the default config evaluates (others keep their own label).
PRETTY = {"base": "base", "cold_start": "cold start", "sft": "SFT", "grpo": "GRPO", "sft_m": "SFT-M",
          "sft_em": "SFT-EM"}


def _read(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _stage_seconds(wd: Workdir) -> dict[str, float]:
  stages = _read(wd.stages) or {}
  return {k: v.get("seconds") for k, v in stages.items() if isinstance(v, dict)}


# The paper's OOD average (ImageNet-R, ImageNet-A) minus SFT's, Qwen2.5-VL-7B on ImageNet, in points:
# SFT 57.62, GRPO 59.48, SFT-M 60.41, SFT-EM 62.10.
PAPER_VS_SFT = {"grpo": 59.48 - 57.62, "sft_m": 60.41 - 57.62, "sft_em": 62.10 - 57.62}


def _correct(wd: Workdir, model: str, sets: list[str]) -> list[float] | None:
  """The model's per-example verdicts over `sets`, in record order (None if a set is missing)."""
  out = []
  for s in sets:
    res = _read(wd.eval_result(model, s))
    if res is None:
      return None
    out += [float(r["correct"]) for r in res["results"]]
  return out


def _versus_sft(wd: Workdir, acc: dict, ood: list[str]) -> dict[str, dict]:
  sft = _correct(wd, "sft", ood)
  out = {}
  for m in acc["accuracy"]:
    mine = None if m == "sft" or sft is None else _correct(wd, m, ood)
    if mine is not None and len(mine) == len(sft):
      iv = stats.paired_bootstrap(mine, sft)
      out[m] = {"diff": iv.diff, "lo": iv.lo, "hi": iv.hi, "verdict": iv.verdict}
  return out


def _reproduced(v: dict, paper: float | None) -> str:
  if paper is None:
    return "-"
  if v["verdict"] == "within noise":
    return "within noise"
  return "reproduced" if (v["verdict"] == "better") == (paper > 0) else "not reproduced"


def _skipped(wd: Workdir) -> dict[str, int]:
  """Records each stage skipped, from stages.json (keys `skipped` and `RUN/skipped`)."""
  stages = _read(wd.stages) or {}
  return {name: sum(int(v) for k, v in fig.items() if (k == "skipped" or k.endswith("/skipped"))
                    and isinstance(v, (int, float)))
          for name, fig in stages.items() if isinstance(fig, dict)}


def _curves(wd: Workdir) -> dict[str, list[dict]]:
  out = {}
  for name in wd.train_runs():
    pts = _read(wd.curve(name))
    if pts:
      out[name] = pts
  return out


def _plots(wd: Workdir, ood: list[str], curves: dict[str, list[dict]]) -> list[str]:
  d = wd.plots
  os.makedirs(d, exist_ok=True)
  made = []
  hist = wd.pass_rates_png
  if os.path.exists(hist):
    made.append(shutil.copyfile(hist, os.path.join(d, "pass_rates.png")))
  losses = {}
  for name in wd.train_runs():
    h = training.history(wd, name)
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
  h = training.history(wd, "grpo")
  if h and "reward" in h[0]:
    made.append(plots.line_png(os.path.join(d, "grpo_reward.png"),
                               {"mean reward": ([x["step"] for x in h], [x["reward"] for x in h]),
                                "zero-advantage groups": ([x["step"] for x in h],
                                                          [x.get("zero_advantage", 0.0) for x in h])},
                               title="GRPO: reward and groups with no signal", xlabel="step", ylabel="fraction"))
  return made


def _tensorboard(wd: Workdir, text: str, made: list[str]) -> None:
  """The report's text and its plots (images tagged plots/NAME) as a TensorBoard run in plots/logs:
  `tensorboard --logdir WORKDIR` shows it next to the training runs (train/*/logs), whose scalars are
  the curves the plots draw. Rebuilt from scratch like plots/, so a second report replaces the first."""
  d = os.path.join(wd.plots, "logs")
  if jax.process_index() == 0:
    shutil.rmtree(d, ignore_errors=True)
  w = metrics.MetricsWriter(d)
  w.text("report", text)
  for p in made:
    w.image(f"plots/{os.path.splitext(os.path.basename(p))[0]}", Image.open(p).convert("RGB"))
  w.close()


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def build(workdir: str) -> dict:
  """Reads the stages' outputs in `workdir` and writes report.md, results.json and plots/."""
  wd = Workdir(workdir)
  acc = _read(wd.accuracy_json)
  cur = _read(wd.curation_summary)
  seconds = _stage_seconds(wd)
  curves = _curves(wd)
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
  if acc and ood and "sft" in acc["accuracy"]:
    versus = _versus_sft(wd, acc, ood)
    if versus:
      results["ood_vs_sft"] = versus
      parts += ["## Out of distribution, against SFT\n",
                "Each method's OOD accuracy minus SFT's, in points, with the 95% interval of a paired bootstrap "
                "over the evaluation images (one training seed), beside the paper's (Qwen2.5-VL-7B on "
                "ImageNet, the average of ImageNet-R and ImageNet-A). \"Within noise\": the interval holds 0.\n",
                _md_table(["method", "ours", "95% interval", "verdict", "paper", "the paper's ordering here"],
                          [[PRETTY.get(m, m), f"{100 * v['diff']:+.2f}", f"[{100 * v['lo']:+.2f}, {100 * v['hi']:+.2f}]",
                            v["verdict"], f"{PAPER_VS_SFT[m]:+.2f}" if m in PAPER_VS_SFT else "-",
                            _reproduced(v, PAPER_VS_SFT.get(m))] for m, v in versus.items()])]
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
    noisy = s.get("noisy_labels") or {}
    if sum(noisy.values()):
      n = sum(noisy.values())
      parts.append(f"Label noise: {n} training prompts carry a wrong label on purpose (`data.label_noise`); "
                   f"{noisy['hard']} of them ({100 * noisy['hard'] / n:.0f}%) landed in hard, {noisy['medium']} in "
                   f"medium, {noisy['easy']} in easy.\n")
      results["noisy_labels"] = noisy
    results["buckets"] = b
    results["pass_rate_hist"] = dict(zip(s["pass_rate_labels"], s["pass_rate_hist"]))
    results["recipes"] = {r: v["records"] for r, v in cur["recipes"].items()}
  runs = {}
  for name in wd.train_runs():
    h = training.history(wd, name)
    if h:
      runs[name] = {"steps": h[-1]["step"], "first_loss": h[0]["loss"], "final_loss": h[-1]["loss"],
                    **({"final_reward": training.final_reward(h)} if "reward" in h[-1] else {})}
  if runs:
    parts += ["## Training runs\n",
              _md_table(["run", "steps", "first loss", "final loss", "final reward (GRPO, mean of the last 5 steps)"],
                        [[PRETTY.get(n, n), str(r["steps"]), f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}",
                          f"{r['final_reward']:.3f}" if "final_reward" in r else "-"] for n, r in runs.items()])]
    results["runs"] = runs
  results["curves"] = curves
  skipped = _skipped(wd)
  results["skipped"] = skipped
  if any(skipped.values()):
    parts += ["## Skipped records\n", "Records left out as unreadable (`data.skip_bad_records`), per stage "
              "(the stage's log names each one):\n",
              _md_table(["stage", "skipped"], [[k, str(v)] for k, v in skipped.items()])]
  if seconds:
    parts += ["## Wall-clock time per stage\n",
              _md_table(["stage", "seconds"], [[k, f"{v:.1f}" if v is not None else "-"] for k, v in seconds.items()]),
              f"Total: {sum(v for v in seconds.values() if v):.1f} s.\n"]
  made = _plots(wd, ood, curves)
  # TensorBoard's copy leaves out the Plots section: its links do not resolve there, the images have a tab.
  _tensorboard(wd, "\n".join(parts), made)
  if made:
    parts += ["## Plots\n"] + [f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})\n" for p in made]
  results["plots"] = [os.path.relpath(p, workdir) for p in made]
  text = "\n".join(parts)
  common.write_json(wd.results, results)
  common.write_text(wd.report, text)
  return results


def run(config, ctx) -> dict:
  res = build(ctx.workdir)
  print(open(ctx.wd.report).read())
  return {"written": ctx.wd.report, "plots": len(res["plots"])}
