"""The scoring, curation and evaluation stages: resume after a kill, files in the paper's formats,
verdicts that agree with the verifiers, config errors that name the key."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dcsft_jax import config_base, curation, main, run_config, verify
from dcsft_jax.data import builtin
from dcsft_jax.data.records import read_paper_json
from dcsft_jax.stages import STAGES, common, evaluate
from dcsft_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(workdir, **overrides):
  c = config_base.load_config_file(os.path.join(REPO, "configs", "dcsft.py")).get_config()
  c.workdir = str(workdir)
  c.data.train = "builtin:train"
  c.data.train_limit = 24
  c.score.batch_size = 8
  c.score.num_samples = 4
  c.score.max_new_tokens = 4
  c.evaluate.limit = 12
  c.evaluate.batch_size = 8
  c.evaluate.max_new_tokens = 4
  # These tests score and evaluate the base model directly (the cold start is tested elsewhere).
  c.score.model = "base_model"
  c.evaluate.models = "base=base_model"
  for k, v in overrides.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("base")
  c = _config(wd)
  c.stages = "init"
  main.run(c)
  return wd


def _fresh(base_workdir, tmp_path, name):
  wd = tmp_path / name
  shutil.copytree(base_workdir / "base_model", wd / "base_model")
  return wd


def test_score_resumes_after_a_crash_to_the_same_file(base_workdir, tmp_path, monkeypatch):
  ref = _fresh(base_workdir, tmp_path, "ref")
  c = _config(ref)
  c.stages = "score"
  main.run(c)
  expected = open(Workdir(ref).scores, "rb").read()
  rows = [json.loads(x) for x in expected.decode().splitlines()]
  assert len(rows) == 24 and [r["index"] for r in rows] == list(range(24))
  for r in rows:
    assert len(r["completions"]) == 4 and r["pass_rate"] == sum(r["verdicts"]) / 4
    assert r["verdicts"] == [int(verify.verify("classification", t, r["answer"])) for t in r["completions"]]

  wd = _fresh(base_workdir, tmp_path, "crash")
  c = _config(wd)
  c.stages = "score"
  commits = {"n": 0}
  real_commit = common.JsonlJournal.commit

  def crash_after_two(self, i, rows):
    if commits["n"] == 2:
      # Die halfway through writing the third batch: one full line and half of another.
      with open(self.path, "a") as f:
        f.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:20])
      raise KeyboardInterrupt("killed")
    commits["n"] += 1
    return real_commit(self, i, rows)

  monkeypatch.setattr(common.JsonlJournal, "commit", crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    main.run(c)
  assert not os.path.exists(Workdir(wd).scores)
  assert sum('"_batch_done"' in x for x in open(Workdir(wd).scores_partial)) == 2
  monkeypatch.setattr(common.JsonlJournal, "commit", real_commit)
  summary = main.run(c)
  assert summary["score"]["resumed_at_batch"] == 2
  assert open(Workdir(wd).scores, "rb").read() == expected
  assert not os.path.exists(Workdir(wd).scores_partial)


@pytest.mark.slow
def test_score_killed_with_sigkill_or_stopped_with_sigterm_resumes(base_workdir, tmp_path):
  ref = _fresh(base_workdir, tmp_path, "ref")
  wd = _fresh(base_workdir, tmp_path, "killed")
  args = ["--config.stages=score", "--config.score.model=base_model", "--config.mesh.fsdp=1", "--config.data.train_limit=40",
          "--config.score.batch_size=4", "--config.score.num_samples=4", "--config.score.max_new_tokens=4"]
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  cmd = [sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py"]
  r = subprocess.run(cmd + [f"--config.workdir={ref}"] + args, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  p = subprocess.Popen(cmd + [f"--config.workdir={wd}"] + args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  partial = Workdir(wd).scores_partial
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(partial) and open(partial).read().count("_batch_done") >= 3:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  done = open(partial).read().count("_batch_done")
  assert 3 <= done < 10 and not os.path.exists(Workdir(wd).scores)
  # SIGTERM: the batch in hand goes to the journal, then exit 143 with one line saying how to resume.
  p = subprocess.Popen(cmd + [f"--config.workdir={wd}"] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and open(partial).read().count("_batch_done") < done + 1:
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 143, err[-2000:]
  assert "preempted: saved batch" in err and "Traceback" not in err, err[-2000:]
  done = open(partial).read().count("_batch_done")
  r = subprocess.run(cmd + [f"--config.workdir={wd}"] + args, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  stages = json.load(open(wd / "stages.json"))
  assert stages["score"]["resumed_at_batch"] == done >= 4
  assert open(Workdir(wd).scores, "rb").read() == open(Workdir(ref).scores, "rb").read()


def _write_scores(wd, records, verdict_of):
  os.makedirs(os.path.dirname(Workdir(wd).scores), exist_ok=True)
  with open(Workdir(wd).scores, "w") as f:
    for i, r in enumerate(records):
      v = verdict_of(i)
      f.write(json.dumps({"id": r.id, "index": i, "completions": ["x"] * len(v), "verdicts": v,
                          "pass_rate": sum(v) / len(v)}) + "\n")


def test_curate_stage_writes_recipes_summary_and_histogram(tmp_path):
  wd = tmp_path / "wd"
  c = _config(wd, **{"curate.recipes": "sft_m,sft_em,sft,hard", "data.train_limit": 30})
  c.stages = "curate"
  records = builtin.load_builtin("train", limit=30, label_noise=0.1)
  patterns = [[1] * 8, [0] * 8, [1, 0, 0, 0, 0, 0, 0, 0]]
  _write_scores(wd, records, lambda i: patterns[i % 3])
  main.run(c)
  s = json.load(open(Workdir(wd).curation_summary))
  assert s["summary"]["buckets"] == {"easy": 10, "medium": 10, "hard": 10}
  assert {k: v["records"] for k, v in s["recipes"].items()} == {"sft_m": 10, "sft_em": 20, "sft": 30, "hard": 10}
  assert s["summary"]["pass_rate_hist"] == [10, 10, 0, 0, 0, 0, 0, 0, 10]
  back = list(read_paper_json(Workdir(wd).recipe("sft_em")))
  want = [r for i, r in enumerate(records) if i % 3 != 1]
  assert [(b.prompt, b.answer) for b in back] == [(r.prompt, r.answer) for r in want]
  assert all(os.path.isfile(b.image) for b in back)
  from PIL import Image
  assert Image.open(Workdir(wd).pass_rates_png).size == (800, 500)


def test_curate_hard_ratio_adds_back_hard_records(tmp_path):
  wd = tmp_path / "wd"
  c = _config(wd, **{"curate.recipes": "sft_em", "curate.hard_ratio": 0.5, "data.train_limit": 30})
  c.stages = "curate"
  records = builtin.load_builtin("train", limit=30, label_noise=0.1)
  _write_scores(wd, records, lambda i: [0] * 8 if i % 2 else [1] * 8)
  main.run(c)
  assert json.load(open(Workdir(wd).curation_summary))["recipes"]["sft_em"]["records"] == 15 + 8


def test_table1_recipes_are_balanced_to_the_smallest_bucket_and_train_100_steps(tmp_path, capsys):
  """Issue 29: Table 1's protocol cuts every bucket to the smallest one (a seeded subset) and trains
  each the paper's 100 steps; added to a finished curation, only the new recipe files are written."""
  from dcsft_jax.stages import training
  wd = tmp_path / "wd"
  c = _config(wd, **{"curate.recipes": "sft,hard", "data.train_limit": 40})
  c.stages = "curate"
  records = builtin.load_builtin("train", limit=40, label_noise=0.1)
  patterns = [[1] * 8, [1] * 8, [0, 1, 1, 1, 1, 1, 1, 1], [0] * 8, [1] * 8]   # 24 easy, 8 medium, 8 hard
  _write_scores(wd, records, lambda i: patterns[i % 5])
  main.run(c)
  w = Workdir(str(wd))
  before = os.stat(w.recipe("sft")).st_mtime_ns
  c.curate.recipes = "sft,hard," + ",".join(curation.TABLE1)
  main.run(c)
  assert "recipes table1_easy, table1_medium, table1_hard are new" in capsys.readouterr().out
  assert os.stat(w.recipe("sft")).st_mtime_ns == before       # the finished runs' data untouched
  s = json.load(open(w.curation_summary))
  assert s["summary"]["buckets"] == {"easy": 24, "medium": 8, "hard": 8}
  assert s["table1"] == {"size": 8, "steps": 100}
  assert {r: v["records"] for r, v in s["recipes"].items()} == {"sft": 40, "hard": 8, "table1_easy": 8,
                                                                "table1_medium": 8, "table1_hard": 8}
  # The subset is seeded: another seed picks other easy prompts; the same seed the same ones, in order.
  easy_records = [r for i, r in enumerate(records) if patterns[i % 5] == [1] * 8]
  got = [b.answer for b in read_paper_json(w.recipe("table1_easy"))]
  assert got == [r.answer for r in curation.balance(easy_records, 8, c.seed)]
  assert curation.balance(easy_records, 8, 0) == curation.balance(easy_records, 8, 0)
  assert curation.balance(easy_records, 8, 0) != curation.balance(easy_records, 8, 1)
  assert [r.id for r in curation.balance(easy_records, 8, c.seed)] == sorted(
      (r.id for r in curation.balance(easy_records, 8, c.seed)), key=[r.id for r in records].index)
  # Finetune trains them 100 steps with no curve; any other recipe keeps the section's steps.
  f = c.finetune
  t1 = training._section_for(f, "table1_hard")
  assert (t1.steps, t1.eval_every) == (100, 0) and training._section_for(f, "hard") is f and f.steps != 100
  # An empty bucket leaves nothing to balance to: one line naming the recipes and the fix.
  _write_scores(tmp_path / "wd2", records, lambda i: [1] * 8 if i % 2 else [0, 1, 1, 1, 1, 1, 1, 1])
  c2 = _config(tmp_path / "wd2", **{"curate.recipes": "table1_hard", "data.train_limit": 40})
  c2.stages = "curate"
  with pytest.raises(ValueError, match="the hard bucket is empty"):
    main.run(c2)


def test_evaluate_stage_writes_test_dp_shaped_results(base_workdir, tmp_path):
  wd = _fresh(base_workdir, tmp_path, "eval")
  c = _config(wd, **{"data.eval": "id=builtin:test,rendition=builtin:rendition", "data.ood": "rendition"})
  c.stages = "evaluate"
  main.run(c)
  for name in ("id", "rendition"):
    out = json.load(open(Workdir(wd).eval_result("base", name)))
    assert out["n"] == 12 and len(out["results"]) == 12
    for x in out["results"]:
      assert set(x) >= {"image", "question", "ground_truth", "model_output", "correct"}
      assert x["correct"] == int(verify.verify("classification", x["model_output"], x["ground_truth"]))
    assert out["accuracy"] == sum(x["correct"] for x in out["results"]) / 12
  md = open(Workdir(wd).accuracy_md).read()
  assert md.splitlines()[0] == "| model | id | rendition | OOD avg |" and md.splitlines()[2].startswith("| base |")
  # Greedy outputs equal the generate CLI's answer for the same record.
  from dcsft_jax import generate
  rec = builtin.load_builtin("test", limit=1)[0]
  img = str(tmp_path / "one.png")
  rec.image.save(img)
  cli = generate.generate(str(wd / "base_model"), img, rec.prompt, max_new_tokens=4)
  first = json.load(open(Workdir(wd).eval_result("base", "id")))["results"][0]
  assert cli["texts"][0] == first["model_output"]


def test_evaluate_table_averages_ood_sets():
  md = evaluate.table({"m": {"id": 0.5, "a": 0.25, "b": 0.75}}, ["id", "a", "b"], ["a", "b"])
  assert md.splitlines()[2] == "| m | 50.00 | 25.00 | 75.00 | 50.00 |"


@pytest.mark.parametrize("key,value,needle", [
    ("curate.recipes", "sft_m,sft_hardest", "config.curate.recipes"),
    ("data.ood", "imagenet_r", "config.data.ood"),
    ("data.train", "json:/nonexistent/train.json", "config.data.train"),
    ("data.eval", "id=builtin:val", "config.data.eval"),
    ("score.top_p", 0.0, "config.score"),
    ("score.batch_size", 0, "config.score.batch_size"),
    ("curate.hard_ratio", 1.5, "config.curate.hard_ratio"),
    ("cold_start.data", "builtin:train[x:]", "config.cold_start.data"),
    ("cold_start.schedule", "step", "config.cold_start.schedule"),
    ("finetune.accum", 3, "config.finetune.accum"),
    ("finetune.recipes", "sft,sft_mm", "config.finetune.recipes"),
    ("finetune.recipes", "easy", "config.finetune.recipes"),      # not made by curate.recipes
    ("grpo.num_generations", 1, "config.grpo.num_generations"),
    ("grpo.beta", -0.1, "config.grpo.beta"),
    ("model.preset", "13b", "config.model.preset"),
    ("grpo.num_iterations", 0, "config.grpo.num_iterations"),
    ("evaluate.repetition_penalty", -1.0, "config.evaluate.repetition_penalty"),
    ("score.max_pixels", -5, "config.score.max_pixels"),
    ("finetune.b2", 1.0, "config.finetune.b2"),
    ("cold_start.max_length", -1, "config.cold_start.max_length"),
    ("data.max_image_pixels", -1, "config.data.max_image_pixels"),
])
def test_bad_stage_config_names_the_key(tmp_path, key, value, needle):
  c = _config(tmp_path / "wd", **{key: value})
  with pytest.raises(run_config.ConfigError, match=needle.replace(".", r"\.")):
    run_config.validate(c, [s.name for s in STAGES])


def test_read_scores_of_the_stage_output_round_trips(base_workdir, tmp_path):
  wd = _fresh(base_workdir, tmp_path, "rt")
  c = _config(wd, **{"data.train_limit": 8})
  c.stages = "score"
  main.run(c)
  scores = curation.read_scores(Workdir(wd).scores)
  assert len(scores) == 8 and all(s.k == 4 for s in scores.values())


def test_a_second_run_on_a_busy_workdir_stops_naming_the_first(tmp_path, capsys):
  """Two runs on one workdir would write over each other: the second stops before any work, naming
  the first; the lock goes with its holder, even after kill -9."""
  from dcsft_jax import workdir as workdir_lib
  wd = workdir_lib.Workdir(str(tmp_path / "run"))
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom dcsft_jax import workdir as w\n"
       f"with w.locked(w.Workdir({wd.root!r})):\n  print('held', flush=True)\n  time.sleep(120)"],
      stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  try:
    assert holder.stdout.readline().strip() == "held"
    c = _config(wd.root)
    c.stages = "init"
    with pytest.raises(workdir_lib.WorkdirBusy, match=rf"in use by pid {holder.pid} on .*another --config.workdir"):
      main.run(c)
    assert sorted(os.listdir(wd.root)) == [".lock"]          # nothing written: not even config.json
    # A two-host run: process 0 finds the lock taken and tells process 1, so both stop with the holder's
    # name (process 1 would otherwise go on alone and wait at its first collective forever).
    import socket
    with socket.socket() as sock:
      sock.bind(("127.0.0.1", 0))
      port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    script = os.path.join(REPO, "tests", "two_process_lock.py")
    procs = [subprocess.Popen([sys.executable, script, str(i), str(port), wd.root], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
      assert p.returncode == 0 and f"process {i}: busy: {wd.root} is in use by pid {holder.pid}" in out, err[-2000:]
  finally:
    holder.kill()
    holder.wait()
  with workdir_lib.locked(wd):                               # free again once the holder is gone
    assert f"taking over the lock of {wd.root} from pid {holder.pid}" in capsys.readouterr().out
  with workdir_lib.locked(wd):                               # a clean exit leaves nothing to take over
    assert "taking over" not in capsys.readouterr().out


def test_journal_refuses_to_resume_under_other_settings(tmp_path):
  """Scoring killed under K = 8 and resumed under K = 4 would mix 8-answer and 4-answer rows: the
  journal keeps the settings that made it and names what changed."""
  path = str(tmp_path / "scores" / "scores.partial.jsonl")
  j = common.JsonlJournal(path, {"num_samples": 8, "temperature": 0.9})
  j.commit(0, [{"id": "a", "index": 0}])
  j.close()
  again = common.JsonlJournal(path, {"num_samples": 8, "temperature": 0.9})   # same settings: resumes
  assert again.next_batch == 1 and [r["id"] for r in again.rows] == ["a"]
  again.close()
  with pytest.raises(ValueError, match=r"other settings: num_samples 8 then, 4 now, temperature 0\.9 then, 0\.3 now"
                                       r".*delete the file"):
    common.JsonlJournal(path, {"num_samples": 4, "temperature": 0.3})
  assert common.JsonlJournal(path, {"num_samples": 8, "temperature": 0.9}).next_batch == 1  # nothing lost


def test_batches_that_do_not_divide_the_mesh_fail_before_the_first_stage(tmp_path):
  """A batch the mesh cannot split fails before init runs, naming the key, whatever stage needs it."""
  c = _config(tmp_path / "wd")
  c.stages = "init,cold_start,score,curate,finetune"
  c.mesh.fsdp, c.mesh.data = 4, 2                        # 8 batch shards on the 8 test devices
  c.score.batch_size = 8
  c.finetune.batch_size, c.finetune.accum = 12, 1         # 12 rows: not a multiple of 8
  with pytest.raises(run_config.ConfigError, match=r"config\.finetune\.batch_size: 12 rows .* data x fsdp = 8"):
    main.run(c)
  assert not os.path.exists(tmp_path / "wd" / "base_model")  # nothing ran
  c.mesh.fsdp = 3                                         # 6 devices asked of 8: a mesh error, as a config error
  with pytest.raises(run_config.ConfigError, match=r"config\.mesh"):
    main.run(c)


def test_stages_run_in_pipeline_order_and_a_missing_input_names_its_stage(tmp_path):
  c = _config(tmp_path)
  c.stages = "score,init"
  assert run_config.validate(c, [s.name for s in STAGES]) == ["init", "score"]
  c = _config(tmp_path / "wd")
  c.stages = "score"
  c.score.model = "cold_start_model"
  with pytest.raises(FileNotFoundError, match=r"'cold_start' stage makes it"):
    main.run(c)


def test_cold_start_counts_the_records_it_skipped(base_workdir, tmp_path):
  """With skip_bad_records, a record without an assistant turn (skipped by the reader) and one whose
  image does not decode (skipped by the batcher) are both counted as skipped, not as trained on."""
  from PIL import Image
  wd = _fresh(base_workdir, tmp_path, "skips")
  rows = []
  for i in range(8):
    p = tmp_path / f"img{i}.png"
    Image.new("RGB", (28, 28), (30 * i, 0, 0)).save(p)
    rows.append({"messages": [{"role": "user", "content": "<image>Which digit?"},
                              {"role": "assistant", "content": str(i)}], "images": [str(p)]})
  rows.append({"messages": [{"role": "user", "content": "<image>Which digit?"}], "images": [rows[0]["images"][0]]})
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  rows.append({"messages": [{"role": "user", "content": "<image>Which digit?"},
                            {"role": "assistant", "content": "9"}], "images": [str(broken)]})
  (tmp_path / "cold.json").write_text(json.dumps(rows))
  c = _config(wd)
  c.stages = "cold_start,report"
  c.cold_start.data = f"json:{tmp_path / 'cold.json'}"
  c.cold_start.batch_size = 8
  c.cold_start.steps = 1
  c.data.skip_bad_records = True
  figures = main.run(c)["cold_start"]
  assert (figures["records"], figures["skipped"]) == (8, 2), figures
  assert "| cold_start | 2 |" in open(Workdir(wd).report).read()


def test_restart_stage_deletes_that_stage_and_runs_it_again(base_workdir, tmp_path):
  wd = _fresh(base_workdir, tmp_path, "restart")
  c = _config(wd, **{"data.train_limit": 8})
  c.stages = "score"
  main.run(c)
  assert all(s.k == 4 for s in curation.read_scores(Workdir(wd).scores).values())
  c.score.num_samples = 2
  with pytest.raises(ValueError, match=r"score: score.num_samples 4 then, 2 now.*--config.restart_stage=score"):
    main.run(c)                                      # finished under other settings: refused, still K = 4
  assert all(s.k == 4 for s in curation.read_scores(Workdir(wd).scores).values())
  c.restart_stage = "score"
  main.run(c)
  assert all(s.k == 2 for s in curation.read_scores(Workdir(wd).scores).values())
  before = os.stat(Workdir(wd).scores).st_mtime_ns
  main.run(c)                                        # the same command again (a requeue): no second restart
  assert os.stat(Workdir(wd).scores).st_mtime_ns == before
  assert os.path.isdir(Workdir(wd).base_model)      # other stages' outputs untouched


def test_evaluate_stops_on_sigterm_keeping_its_finished_sets(base_workdir, tmp_path):
  wd = _fresh(base_workdir, tmp_path, "eval_term")
  args = ["--config.stages=evaluate", "--config.evaluate.models=base=base_model", "--config.mesh.fsdp=1",
          "--config.evaluate.limit=48", "--config.evaluate.batch_size=4", "--config.evaluate.max_new_tokens=4"]
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  cmd = [sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py", f"--config.workdir={wd}"] + args
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = Workdir(wd).eval_result("base", "id")
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.exists(first):
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 143, err[-2000:]
  assert "preempted: saved" in err and "finished evaluation set(s)" in err and "Traceback" not in err, err[-2000:]
  assert not os.path.exists(Workdir(wd).accuracy_json)
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert set(json.load(open(Workdir(wd).accuracy_json))["accuracy"]["base"]) == {"id", "rendition", "adversarial"}


def test_finetune_summary_keeps_recipes_of_earlier_invocations(tmp_path, monkeypatch):
  """Killed after sft_m finished and before sft_em did, the re-run trains sft_em only; its summary
  (models/finetune.json, stages.json) still lists sft_m's figures."""
  from dcsft_jax.stages import training
  wd = Workdir(str(tmp_path / "wd"))
  for r in ("sft_m", "sft_em"):
    os.makedirs(wd.curation, exist_ok=True)
    open(wd.recipe(r), "w").write("[]")
  trained = []

  def fake_run(config, ctx, name, *a, **k):
    trained.append(name)
    os.makedirs(ctx.wd.model(name), exist_ok=True)
    open(os.path.join(ctx.wd.model(name), "config.json"), "w").write("{}")
    return {"records": len(name), "written": ctx.wd.model(name)}
  monkeypatch.setattr(training, "_sft_run", fake_run)
  c = _config(wd.root)
  ctx = main.Context(wd, None, None)
  c.finetune.recipes = "sft_m"
  assert training.finetune(c, ctx) == {"sft_m/records": 5}
  os.remove(wd.finetune_done)                      # as if killed before the stage finished
  c.finetune.recipes = "sft_m,sft_em"
  assert training.finetune(c, ctx) == {"sft_m/records": 5, "sft_em/records": 6}
  assert trained == ["sft_m", "sft_em"] and json.load(open(wd.finetune_done))["sft_m/records"] == 5


def test_one_final_reward_in_the_stage_log_and_the_report(tmp_path):
  from dcsft_jax.stages import report, training
  wd = Workdir(str(tmp_path))
  os.makedirs(wd.logs("grpo"))
  rewards = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
  with open(wd.metrics("grpo"), "w") as f:
    for i, r in enumerate(rewards, 1):
      f.write(json.dumps({"step": i, "loss": 0.0, "reward": r}) + "\n")
  want = sum(rewards[-5:]) / 5
  assert training.final_reward(training.history(wd, "grpo")) == pytest.approx(want)
  assert report.build(wd.root)["runs"]["grpo"]["final_reward"] == pytest.approx(want)


def test_unknown_override_key_is_one_line_naming_the_sections():
  r = subprocess.run([sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py", "--config.optimiser.steps=3"],
                     cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "bad config override: --config.optimiser.steps: the config has no field 'optimiser'" in r.stderr
  assert "cold_start, curate, damaged_checkpoints, data" in r.stderr


def test_stop_check_asks_the_preemption_sync_at_every_batch_of_a_multi_host_stage(monkeypatch):
  """Several processes: no Python signal handler (JAX's own tells every host); the stage asks JAX's
  preemption sync after each batch with a count that only grows over the stage (per-set batch indices
  would restart at 0 and could never reach the agreed point), and stops where it says so."""
  import signal as signal_lib
  from dcsft_jax import preemption
  asked = []
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  start = preemption._State.asked
  monkeypatch.setattr(preemption, "reached", lambda n: asked.append(n) or n == start + 5)
  before = signal_lib.getsignal(signal_lib.SIGTERM)
  with preemption.saving() as stop:
    assert signal_lib.getsignal(signal_lib.SIGTERM) is before    # JAX's handler stays
    assert [stop(), stop()] == [None, None]
  # A new section (the next stage, the next training run) goes on counting: JAX remembers the counts
  # every process reported for the whole process, so a count started again could miss the agreed one.
  with preemption.saving() as stop:
    assert [stop(), stop(), stop()] == [None, None, signal_lib.SIGTERM]
  assert asked == [start + i for i in range(1, 6)]


def test_a_full_disk_when_the_trained_model_is_written_is_one_line(base_workdir, tmp_path, monkeypatch):
  """The run trained, its last checkpoint is saved, and writing the model directory fails for space:
  the same one line as a failed checkpoint, naming the directory and the step a re-run resumes from."""
  import errno
  from dcsft_jax import checkpoint, errors
  wd = _fresh(base_workdir, tmp_path, "full")
  c = _config(wd)
  c.stages, c.cold_start.steps = "cold_start", 2

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(checkpoint, "save_model", full)
  with pytest.raises(errors.CheckpointSaveFailed, match=(
      rf"^saving the model directory {wd}/cold_start_model failed at step 2 \(No space left on device\); the disk "
      rf"\(or quota\) is full: .* it resumes from step 2\. Full trace: {wd}/train/cold_start/logs/checkpoint_errors.log$")):
    main.run(c)


def test_a_key_added_since_a_stage_finished_counts_only_away_from_its_default(tmp_path):
  """A workdir made before a key existed resumes while the key keeps its default (the default keeps
  what the code did before it); set to anything else, the finished stage is refused, naming the key."""
  from dcsft_jax import fingerprint, stages
  wd = Workdir(str(tmp_path / "wd"))
  c = _config(wd.root)
  os.makedirs(os.path.dirname(wd.curation_summary))
  open(wd.curation_summary, "w").write("{}")
  old = fingerprint.of(stages.settings(c, "curate"))
  del old["curate.window_lo"]                       # as if written before window_lo existed
  os.makedirs(os.path.dirname(wd.stage_settings("curate")))
  json.dump(old, open(wd.stage_settings("curate"), "w"))
  assert main._check_settings(c, wd, ["curate"]) == ""
  c.curate.window_lo = 0.25
  assert "curate.window_lo None then, 0.25 now" in main._check_settings(c, wd, ["curate"])
