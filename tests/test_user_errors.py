"""Failures a user can fix are one line that names what is wrong and the fix (issue 27), and a finished
stage keeps the settings it was made with.

Each case runs the entry point as a user does (a subprocess) and asserts: exit status 1, at most 3
lines on stderr (native libraries' own start-up logging aside), and the words that name the key,
file or directory and the fix. The traces go to a log, not the terminal."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines that native libraries (absl C++, XLA, TensorFlow's stubs) print at start-up, before Python runs.
NATIVE = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} \d\d:\d\d:\d\d|WARNING: Logging before)")


def _env(tmp_path):
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="", XDG_CACHE_HOME=str(tmp_path / "cache"))


def _run(tmp_path, module: str, *args, timeout=300):
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=str(tmp_path), env=_env(tmp_path),
                     capture_output=True, text=True, timeout=timeout)
  err = [ln for ln in r.stderr.splitlines() if ln.strip() and not NATIVE.match(ln)]
  return r, err


def _main(tmp_path, *args, **kw):
  return _run(tmp_path, "dcsft_jax.main", f"--config={REPO}/configs/dcsft.py", f"--config.workdir={tmp_path / 'wd'}",
              *args, **kw)


def _shapes(tmp_path) -> str:
  """A user's own data: shapes whose names the tiny tokenizer spells in 5 and 6 tokens."""
  rows = []
  for i, a in enumerate(["circle", "triangle", "square"] * 4):
    p = tmp_path / f"img{i}.png"
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(p)
    rows.append({"messages": [{"role": "user", "content": "<image>Which shape?"},
                              {"role": "assistant", "content": a}], "images": [str(p)]})
  path = tmp_path / "shapes.json"
  path.write_text(json.dumps(rows))
  return str(path)


def _one_line(r, err, *words):
  assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
  assert 1 <= len(err) <= 3, err
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  for w in words:
    assert w in err[-1], (w, err[-1])


CASES = {
    "unknown key": (["--config.score.k=3"], ["--config.score.k", "num_samples"]),
    "wrong value type": (["--config.score.temperature=abc"], ["--config.score.temperature", "abc"]),
    "negative limit": (["--config.data.train_limit=-5"], ["data.train_limit", ">= 0"]),
    "bad dtype": (["--config.model.dtype=int8"], ["model.dtype", "int8"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_settings_are_one_line(tmp_path, case):
  args, words = CASES[case]
  r, err = _main(tmp_path, *args)
  _one_line(r, err, *words)
  assert not os.path.exists(tmp_path / "wd")          # stopped before any work


def test_help_lists_the_fields_and_exits_0(tmp_path):
  for flag in ("-h", "--help"):
    r, _ = _run(tmp_path, "dcsft_jax.main", flag)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[score]" in r.stdout and "--config.score.num_samples=8" in r.stdout
    assert "prompts per batch" in r.stdout                           # config_base.py's comment, beside it


def test_answers_longer_than_the_budget_stop_before_any_work(tmp_path):
  data = _shapes(tmp_path)
  args = [f"--config.data.train=json:{data}", f"--config.cold_start.data=json:{data}",
          f"--config.data.eval=id=json:{data}", "--config.data.ood=id"]
  r, err = _main(tmp_path, *args)
  _one_line(r, err, "'triangle', 6 tokens", "score.max_new_tokens=4", "--config.score.max_new_tokens=6")
  assert not os.path.exists(tmp_path / "wd" / "base_model")
  # The trace went to the log the line names.
  log = re.search(r"trace: (\S+)\)", err[-1]).group(1)
  assert "UserError" in open(log).read()


def test_the_default_budget_fits_its_own_answers():
  from dcsft_jax import answer_budget, config_base
  c = config_base.load_config_file(os.path.join(REPO, "configs", "dcsft.py")).get_config()
  c.data.train_limit = 64
  c.evaluate.limit = 64
  assert answer_budget.problems(c, ["score", "grpo", "evaluate"]) == []


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  f = tmp_path / "wd"
  f.write_text("not a directory")
  r, err = _main(tmp_path, "--config.stages=init")
  _one_line(r, err, str(f))


def test_convert_and_generate_errors_are_one_line(tmp_path):
  missing = str(tmp_path / "nowhere")
  r, err = _run(tmp_path, "dcsft_jax.convert", f"--from_hf={missing}", f"--to_orbax={tmp_path / 'out'}")
  _one_line(r, err, "nowhere")
  r, err = _run(tmp_path, "dcsft_jax.generate", f"--model={missing}", "--prompt=hi")
  _one_line(r, err, "nowhere")


def test_a_finished_stage_refuses_other_settings_and_restart_redoes_it_and_what_follows(tmp_path):
  r, _ = _main(tmp_path, "--config.stages=init")
  assert r.returncode == 0, r.stderr[-3000:]
  wd = tmp_path / "wd"
  assert json.load(open(wd / "settings" / "init.json"))["seed"] == 0
  r, err = _main(tmp_path, "--config.stages=init", "--config.seed=3")
  _one_line(r, err, "init: seed 0 then, 3 now", "--config.restart_stage=init")
  before = os.stat(wd / "base_model" / "config.json").st_mtime_ns
  r, _ = _main(tmp_path, "--config.stages=init", "--config.seed=3", "--config.restart_stage=init")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "restart: deleted base_model" in r.stdout
  assert os.stat(wd / "base_model" / "config.json").st_mtime_ns != before
  assert json.load(open(wd / "settings" / "init.json"))["seed"] == 3
  # The same settings again: done already, nothing refused.
  r, _ = _main(tmp_path, "--config.stages=init", "--config.seed=3")
  assert r.returncode == 0 and "done already" in r.stdout, r.stderr[-3000:]


def test_a_damaged_finished_model_is_one_line_naming_it_and_the_restart(tmp_path):
  r, _ = _main(tmp_path, "--config.stages=init,cold_start", "--config.cold_start.steps=1")
  assert r.returncode == 0, r.stderr[-3000:]
  params = tmp_path / "wd" / "cold_start_model" / "params"
  files = sorted((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(files[-1], "r+b") as f:                   # the largest file cut in half: a truncated copy
    f.truncate(files[-1].stat().st_size // 2)
  r, err = _main(tmp_path, "--config.stages=score", "--config.cold_start.steps=1", "--config.data.train_limit=8",
                 "--config.score.num_samples=2")
  _one_line(r, err, "cold_start_model/params cannot be read", "--config.restart_stage=cold_start")


def test_an_empty_data_file_stops_before_any_work_naming_it(tmp_path):
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  r, err = _main(tmp_path, f"--config.data.train=json:{empty}")
  _one_line(r, err, str(empty), "no records")
  assert not os.path.exists(tmp_path / "wd" / "base_model")


def test_a_report_of_an_empty_workdir_names_what_to_run(tmp_path):
  r, err = _main(tmp_path, "--config.stages=report")
  _one_line(r, err, "nothing to report", "--config.stages=")
  assert not os.path.exists(tmp_path / "wd" / "report.md")


def test_convert_names_the_kind_of_directory_and_the_dtypes(tmp_path):
  r, _ = _main(tmp_path, "--config.stages=init")
  assert r.returncode == 0, r.stderr[-3000:]
  base = str(tmp_path / "wd" / "base_model")
  r, err = _run(tmp_path, "dcsft_jax.convert", f"--from_hf={base}", f"--to_orbax={tmp_path / 'o'}")
  _one_line(r, err, base, f"--from_orbax={base}")
  r, err = _run(tmp_path, "dcsft_jax.convert", f"--from_orbax={base}", f"--to_hf={tmp_path / 'h'}", "--dtype=int8")
  _one_line(r, err, "int8", "bfloat16")


def test_stage_settings_cover_what_shapes_outputs_and_not_what_only_adds_work():
  from dcsft_jax import config_base, stages
  c = config_base.base()
  ev, ft = stages.settings(c, "evaluate"), stages.settings(c, "finetune")
  assert "evaluate.max_new_tokens" in ev and "evaluate.limit" in ev and "model.dtype" in ev
  # New models, new sets and new recipes add runs to a finished stage (main._missing), not a conflict.
  assert not {"evaluate.models", "evaluate.batch_size", "data.eval"} & set(ev)
  assert "finetune.learning_rate" in ft and not {"finetune.recipes", "finetune.keep", "finetune.save_every"} & set(ft)
  assert stages.downstream("finetune") == ["finetune", "evaluate", "report", "export"]
  assert stages.downstream("cold_start") == ["cold_start", "score", "curate", "finetune", "grpo", "evaluate",
                                             "report", "export"]


def test_a_stage_whose_input_stage_has_not_run_names_it(tmp_path):
  r, err = _main(tmp_path, "--config.stages=finetune")
  _one_line(r, err, "curation/sft.json not found", "'curate' stage has not run")


def test_a_bad_image_names_the_data_file_and_the_record_as_the_file_counts_it(tmp_path):
  """Record 3 of the file has no readable image; record 1 had no answer and was skipped by the reader
  first: the message still says record 3, and names the data file (not only the image)."""
  from dcsft_jax.data import batching
  from dcsft_jax.data.processor import Processor
  from dcsft_jax.data.records import BadRecord
  from dcsft_jax.data.sources import load, parse
  good = str(tmp_path / "ok.png")
  Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(good)
  pairs = (("one", good), ("", good), ("two", good), ("three", str(tmp_path / "gone.png")))
  rows = [{"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": a}],
           "images": [img]} for a, img in pairs]
  path = tmp_path / "d.json"
  path.write_text(json.dumps(rows))
  records = load(parse(f"json:{path}"), skip_bad_records=True)
  assert len(records) == 3
  with pytest.raises(BadRecord, match=rf"{re.escape(str(path))}: record 3 .*gone.png"):
    it = batching.BatchIterator(records, Processor.tiny(), batch_size=1,
                                buckets=(batching.Bucket(16, 64),), with_answers=True, shuffle=False)
    list(it)


def test_a_checkpoint_of_integer_weights_is_refused_at_load(tmp_path):
  from dcsft_jax.models import registry
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  d = tiny_config().to_hf_dict()
  d["torch_dtype"] = "int8"
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match=r"config.json: torch_dtype 'int8' is not one of float32, bfloat16, float16"):
    registry.from_pretrained(str(tmp_path))
  d["torch_dtype"] = "bfloat16"
  (tmp_path / "config.json").write_text(json.dumps(d))
  assert registry.from_pretrained(str(tmp_path)).torch_dtype == "bfloat16"


def test_sigterm_before_any_stage_saves_is_one_line_and_143(tmp_path):
  """Issue 27: SIGTERM while the init stage builds the model (no stage handler yet) exited 143 without a
  word; now it says what is kept and what to do."""
  import signal
  import time
  env = dict(_env(tmp_path), PYTHONUNBUFFERED="1")
  p = subprocess.Popen([sys.executable, "-m", "dcsft_jax.main", f"--config={REPO}/configs/dcsft.py",
                        f"--config.workdir={tmp_path / 'wd'}", "--config.stages=init"], cwd=str(tmp_path), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  for line in p.stdout:                 # the run has started its stages: handlers are in place
    if line.startswith("[init]") or time.time() > deadline:
      break
  p.send_signal(signal.SIGTERM)
  _, stderr = p.communicate(timeout=120)
  err = [ln for ln in stderr.splitlines() if ln.strip() and not NATIVE.match(ln)]
  assert p.returncode == 143, stderr[-2000:]
  assert len(err) <= 3 and "stopped by SIGTERM" in err[-1] and "run the same command again" in err[-1], err
  assert not os.path.exists(tmp_path / "wd" / "base_model" / "config.json")


def test_resumed_checkpoints_refuse_other_settings_and_all_damaged_restart_or_stop(tmp_path):
  """A stage cut off after its checkpoints (its model not yet written): a rerun under another learning
  rate stops in one line naming the key and the stage's restart. When no checkpoint can be read, each
  is set aside in one line, then the run stops (damaged_checkpoints=stop) or starts over from step 0."""
  args = ("--config.stages=init,cold_start", "--config.cold_start.steps=2")
  r, _ = _main(tmp_path, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  wd = tmp_path / "wd"
  shutil.rmtree(wd / "cold_start_model")
  os.remove(wd / "settings" / "cold_start.json")
  r, err = _main(tmp_path, *args, "--config.cold_start.learning_rate=3e-5")
  _one_line(r, err, "train.optim.learning_rate 0.002 then, 3e-05 now", "--config.restart_stage=cold_start ")
  ckpts = wd / "train" / "cold_start" / "checkpoints"
  for step in ("1", "2"):                   # emptied, as by a crash mid-save or a full disk
    shutil.rmtree(ckpts / step)
    (ckpts / step).mkdir()
  r, err = _main(tmp_path, *args, "--config.damaged_checkpoints=stop")
  _one_line(r, err, f"no readable checkpoint left in {ckpts}", "--config.damaged_checkpoints=restart")
  said = [ln for ln in r.stderr.splitlines() if str(ckpts) in ln]    # the warnings, in absl's format
  assert sum("cannot be read" in ln for ln in said) == 2 and len(said) == 3, said
  assert not (wd / "cold_start_model").exists()
  for aside in ckpts.glob("*.unreadable-*"):    # moved back, to be found damaged again
    os.replace(aside, ckpts / aside.name.split(".")[0])
  r, _ = _main(tmp_path, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  said = [ln for ln in r.stderr.splitlines() if str(ckpts) in ln]
  assert sum("cannot be read" in ln for ln in said) == 2 and "starts from step 0" in said[-1], said
  assert (wd / "cold_start_model" / "config.json").exists()


def test_a_recipe_with_no_records_is_one_line_naming_what_to_look_at(tmp_path):
  # A pass-rate window no medium prompt can fall in (K=2: medium is 1/2) leaves sft_m empty, whatever
  # the model answers.
  args = ("--config.cold_start.steps=1", "--config.data.train_limit=8", "--config.score.num_samples=2",
          "--config.curate.recipes=sft_m", "--config.curate.window_lo=0.99", "--config.finetune.recipes=sft_m")
  r, _ = _main(tmp_path, "--config.stages=init,cold_start,score,curate", *args)
  assert r.returncode == 0, r.stderr[-3000:]
  r, err = _main(tmp_path, "--config.stages=finetune", *args)
  _one_line(r, err, "sft_m", "holds no records", "curation/summary.json")


def test_generate_names_the_image_flag_not_a_data_file(tmp_path):
  r, _ = _main(tmp_path, "--config.stages=init")
  assert r.returncode == 0, r.stderr[-3000:]
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  r, err = _run(tmp_path, "dcsft_jax.generate", f"--model={tmp_path / 'wd' / 'base_model'}", f"--image={bad}",
                "--prompt=hi")
  _one_line(r, err, f"--image={bad}", "PIL can open")
  assert "skip_bad_records" not in err[-1]


def test_only_the_projects_own_value_errors_are_one_line():
  """A ValueError raised inside a library (a bug of ours or theirs) keeps its traceback; one the project
  raises, directly or through the standard library, is one line."""
  from dcsft_jax import errors
  from dcsft_jax.data import sources

  def library():
    np.zeros(3).reshape(2)

  def ours():
    sources.parse("nonsense")

  def through_stdlib(path=str(REPO)):
    os.makedirs(os.path.join(path, "README.md"))

  for fn, user in ((library, False), (ours, True)):
    try:
      fn()
    except ValueError as e:
      assert errors.is_user_error(e) is user, fn
    else:
      raise AssertionError(f"{fn} raised nothing")
  with pytest.raises(ValueError, match="reshape"):
    errors.cli("t", library)
  with pytest.raises(SystemExit):
    errors.cli("t", ours)
  assert errors.is_user_error(errors.UserError("x"))
  try:
    through_stdlib()
  except FileExistsError as e:
    # Raised in os.makedirs, called from this test file (not the package): not the project's own.
    assert errors.is_user_error(e) is False


def test_a_source_model_without_tokenizer_files_stops_before_any_work(tmp_path):
  """Issue 27: such a directory passed init and failed only in the cold start, naming base_model/."""
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  src = tmp_path / "model"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
  r, err = _main(tmp_path, f"--config.model.hf_path={src}", "--config.stages=init")
  _one_line(r, err, "model.hf_path", "tokenizer.json, tokenizer_config.json, preprocessor_config.json",
            "copy the released model's tokenizer and processor files")
  assert not os.path.exists(tmp_path / "wd" / "base_model")
