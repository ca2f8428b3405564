"""The paper's grounding and reasoning tasks, and all three mixed, through every stage to the report
(issue 28), as users run them: `configs/grounding.py`, `configs/reasoning.py` and `configs/mixed.py`,
shortened (`:short=true`: every stage, few steps, little data).

Each run must score with its task's verifier (every sampled answer kept with its verdict and reason),
bucket, train every recipe and GRPO with that verifier's reward, evaluate, report with the task's
metric named and a row for every method, and export. The mixed run must route each record to its own
task's checker everywhere and report per task."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dcsft_jax import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("cold start", "SFT", "GRPO", "SFT-M", "SFT-EM", "hard only")

pytestmark = pytest.mark.slow


def _run(config: str, workdir) -> str:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-m", "dcsft_jax.main", f"--config=configs/{config}.py:short=true",
                      f"--config.workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=1500)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
  assert os.path.isdir(os.path.join(workdir, "hf_export"))
  return open(os.path.join(workdir, "report.md")).read()


def _jsonl(path) -> list[dict]:
  return [json.loads(x) for x in open(path) if x.strip()]


def _task_of(record_id: str) -> str:
  for task in ("grounding", "reasoning"):
    if f"-{task}_" in record_id:
      return task
  return "classification"


def _check_routed(wd, tasks: set[str]) -> None:
  """Every score and evaluation row was judged by its own record's task's checker."""
  rows = _jsonl(os.path.join(wd, "scores", "scores.jsonl"))
  assert {x["task"] for x in rows} == tasks
  for x in rows:
    assert x["task"] == _task_of(x["id"]), x["id"]
    judged = [verify.judge(x["task"], c, x["answer"]) for c in x["completions"]]
    assert x["verdicts"] == [int(ok) for ok, _ in judged] and x["reasons"] == [why for _, why in judged]
    assert len(x["completions"]) == 8
  evals = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(wd, "eval")) for f in fs
           if f.endswith(".json") and f != "accuracy.json"]
  assert evals
  for path in evals:
    for r in json.load(open(path))["results"]:
      assert r["task"] == _task_of(r["id"])
      assert (r["correct"], r["reason"]) == (int(verify.judge(r["task"], r["model_output"], r["ground_truth"])[0]),
                                             verify.judge(r["task"], r["model_output"], r["ground_truth"])[1])


@pytest.mark.parametrize("task,metric", [("grounding", "IoU >= 0.5 accuracy"),
                                         ("reasoning", "multiple-choice accuracy")])
def test_a_task_runs_every_stage_to_its_report(tmp_path, task, metric):
  wd = tmp_path / "wd"
  report = _run(task, wd)
  assert f"Metric: {metric} ({task})" in report
  table = report.split("## Accuracy")[1].split("\n## ")[0]
  for m in METHODS:
    assert f"| {m} |" in table, (m, table)
  _check_routed(wd, {task})
  summary = json.load(open(wd / "curation" / "summary.json"))["summary"]
  assert set(summary["tasks"]) == {task} and sum(summary["buckets"].values()) == 32
  # GRPO ran, rewarded by the task's verifier: each step logged the mean reward of its rollouts.
  hist = [h for h in _jsonl(wd / "train" / "grpo" / "logs" / "metrics.jsonl") if "loss" in h]
  assert len(hist) == 2 and all(0.0 <= h["reward"] <= 1.0 for h in hist)


def test_a_mixed_run_routes_every_record_to_its_own_verifier_and_reports_per_task(tmp_path):
  wd = tmp_path / "wd"
  report = _run("mixed", wd)
  _check_routed(wd, {"classification", "grounding", "reasoning"})
  per_task = report.split("### Per task (%)")[1].split("\n## ")[0]
  for t in ("classification", "grounding", "reasoning"):
    assert f"{t} ID" in per_task and f"{t} OOD" in per_task
  for m in METHODS:
    assert f"| {m} |" in per_task
  assert "Metric per task: classification: exact-match accuracy; grounding: IoU >= 0.5 accuracy; " \
         "reasoning: multiple-choice accuracy" in report
  results = json.load(open(wd / "results.json"))
  assert set(results["by_task"]["cold_start"]) == {"classification", "grounding", "reasoning"}
  assert set(results["buckets_by_task"]) == {"classification", "grounding", "reasoning"}
