"""The report: what a run found, in report.md, results.json and plots/*.png in the workdir, and the
same for TensorBoard in plots/logs (see `_tensorboard`).

- the accuracy table (rows: each evaluated model; columns: every evaluation set and the OOD average),
- the difficulty buckets of the training prompts,
- wall-clock seconds per stage,
- plots: the pass-rate histogram, training loss per run, OOD accuracy against step (Fig. 3), and
  the GRPO reward.
"""
from __future__ import annotations

import dataclasses
import json
import glob
import os
import shutil

import jax
import numpy as np
from PIL import Image

from dcsft_jax import curation, multihost, plots, stats, verify
from dcsft_jax.stages import common, evaluate, training
from dcsft_jax.workdir import Workdir, split_run_name
from dcsft_jax.train import metrics

# Display names of the models the default config evaluates (others keep their own label).
PRETTY = {"base": "base", "pretrain": "pretraining", "cold_start": "cold start", "sft": "SFT", "grpo": "GRPO", "sft_m": "SFT-M",
          "sft_em": "SFT-EM", "easy": "easy only", "medium": "medium only", "hard": "hard only",
          "dr_grpo": "Dr. GRPO", "dapo": "DAPO", "gspo": "GSPO", "rloo": "RLOO",
          "table1_easy": "easy (Table 1)", "table1_medium": "medium (Table 1)", "table1_hard": "hard (Table 1)"}


def pretty(label: str) -> str:
  """A model label for people: 'sft_em+hard0.2.seed1' -> 'SFT-EM + 20% hard (seed 1)'."""
  method, seed = split_run_name(label)
  base, added = curation.recipe_parts(method) or (method, None)
  name = PRETTY.get(base, base) + (f" + {100 * added:g}% hard" if added is not None else "")
  return name + (f" (seed {seed})" if seed else "")


def _read(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _stage_seconds(wd: Workdir) -> dict[str, float]:
  stages = _read(wd.stages) or {}
  return {k: v.get("seconds") for k, v in stages.items() if isinstance(v, dict)}


@dataclasses.dataclass(frozen=True)
class PaperFigure:
  """One of the paper's comparisons: `method`'s OOD average minus `reference`'s, in points."""
  reference: str
  points: float
  source: str


# Table 2 of the paper (Qwen2.5-VL-7B, NOTES §3): each method's OOD columns, ImageNet-R, ImageNet-A,
# Ref-L4 and Lisa, and the "OOD Avg" it prints. The figures set beside a run are computed from the
# columns its OOD sets stand for: the ImageNet-R/A mean for classification sets (SFT 44.36, GRPO
# +3.16, SFT-M +4.78, SFT-EM +5.88), all four for a run with both tasks' OOD sets.
TABLE2 = {"sft": (49.58, 39.14, 72.15, 69.60), "grpo": (51.38, 43.65, 71.60, 71.29),
          "sft_m": (55.79, 42.49, 73.20, 70.14), "sft_em": (55.90, 44.57, 73.40, 70.51)}
TABLE2_PRINTED_AVG = {"sft": 57.62, "grpo": 59.48, "sft_m": 60.41, "sft_em": 62.10}
# SFT-EM's printed 62.10 does not match its own columns, which average to 61.10 (NOTES [D]): the
# four-set figure gives both readings.


def table2_gain(method: str, columns: slice) -> float:
  """`method`'s Table 2 gain over SFT on the mean of the given columns, in points, to the table's two
  decimals (half up, in decimal: GRPO's ImageNet-R/A gain is 47.515 - 44.36 = +3.155, so +3.16)."""
  from decimal import ROUND_HALF_UP, Decimal
  mean = lambda m: sum(Decimal(str(v)) for v in TABLE2[m][columns]) / len(TABLE2[m][columns])
  return float((mean(method) - mean("sft")).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


IMAGENET, GROUNDING, FOUR_SETS = slice(0, 2), slice(2, 4), slice(0, 4)
PAPER = {
    **{(m, "sft"): PaperFigure("sft", table2_gain(m, IMAGENET), "Table 2, ImageNet-R/A") for m in ("grpo", "sft_m", "sft_em")},
    # Table 1 (ImageNet-R/A mean) belongs to its protocol, each bucket balanced to the smallest and
    # trained 100 steps (curation.TABLE1); a whole bucket for the run's steps is another experiment.
    ("table1_easy", "cold_start"): PaperFigure("cold_start", (2.05 + 1.03) / 2, "Table 1"),
    ("table1_medium", "cold_start"): PaperFigure("cold_start", (1.35 + 1.36) / 2, "Table 1"),
    ("table1_hard", "cold_start"): PaperFigure("cold_start", (-14.07 - 6.20) / 2, "Table 1"),
}
# A grounding run (Ref-L4 and Lisa roles): their columns' mean.
PAPER_GROUNDING = {(m, "sft"): PaperFigure("sft", table2_gain(m, GROUNDING), "Table 2, Ref-L4/Lisa")
                   for m in ("grpo", "sft_m", "sft_em")}
# A run whose OOD sets are both tasks' (ImageNet-R/A and Ref-L4/Lisa roles): the four-set average.
PAPER_FOUR_SETS = {
    ("grpo", "sft"): PaperFigure("sft", table2_gain("grpo", FOUR_SETS), "Table 2, OOD Avg"),
    ("sft_m", "sft"): PaperFigure("sft", table2_gain("sft_m", FOUR_SETS), "Table 2, OOD Avg"),
    # Its columns give +3.48; the table prints 62.10, +4.48.
    ("sft_em", "sft"): PaperFigure("sft", table2_gain("sft_em", FOUR_SETS),
                                   "Table 2, OOD Avg of its columns; printed +4.48, which its row does not add up to"),
}
PAPER_ORDER = ("sft", "grpo", "sft_m", "sft_em")     # Table 2's OOD ranking, worst to best


def paper_figure(method: str, reference: str, four_sets: bool = False, grounding: bool = False) -> PaperFigure | None:
  """The paper's figure for this comparison: ImageNet's (classification OOD sets), Ref-L4 and Lisa's
  (grounding OOD sets: Table 2 only, Table 1 and Fig. 5 are ImageNet's), or Table 2's four-set average
  where the run's OOD sets hold both classification and grounding."""
  if four_sets or grounding:
    return (PAPER_FOUR_SETS if four_sets else PAPER_GROUNDING).get((method, reference))
  if (method, reference) in PAPER:
    return PAPER[(method, reference)]
  base, added = curation.recipe_parts(method) or (method, None)
  # Fig. 5 adds hard prompts to SFT-EM's data; only its 5% point was reported, and OOD falls as the
  # share grows, so the sign is the claim at any share.
  if added and base == "sft_em" and reference == base:
    return PaperFigure(base, (-3.74 - 2.51) / 2, "Fig. 5, at 5% hard; lower as the share grows")
  return None


def _correct(wd: Workdir, label: str, sets: list[str]) -> list[float] | None:
  """The model's per-example verdicts over `sets`, in record order (None if a set is missing)."""
  out = []
  for s in sets:
    res = _read(wd.eval_result(label, s))
    if res is None:
      return None
    out += [float(r["correct"]) for r in res["results"]]
  return out


def methods_of(labels) -> dict[str, list[str]]:
  """Evaluated labels grouped by method, seeds in order: {'sft': ['sft', 'sft.seed1', ...], ...}."""
  out: dict[str, list[tuple[int, str]]] = {}
  for label in labels:
    method, seed = split_run_name(label)
    out.setdefault(method, []).append((seed, label))
  return {m: [label for _, label in sorted(v)] for m, v in out.items()}


def _verdicts(wd: Workdir, labels: list[str], sets: list[str]) -> np.ndarray | None:
  """[seeds, images] verdicts of one method (None when a seed lacks a set or the seeds' sets differ)."""
  rows = [_correct(wd, label, sets) for label in labels]
  if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
    return None
  return np.asarray(rows)


def set_tasks(wd: Workdir, labels, sets: list[str]) -> dict[str, list[str]]:
  """{set: the tasks of its records}, read from the first model's results that have them."""
  out: dict[str, list[str]] = {}
  for s in sets:
    for label in labels:
      res = _read(wd.eval_result(label, s))
      if res is not None:
        out[s] = sorted({r.get("task", "classification") for r in res["results"]})
        break
  return out


def by_task(wd: Workdir, labels, sets: list[str], ood: list[str], tasks: list[str]) -> dict:
  """{model: {task: {'id': accuracy, 'ood': accuracy}}}: each task's records pooled over the ID sets
  and over the OOD sets (None where a model has none of that task there)."""
  out = {}
  for label in labels:
    row = {t: {"id": [], "ood": []} for t in tasks}
    for s in sets:
      res = _read(wd.eval_result(label, s))
      for r in (res or {}).get("results", []):
        row[r.get("task", "classification")]["ood" if s in ood else "id"].append(r["correct"])
    out[label] = {t: {k: (sum(v) / len(v) if v else None) for k, v in d.items()} for t, d in row.items()}
  return out


def _metric_sentence(tasks_of: dict[str, list[str]]) -> str:
  tasks = sorted({t for v in tasks_of.values() for t in v})
  if len(tasks) == 1:
    return f"Metric: {verify.METRICS[tasks[0]]} ({tasks[0]}), in % of each set's records.\n"
  return ("Metric per task: " + "; ".join(f"{t}: {verify.METRICS[t]}" for t in tasks) + ". A set's figure pools "
          "its records of every task; the table after it splits them by task.\n")


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """Two methods' [seeds, images] verdicts as pairs: seed i with seed i; a one-model method (the cold
  start) is the same model against every seed of the other."""
  if a.shape[1] != b.shape[1]:
    return None
  if len(a) == 1 or len(b) == 1:
    n = max(len(a), len(b))
    return np.broadcast_to(a, (n, a.shape[1])), np.broadcast_to(b, (n, b.shape[1]))
  n = min(len(a), len(b))
  return a[:n], b[:n]


def _comparisons(wd: Workdir, groups: dict[str, list[str]], ood: list[str], paper: str | None = "imagenet") -> list[dict]:
  """Every method against SFT, and against the paper's other references (the cold start for one bucket
  alone, the recipe it extends for '+hardR'): the OOD difference, its paired-bootstrap interval over
  seeds and evaluation images, and the paper's figure where it has one."""
  verdicts = {m: _verdicts(wd, labels, ood) for m, labels in groups.items()}
  # Table 1's runs answer to the cold start alone (their protocol is not SFT's).
  pairs = [(m, "sft") for m in groups if m != "sft" and m not in curation.TABLE1] if "sft" in groups else []
  for m in groups:
    base, added = curation.recipe_parts(m) or (m, None)
    if m in ("easy", "medium", "hard") + curation.TABLE1:
      pairs.append((m, "cold_start"))
    elif added is not None and base != "sft":
      pairs.append((m, base))
  out = []
  for m, ref in pairs:
    if verdicts.get(m) is None or verdicts.get(ref) is None:
      continue
    paired = _paired(verdicts[m], verdicts[ref])
    if paired is None:
      continue
    iv = stats.paired_bootstrap(*paired)
    # The paper's figures: ImageNet's for classification OOD sets, the four-set average for both tasks'.
    fig = paper_figure(m, ref, four_sets=paper == "four", grounding=paper == "grounding") if paper else None
    out.append({"method": m, "reference": ref, "seeds": int(paired[0].shape[0]), "diff": iv.diff, "lo": iv.lo,
                "hi": iv.hi, "verdict": iv.verdict, "paper": None if fig is None else fig.points,
                "paper_source": None if fig is None else fig.source, "reproduced": _reproduced(iv.verdict, fig)})
  return out


def _reproduced(verdict: str, fig: PaperFigure | None) -> str:
  if fig is None:
    return "-"
  if verdict == "within noise":
    return "within noise"
  return "reproduced" if (verdict == "better") == (fig.points > 0) else "not reproduced"


def _ordering_sentence(comparisons: list[dict], ood_means: dict[str, float]) -> str:
  """The plain-words verdict: the paper's OOD ordering, ours, and how each claim fared."""
  have = [m for m in PAPER_ORDER if m in ood_means]
  ours = sorted(have, key=lambda m: ood_means[m])
  claims = [c for c in comparisons if c["paper"] is not None]
  tally = {k: [pretty(c["method"]) + (f" vs {pretty(c['reference'])}" if c["reference"] != "sft" else "")
               for c in claims if c["reproduced"] == k] for k in ("reproduced", "not reproduced", "within noise")}
  parts = []
  if len(have) > 1:
    parts.append("The paper's OOD ordering is " + " < ".join(pretty(m) for m in have) + "; ours (means) is " +
                 " < ".join(f"{pretty(m)} {100 * ood_means[m]:.2f}" for m in ours) + ".")
  if claims:
    parts.append(f"Of the paper's {len(claims)} comparisons here: " + "; ".join(
        f"{len(v)} {k}" + (f" ({', '.join(v)})" if v else "") for k, v in tally.items()) + ".")
    if not tally["reproduced"]:
      parts.append("So the paper's finding is not reproduced by this run; a difference counts only when its "
                   "95% interval excludes 0.")
  return " ".join(parts) + "\n"


def _table1_sentence(cur: dict | None, groups: dict) -> list[str]:
  """How the Table 1 rows were trained (the protocol's subset size and steps), and what the plain
  one-bucket recipes are, so neither is read for the other."""
  out = []
  t1 = (cur or {}).get("table1")
  if t1 and any(m in groups for m in curation.TABLE1):
    out.append(f"Table 1's protocol: easy, medium and hard each cut to the smallest bucket's size, "
               f"{t1['size']} prompts (a seeded random subset of each), and trained {t1['steps']} steps each from "
               f"the cold start, as the paper's Table 1 does; their rows are the ones set beside it.")
  plain = [m for m in ("easy", "medium", "hard") if m in groups]
  if plain and cur:
    n = {m: cur["recipes"].get(m, {}).get("records") for m in plain}
    out.append("The " + ", ".join(f"{pretty(m)} run ({n[m]} prompts)" for m in plain) +
               (" trains" if len(plain) == 1 else " train") + " a whole bucket for the run's own steps, not Table "
               "1's protocol, so no paper figure is set beside " + ("it" if len(plain) == 1 else "them") + ".")
  return [" ".join(out) + "\n"] if out else []


def _skipped(wd: Workdir) -> dict[str, int]:
  """Records each stage skipped, from stages.json (keys `skipped` and `RUN/skipped`)."""
  stages = _read(wd.stages) or {}
  return {name: sum(int(v) for k, v in fig.items() if (k == "skipped" or k.endswith("/skipped"))
                    and isinstance(v, (int, float)))
          for name, fig in stages.items() if isinstance(fig, dict)}


def _set_size(wd: Workdir, name: str) -> int | None:
  """Images of evaluation set `name` that the evaluate stage scored (any model's file says it)."""
  for path in sorted(glob.glob(os.path.join(wd.path("eval"), "*", f"{name}.json"))):
    n = (_read(path) or {}).get("n")
    if n:
      return int(n)
  return None


def curve_images(curves: dict[str, list[dict]], s: str) -> int | None:
  """How many images of set `s` the curves' points were measured on (report.curve_limit; None if the
  points predate the count)."""
  counts = {p["images"][s] for pts in curves.values() for p in pts if s in p.get("images", {})}
  return max(counts) if counts else None


def _curves(wd: Workdir) -> dict[str, list[dict]]:
  out = {}
  for name in wd.train_runs():
    pts = _read(wd.curve(name))
    if pts:
      out[name] = pts
  return out


def _mean_band(runs: list[tuple[list[float], list[float]]]):
  """Seeds' (xs, ys) -> (xs, mean, low, high) over the xs every seed has; None if they share none."""
  common_x = sorted(set.intersection(*[set(xs) for xs, _ in runs])) if runs else []
  if not common_x:
    return None
  table = np.array([[dict(zip(xs, ys))[x] for x in common_x] for xs, ys in runs])
  return common_x, table.mean(0).tolist(), table.min(0).tolist(), table.max(0).tolist()


def _grouped_series(per_run: dict[str, tuple[list[float], list[float]]]):
  """Per-run series -> per-method series (the mean over seeds) and bands (the seeds' range)."""
  series, bands = {}, {}
  for method, runs in methods_of(per_run).items():
    got = _mean_band([per_run[r] for r in runs])
    if got is None:
      continue
    xs, mean, lo, hi = got
    series[pretty(method)] = (xs, mean)
    if len(runs) > 1:
      bands[pretty(method)] = (lo, hi)
  return series, bands


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
      losses[name] = ([x["step"] for x in h], [x["loss"] for x in h])
  seeded = any(split_run_name(n)[1] for n in wd.train_runs())
  spread = " (mean over seeds; shaded: the seeds' range)" if seeded else ""
  # The cold start (full SFT, hundreds of steps) and the LoRA runs (tens) each get their own panel: on one
  # axis the short runs would be squeezed into a corner, on top of each other.
  # Pretraining and Table 1's 100-step runs likewise.
  kind = lambda n: {"cold_start": "cold", "pretrain": "pre"}.get(split_run_name(n)[0]) or \
      ("table1" if split_run_name(n)[0] in curation.TABLE1 else "lora")
  group_of = lambda k: {n: v for n, v in losses.items() if kind(n) == k}
  for png, group, what in (("pretrain_loss.png", group_of("pre"), "pretraining, the prior (full SFT)"),
                           ("cold_start_loss.png", group_of("cold"), "cold start (full SFT)"),
                           ("train_loss.png", group_of("lora"), "fine-tuning runs"),
                           ("table1_loss.png", group_of("table1"), f"Table 1's runs ({curation.TABLE1_STEPS} steps each)")):
    if group:
      series, bands = _grouped_series(group)
      made.append(plots.line_png(os.path.join(d, png), series, bands=bands,
                                 title=f"training loss: {what}" + spread, xlabel="step", ylabel="loss"))
  for s in ood:
    per_run = {n: ([p["step"] for p in pts if p.get(s) is not None], [100 * p[s] for p in pts if p.get(s) is not None])
               for n, pts in curves.items() if any(p.get(s) is not None for p in pts)}
    series, bands = _grouped_series(per_run)
    if series:
      n = curve_images(curves, s)
      made.append(plots.line_png(os.path.join(d, f"ood_{s}_vs_step.png"), series, bands=bands,
                                 title=f"{s} accuracy during training" + (f", {n} images" if n else "")
                                 + " (Fig. 3)" + spread, xlabel="step", ylabel="accuracy (%)"))
  # Each RL baseline's first run (seed 0): its reward and the share of groups that teach nothing.
  rl_runs = {n: h for n in wd.train_runs() if split_run_name(n)[1] == 0
             for h in [training.history(wd, n)] if h and "reward" in h[0]}
  if rl_runs:
    one = list(rl_runs) == ["grpo"]
    series = {}
    for n, h in rl_runs.items():
      steps = [x["step"] for x in h]
      series["mean reward" if one else f"{pretty(n)}: mean reward"] = (steps, [x["reward"] for x in h])
      series["zero-advantage groups" if one else f"{pretty(n)}: zero-advantage groups"] = (
          steps, [x.get("zero_advantage", 0.0) for x in h])
    made.append(plots.line_png(os.path.join(d, "grpo_reward.png"), series,
                               title=("GRPO" if one else "RL baselines") + ": reward and groups with no signal",
                               xlabel="step", ylabel="fraction"))
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


def _ood_average(row: dict, ood: list[str]) -> float | None:
  """A model's mean accuracy over the OOD sets (None when a set is missing)."""
  return sum(row[o] for o in ood) / len(ood) if ood and all(row.get(o) is not None for o in ood) else None


def _by_method(acc: dict, groups: dict[str, list[str]], sets: list[str], ood: list[str]) -> dict:
  """{method: {SET or 'ood_average': {'mean', 'std', 'seeds': [per-seed accuracy]}}}."""
  out = {}
  for m, labels in groups.items():
    row = {}
    for s in sets + ["ood_average"]:
      vals = [_ood_average(acc[x], ood) if s == "ood_average" else acc[x].get(s) for x in labels]
      vals = [v for v in vals if v is not None]
      mean, std = stats.mean_std(vals) if vals else (None, None)
      row[s] = {"mean": mean, "std": std, "seeds": vals}
    row["n_seeds"] = len(labels)
    out[m] = row
  return out


def _seeds_table(by_method: dict, sets: list[str], ood: list[str]) -> str:
  cols = sets + (["OOD avg"] if ood else [])
  keys = sets + (["ood_average"] if ood else [])
  rows = []
  for m, row in by_method.items():
    cells = ["-" if row[k]["mean"] is None else
             f"{100 * row[k]['mean']:.2f} ± {100 * row[k]['std']:.2f}" if len(row[k]["seeds"]) > 1 else
             f"{100 * row[k]['mean']:.2f}" for k in keys]
    rows.append([pretty(m), str(row["n_seeds"])] + cells)
  return _md_table(["model", "seeds"] + cols, rows)


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
    groups = methods_of(acc["accuracy"])
    by_method = _by_method(acc["accuracy"], groups, sets, ood)
    seeds = max(len(v) for v in groups.values()) if groups else 1
    parts += ["## Accuracy (%), greedy\n",
              "In-distribution: " + ", ".join(s for s in sets if s not in ood) + "; out of distribution: " +
              ", ".join(ood) + ".\n"]
    if seeds > 1:
      parts += [f"Mean ± standard deviation over each method's training seeds ({seeds} seeds; the cold start "
                "is one model, trained once).\n", _seeds_table(by_method, sets, ood)]
    else:
      parts.append(evaluate.table({pretty(m): row for m, row in acc["accuracy"].items()}, sets, ood))
    tasks_of = set_tasks(wd, list(acc["accuracy"]), sets)
    tasks = sorted({t for v in tasks_of.values() for t in v})
    if tasks:
      parts.append(_metric_sentence(tasks_of))
      results["tasks"] = tasks_of
    if len(tasks) > 1:
      per = by_task(wd, list(acc["accuracy"]), sets, ood, tasks)
      results["by_task"] = per
      cols = [f"{t} {k}" for t in tasks for k in ("ID", "OOD")]
      parts += ["### Per task (%)\n", "Each task's records pooled over the ID sets and over the OOD sets, each "
                "judged by its own task's verifier.\n",
                _md_table(["model"] + cols, [[pretty(m)] + ["-" if per[m][t][k] is None else f"{100 * per[m][t][k]:.2f}"
                                                           for t in tasks for k in ("id", "ood")] for m in per])]
    results["accuracy"] = acc["accuracy"]
    results["by_method"] = by_method
    results["sets"], results["ood"] = acc["sets"], ood
    results["ood_average"] = {m: _ood_average(row, ood) for m, row in acc["accuracy"].items()}
  if acc and ood:
    ood_tasks = sorted({t for s in ood for t in results.get("tasks", {}).get(s, ["classification"])})
    paper_kind = {("classification",): "imagenet", ("grounding",): "grounding",
                  ("classification", "grounding"): "four"}.get(tuple(ood_tasks))
    comparisons = _comparisons(wd, groups, ood, paper=paper_kind)
    if comparisons:
      results["comparisons"] = comparisons
      n_seeds = max(c["seeds"] for c in comparisons)
      over = f"{n_seeds} training seeds and the evaluation images" if n_seeds > 1 else \
          "the evaluation images (one training seed)"
      ood_means = {m: v["ood_average"]["mean"] for m, v in by_method.items() if v["ood_average"]["mean"] is not None}
      # A one-model method (the cold start) pairs with every seed; two seeded ones with unequal counts
      # pair the first seeds only, so their difference is not the one of the table's means.
      short = [c for c in comparisons
               if any(len(groups[x]) > 1 and len(groups[x]) != c["seeds"] for x in (c["method"], c["reference"]))]
      note = "" if not short else (
          "Paired on fewer seeds than the table's means (the two methods have different seed counts): " +
          ", ".join(f"{pretty(c['method'])} vs {pretty(c['reference'])} ({c['seeds']} seeds)" for c in short) + ".\n")
      parts += ["## Out of distribution, against SFT and the paper\n",
                "Each method's OOD accuracy minus the reference's, in points, with the 95% interval of a paired "
                f"bootstrap over {over}, " + {
                    "imagenet": "beside the paper's (Qwen2.5-VL-7B, Table 2's ImageNet-R and ImageNet-A columns "
                                "averaged, like for like with classification OOD sets)",
                    "grounding": "beside the paper's (Qwen2.5-VL-7B, Table 2's Ref-L4 and Lisa columns averaged, "
                                 "like for like with grounding OOD sets)",
                    "four": "beside the paper's (Qwen2.5-VL-7B, Table 2's four OOD sets averaged; SFT-EM's "
                            "printed average, 62.10, is a point above its own columns')"}.get(
                    paper_kind, f"for the {', '.join(ood_tasks)} task{'s' if len(ood_tasks) > 1 else ''} (the "
                    "paper's figures are for classification and grounding OOD sets, so none is set beside these)")
                + ". \"Within noise\": the interval holds 0.\n",
                _md_table(["method", "against", "ours", "95% interval", "verdict", "paper", "the paper's claim here"],
                          [[pretty(c["method"]), pretty(c["reference"]), f"{100 * c['diff']:+.2f}",
                            f"[{100 * c['lo']:+.2f}, {100 * c['hi']:+.2f}]", c["verdict"],
                            f"{c['paper']:+.2f} ({c['paper_source']})" if c["paper"] is not None else "-",
                            c["reproduced"]] for c in comparisons]),
                *([note] if note else []), *_table1_sentence(cur, groups), _ordering_sentence(comparisons, ood_means)]
  if cur:
    s = cur["summary"]
    b = s["buckets"]
    parts += ["## Difficulty of the training prompts\n",
              f"{s['n']} prompts scored with K = {s['k']} samples each (mean pass rate "
              f"{100 * (s['mean_pass_rate'] or 0):.1f}%).\n",
              _md_table(["bucket", "rule", "prompts"],
                        [["easy", f"{s['k']}/{s['k']} right", str(b["easy"])],
                         ["medium", "mixed", str(b["medium"])], ["hard", f"0/{s['k']} right", str(b["hard"])]]),
              _md_table(["recipe", "training records", "of them hard"],
                        [[r, str(v["records"]), f"{v['hard']} ({100 * v['hard'] / max(v['records'], 1):.1f}%)"
                          if "hard" in v else "-"] for r, v in cur["recipes"].items()])]
    if len(s.get("tasks") or {}) > 1:
      parts += ["Per task (each prompt scored by its own task's verifier):\n",
                _md_table(["task", "easy", "medium", "hard"],
                          [[t, str(v["easy"]), str(v["medium"]), str(v["hard"])] for t, v in s["tasks"].items()])]
      results["buckets_by_task"] = s["tasks"]
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
                        [[pretty(n), str(r["steps"]), f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}",
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
    parts += ["## Plots\n"]
    sized = {name: curve_images(curves, name) for name in ood}
    if any(sized.values()):
      full = {name: _set_size(wd, name) for name in sized}
      parts += ["The accuracy-vs-step curves are measured on " + ", ".join(
          f"{n} images of {name}" + (f" (the table above: all {full[name]})" if full[name] else "")
          for name, n in sized.items() if n) + " (`report.curve_limit`: a seeded random subset of each set, "
          "stratified by answer, the same for every run and step), so their points and the table's figures "
          "differ by that sampling. Each run's last point beside its figure on the whole set:\n"]
      rows = []
      for run, pts in curves.items():
        full_acc = (acc or {}).get("accuracy", {}).get(run, {})
        for name in ood:
          last = next((p for p in reversed(pts) if p.get(name) is not None), None)
          if last is not None:
            whole = full_acc.get(name)
            rows.append([pretty(run), name, str(last["step"]), f"{100 * last[name]:.2f}",
                         "-" if whole is None else f"{100 * whole:.2f}"])
      if rows:
        parts.append(_md_table(["run", "set", "last step", "curve (subset)", "table (whole set)"], rows))
    parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})\n" for p in made]
  results["plots"] = [os.path.relpath(p, workdir) for p in made]
  text = "\n".join(parts)
  common.write_json(wd.results, results)
  common.write_text(wd.report, text)
  return results


def run(config, ctx) -> dict:
  """Host work that writes shared files: process 0 builds the report, every process gets its figures."""
  def make() -> dict:
    if not any(os.path.exists(ctx.wd.done_marker(s)) for s in ("init", "cold_start", "score", "evaluate")):
      from dcsft_jax import errors
      raise errors.UserError(f"nothing to report in {ctx.wd.root}: no stage has finished there; run the pipeline "
                             f"first (--config.stages=init,cold_start,...,evaluate,report, the default)")
    res = build(ctx.workdir)
    print(open(ctx.wd.report).read())
    return {"written": ctx.wd.report, "plots": len(res["plots"])}
  return multihost.on_process_0(make)
